"""How well an LLM judge agrees with ground truth, on a real small model.

    python bench/judge_agreement.py (--base-url URL | --start-server [--server-python PY])
        [--items 60] [--tasks city,sentiment] [--judge-url URL] [--out results.json]

The app is SmolLM2-135M-Instruct answering each task's baseline prompt (the tasks of
``optimize_tasks.py``, whose right answers are known); the judge is the same model unless
``--judge-url`` names another OpenAI-compatible server, reached through promptd's own judge
path: the messages of :mod:`promptd.evaluation.judge` (rubric, input, output, the reference
when there is one; never the variant), litellm over HTTP, the answer read as a 0..1 score.

Ground truth per call: whether the app's answer is right (it names the right label, the
city or positive/negative, and no other one; SmolLM2 rarely answers with the bare word),
and its token F1 against the right answer. Per judge configuration the table shows the
share of answers with a readable score, the share the judge passes, Spearman's rho between
the judge's score and the token F1 with its 95 % interval, Cohen's kappa between the
judge's pass (score >= 0.5) and the answer being right with its interval, the plain
accuracy of that pass, and the judge's time per call (this machine: 2 shared cores). A
statistic is "-" where it is undefined: a judge that gives every call the same verdict.

Configurations: the default 1..5 rubric without a reference (what a judge sees on calls
nobody corrected), the same with the right answer as the reference (a correction), and a
yes/no judge with the reference; each read from the answer's text and, G-Eval style, as
the expected score under the token probabilities (``scoring = "logprobs"``; ``--only
logprobs`` runs those alone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from optimize_quality import llama_server, model_settings
from optimize_tasks import CITIES, TASKS, Task

from promptd.evaluation.agreement import Estimate, cohen_kappa, spearman
from promptd.evaluation.calls import Call
from promptd.evaluation.config import JudgeEvaluator
from promptd.evaluation.judge import messages, verdict_of
from promptd.optimization.llm import LiteLLMClient, close_litellm
from promptd.optimization.scoring import token_f1

RUBRICS = {
    "city": "The answer must name the city the message is about, and nothing else.",
    "sentiment": "The answer must say correctly whether the review is positive or negative.",
}
YES_NO_SYSTEM = (
    "You check an AI assistant's answer against a reference answer.\n"
    "Criteria: {rubric}\n"
    "Reply yes if the answer agrees with the reference, no if it does not. One word."
)


def judges(task: str, url: str) -> dict[str, JudgeEvaluator]:
    """The judge configurations compared, by label."""
    base: dict[str, Any] = {
        "type": "judge",
        "rubric": RUBRICS[task],
        "model": "openai/judge",
        "api_base": url,
        "max_tokens": 16,
        "request_timeout_s": 300.0,
    }
    # The expected score under the token probabilities (G-Eval): a few tokens are enough.
    probs: dict[str, Any] = {**base, "scoring": "logprobs", "top_logprobs": 20, "max_tokens": 4}
    return {
        "1-5 rubric, no reference": JudgeEvaluator(name="plain", use_reference=False, **base),
        "1-5 rubric, reference": JudgeEvaluator(name="ref", **base),
        "yes/no, reference": JudgeEvaluator(
            name="yesno", scale=(0.0, 1.0), system_prompt=YES_NO_SYSTEM, **base
        ),
        "1-5, no reference, logprobs": JudgeEvaluator(
            name="plain_lp", use_reference=False, **probs
        ),
        "1-5, reference, logprobs": JudgeEvaluator(name="ref_lp", **probs),
        "yes/no, reference, logprobs": JudgeEvaluator(
            name="yesno_lp", scale=(0.0, 1.0), system_prompt=YES_NO_SYSTEM, **probs
        ),
    }


LABELS = {"city": CITIES, "sentiment": ("positive", "negative")}


def is_right(answer: str, truth: str, labels: tuple[str, ...]) -> bool:
    """The answer names ``truth`` and no other label (case-insensitive, whole words)."""
    words = set(re.findall(r"[a-z]+", answer.casefold()))
    named = {label for label in labels if label.casefold() in words}
    return named == {truth}


async def app_answers(task: Task, url: str, client: LiteLLMClient) -> list[str]:
    """The app's answer to every item (the baseline prompt, greedy)."""
    llm = model_settings(url, 0.0, 24)
    out = []
    for item in task.items:
        prompt = task.baseline.format(text=item.text)
        done = await client.complete(llm, [{"role": "user", "content": prompt}], "app")
        out.append(done.text.strip())
    return out


async def judge_all(
    judge: JudgeEvaluator, task: Task, answers: list[str], client: LiteLLMClient
) -> tuple[list[float | None], float]:
    """The judge's score of every answer (``None``: unreadable) and seconds per call."""
    scores: list[float | None] = []
    started = time.perf_counter()
    for item, answer in zip(task.items, answers, strict=True):
        call = Call(item.request_id, task.name, "v1", "m", 0.0, {"text": item.text}, answer)
        done = await client.complete(judge.llm(), messages(judge, call, item.answer), "judge")
        scores.append(verdict_of(judge, done.text, done.top_logprobs)[0])
    return scores, (time.perf_counter() - started) / max(len(answers), 1)


def _fmt(est: Estimate | None) -> str:
    if est is None:
        return "-"
    return f"{est.value:+.2f} [{est.low:+.2f}, {est.high:+.2f}]"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def row(
    label: str, scores: list[float | None], f1: list[float], correct: list[bool], s_per_call: float
) -> dict[str, Any]:
    """Agreement of one judge configuration with the ground truth."""
    valid = [(s, f, c) for s, f, c in zip(scores, f1, correct, strict=True) if s is not None]
    rho = spearman([s for s, _, _ in valid], [f for _, f, _ in valid])
    kappa = cohen_kappa([s >= 0.5 for s, _, _ in valid], [c for _, _, c in valid])
    accuracy = sum((s >= 0.5) == c for s, _, c in valid) / len(valid) if valid else None
    passes = sum(s >= 0.5 for s, _, _ in valid) / len(valid) if valid else None
    return {
        "judge": label,
        "readable": len(valid) / len(scores),
        "spearman": rho.as_dict() if rho else None,
        "kappa": kappa.as_dict() if kappa else None,
        "accuracy": accuracy,
        "pass_rate": passes,
        "s_per_call": s_per_call,
        "_table": (
            f"{label:<28}{len(valid) / len(scores):>9.0%}{_pct(passes):>8}{_fmt(rho):>24}"
            f"{_fmt(kappa):>24}{_pct(accuracy):>9}{s_per_call:>8.2f}"
        ),
    }


async def bench_task(
    name: str, n: int, app_url: str, judge_url: str, only: str | None = None
) -> dict[str, Any]:
    """One task: the app answers, every judge configuration scores the answers."""
    task = TASKS[name](n)
    client = LiteLLMClient(max_retries=2, backoff_s=1.0)
    answers = await app_answers(task, app_url, client)
    labels = LABELS[name]
    correct = [is_right(a, i.answer, labels) for a, i in zip(answers, task.items, strict=True)]
    f1 = [token_f1(a, i.answer) for a, i in zip(answers, task.items, strict=True)]
    rows = []
    for label, judge in judges(name, judge_url).items():
        if only is not None and only not in label:
            continue
        scores, per_call = await judge_all(judge, task, answers, client)
        rows.append(row(label, scores, f1, correct, per_call))
    return {"task": name, "items": n, "app_right": statistics.mean(correct), "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    """The table of one task."""
    print(
        f"\n{result['task']}: {result['items']} calls, the app (SmolLM2-135M) is right on "
        f"{result['app_right']:.0%}"
    )
    print(
        f"{'judge':<28}{'readable':>9}{'passes':>8}{'Spearman vs F1 [95%]':>24}"
        f"{'kappa vs right [95%]':>24}"
        f"{'accuracy':>9}{'s/call':>8}"
    )
    for r in result["rows"]:
        print(r.pop("_table"))


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[str]:
    """The app's server: the one given, or one started here."""
    if args.base_url:
        yield args.base_url
        return
    with llama_server(
        args.server_python, Path(args.model_file) if args.model_file else None
    ) as url:
        yield url


async def main_async(args: argparse.Namespace, url: str) -> list[dict[str, Any]]:
    results = []
    try:
        for name in args.tasks.split(","):
            result = await bench_task(name, args.items, url, args.judge_url or url, args.only)
            print_table(result)
            results.append(result)
    finally:
        await close_litellm()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--base-url", help="an OpenAI-compatible server of the app's model")
    group.add_argument("--start-server", action="store_true", help="start llama_cpp.server")
    parser.add_argument("--server-python", default="python", help="python with llama-cpp")
    parser.add_argument("--model-file", help="the GGUF to serve (default: SmolLM2-135M's)")
    parser.add_argument("--judge-url", help="the judge's server (default: the app's)")
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--tasks", default="city,sentiment")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--only", help="only the judge configurations whose label has this")
    args = parser.parse_args()
    # litellm's response objects trip pydantic's serializer warnings on every call.
    warnings.filterwarnings("ignore", message="Pydantic serializer warnings")
    started = time.monotonic()
    with server(args) as url:
        results = asyncio.run(main_async(args, url))
    print(f"\n{time.monotonic() - started:.0f} s in all")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
