"""Pipeline optimization on a real small model: baseline, each prompt alone, leader/follower.

    python bench/pipeline_quality.py [--base-url URL | --start-server] [--budget 800]
        [--episodes 300] [--strategy instruction] [--out results.json]

A two-step task with programmatic ground truth, on SmolLM2-135M-Instruct through
llama-cpp-python's server (see ``optimize_quality.py`` for installing it):

* ``extract`` reads a customer message and names the city it is about;
* ``label`` reads what ``extract`` wrote and writes the shipping label's destination
  line in a fixed format, ``Destination: <City>``, which the episode is scored on.

Both start from plain chat configurations (an instruction and the input). Production is
simulated: the active pipeline answers every episode, each episode is rated by the token
F1 of its label against the truth, and half of them get the right label as a correction.
Then, on the same episodes and each with ``--budget`` paid calls and an empty cache:

1. **each prompt alone**: ``extract`` searched with ``label`` as it is, then ``label``
   with ``extract`` as it is (every score end to end: the pipeline's answer);
2. **leader/follower**: ``extract`` candidates, ``label``'s best response to each, the
   best pair, and the stability check.

Every pipeline answers the test episodes (no search saw them), scored against the truth:
exact match and token F1 of the label, with the paired gain over the baseline pipeline
and its 95 % bootstrap interval.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from optimize_quality import llama_server, model_settings
from optimize_tasks import CITIES, CITY_SENTENCES, DAYS, ITEMS

from promptd.optimization.config import OptimizationSettings
from promptd.optimization.evaluator import Evaluator
from promptd.optimization.examples import Example, split
from promptd.optimization.gate import bootstrap_interval
from promptd.optimization.llm import Budget, CachedLLM, LiteLLMClient, close_litellm
from promptd.optimization.pipeline import ChainEvaluator, Episode
from promptd.optimization.program import Program, seen_key
from promptd.optimization.scoring import exact_match, token_f1
from promptd.optimization.stackelberg import LeaderFollower, independent
from promptd.optimization.store import OptimizationStore
from promptd.optimization.strategies.base import Candidate, SearchContext
from promptd.replacement.pipelines import Pipeline, Step
from promptd.storage.database import Database

PIPELINE = Pipeline(
    "shipping",
    (
        Step("extract", {"text": "input.text"}),
        Step("label", {"notes": "extract.output"}),
    ),
)
ACTIVE = {
    "extract": Program.from_config(
        {
            "messages": [
                {"role": "system", "content": "What city is this message about?"},
                {"role": "user", "content": "{text}"},
            ]
        }
    ),
    "label": Program.from_config(
        {
            "messages": [
                {"role": "system", "content": "Write the destination line of a shipping label."},
                {"role": "user", "content": "{notes}"},
            ]
        }
    ),
}
MAX_TOKENS = 32


def make_items(n: int, seed: int = 3) -> list[tuple[str, str, str]]:
    """``(episode_id, message, truth label)``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        city = rng.choice(CITIES)
        text = rng.choice(CITY_SENTENCES).format(
            n=rng.randint(2, 40), item=rng.choice(ITEMS), city=city, day=rng.choice(DAYS)
        )
        out.append((f"ship-{i}", text, f"Destination: {city}"))
    return out


def settings(url: str, budget: int) -> OptimizationSettings:
    """The optimizer's settings (defaults but the model and the budget)."""
    return OptimizationSettings(
        proposer=model_settings(url, 0.7, 160),
        evaluation={"model": model_settings(url, 0.0, MAX_TOKENS), "metric": "token_f1"},
        max_llm_calls=budget,
        max_concurrency=1,
        optimization_timeout_minutes=240,
        instruction={"n_candidates": 3, "depth": 1},
        fewshot={"num_candidates": 3},
        mipro={"num_trials": 6, "num_instructions": 2, "num_demo_sets": 3},
    )


async def produce(items: Sequence[tuple[str, str, str]], url: str, work: Path) -> list[Episode]:
    """The active pipeline answers every episode: production traffic with feedback."""
    db = await Database.open(work / "production.db")
    try:
        llm = CachedLLM(LiteLLMClient(3, 1.0), OptimizationStore(db), Budget(10**9, 1e9), "p", 1)
        conf = settings(url, 10**9)
        chain = ChainEvaluator(Evaluator(llm, conf.evaluation), PIPELINE, ACTIVE)
        shells = [Episode(eid, {"text": text}, {}, 0.0, label) for eid, text, label in items]
        results = await chain.chains(ACTIVE, shells)
    finally:
        await db.close()
    episodes = []
    for i, ((eid, text, label), result) in enumerate(zip(items, results, strict=True)):
        extracted, final = result.outputs.get("extract", ""), result.outputs.get("label", "")
        calls = {
            "extract": Example(
                f"{eid}-1", "v1", 0.0, {"text": text}, extracted, 0.0, 1, None, None
            ),
            "label": Example(
                f"{eid}-2", "v1", 0.0, {"notes": extracted}, final, 0.0, 1, None, None
            ),
        }
        score = token_f1(final, label)
        episodes.append(
            Episode(eid, {"text": text}, calls, score, label if i % 2 == 0 else None, final)
        )
    return episodes


def context_factory(
    conf: OptimizationSettings,
    llm: CachedLLM,
    train: Sequence[Episode],
    validation: Sequence[Episode],
    run: str,
) -> Any:
    """Search contexts for one step of the pipeline (as the daemon's pipeline runs do)."""

    async def hook(_cand: Candidate) -> None:
        return None

    def make(prompt: str, chain: ChainEvaluator, tag: str, current: float) -> SearchContext:
        base = chain.programs[prompt]
        return SearchContext(
            run_id=f"{run}/{prompt}/{tag}",
            prompt=prompt,
            seed=17 + (1 if tag == "stability" else 0),
            baseline=base,
            train=[e.as_example(prompt, final=prompt == PIPELINE.prompts[-1]) for e in train],
            validation=list(validation),
            evaluator=chain,
            llm=llm,
            settings=conf,
            seen={seen_key(base)},
            on_candidate=hook,
            baseline_val_mean=current,
        )

    return make


async def optimize(
    method: str,
    episodes: Sequence[Episode],
    url: str,
    budget: int,
    strategy: str,
    work: Path,
) -> dict[str, Any]:
    """One method on a fresh cache and budget; returns its programs and spend."""
    conf = settings(url, budget)
    db = await Database.open(work / f"{method}.db")
    started = time.monotonic()
    try:
        llm = CachedLLM(
            LiteLLMClient(3, 1.0), OptimizationStore(db), Budget(budget, 1e9), method, 1
        )
        chain = ChainEvaluator(Evaluator(llm, conf.evaluation), PIPELINE, ACTIVE)
        parts = split(list(episodes), "promptd", 0.4, 0.3)
        validation = [e for e in parts.validation if chain.usable(e)][:60]
        make = context_factory(conf, llm, parts.train, validation, method)
        report: dict[str, Any] = {}
        if method == "alone":
            programs = await independent(PIPELINE, ACTIVE, chain, validation, make, strategy)
        else:
            solver = LeaderFollower(PIPELINE, ACTIVE, chain, validation, make, strategy, top_k=2)
            eq = await solver.solve()
            programs = eq.best.programs(PIPELINE) if eq.chosen is not None else dict(ACTIVE)
            report = eq.report(PIPELINE)
        return {
            "method": method,
            "programs": programs,
            "calls": llm.budget.calls,
            "report": report,
            "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        await db.close()


async def answer_test(
    methods: Mapping[str, Mapping[str, Program]], test: Sequence[Episode], url: str, work: Path
) -> dict[str, list[str]]:
    """Each method's final labels on the test episodes (shared cache, outside budgets)."""
    db = await Database.open(work / "test.db")
    try:
        llm = CachedLLM(LiteLLMClient(3, 1.0), OptimizationStore(db), Budget(10**9, 1e9), "t", 1)
        conf = settings(url, 10**9)
        chain = ChainEvaluator(Evaluator(llm, conf.evaluation), PIPELINE, ACTIVE)
        out = {}
        for name, programs in methods.items():
            results = await chain.chains(programs, test)
            out[name] = [r.outputs.get("label", "") for r in results]
        return out
    finally:
        await db.close()


async def main_async(args: argparse.Namespace, url: str) -> None:
    """Produce, optimize each way, answer the test, print the table."""
    work = Path(tempfile.mkdtemp(prefix="promptd-pipeline-bench-"))
    try:
        items = make_items(args.episodes)
        episodes = await produce(items, url, work)
        truth = {eid: label for eid, _text, label in items}
        test = split(episodes, "promptd", 0.4, 0.3).test
        results = []
        for method in ("alone", "leader_follower"):
            print(f"[pipeline] {method} ...", flush=True)
            results.append(await optimize(method, episodes, url, args.budget, args.strategy, work))
        await close_litellm()
        programs = {"baseline": ACTIVE} | {r["method"]: r["programs"] for r in results}
        answers = await answer_test(programs, test, url, work)
        await close_litellm()
        base = np.array(
            [
                token_f1(a, truth[e.episode_id])
                for a, e in zip(answers["baseline"], test, strict=True)
            ]
        )
        lines = [
            f"\n## shipping pipeline: {len(episodes)} episodes, test split {len(test)}, "
            f"strategy {args.strategy}, budget {args.budget} calls",
            "",
            "| method | LLM calls | test exact match | test token F1 "
            "| F1 gain vs baseline (95% CI) | seconds |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        out = []
        spend = {"baseline": (0, 0.0)} | {r["method"]: (r["calls"], r["seconds"]) for r in results}
        for name, labels in answers.items():
            em = np.array(
                [exact_match(a, truth[e.episode_id]) for a, e in zip(labels, test, strict=True)]
            )
            f1 = np.array(
                [token_f1(a, truth[e.episode_id]) for a, e in zip(labels, test, strict=True)]
            )
            diff = f1 - base
            low, high = bootstrap_interval(list(diff), 4000, 5)
            calls, seconds = spend[name]
            lines.append(
                f"| {name} | {calls} | {em.mean():.3f} | {f1.mean():.3f} | "
                f"{diff.mean():+.3f} ({low:+.3f}..{high:+.3f}) | {seconds} |"
            )
            out.append(
                {
                    "method": name,
                    "calls": calls,
                    "test_em": float(em.mean()),
                    "test_f1": float(f1.mean()),
                    "f1_gain_ci": [low, high],
                    "programs": {p: prog.template for p, prog in programs[name].items()},
                }
            )
        report = next(r["report"] for r in results if r["method"] == "leader_follower")
        lines.append(
            f"\nLeader/follower equilibrium: stable = {report.get('stable')}; pairs "
            + ", ".join(f"{p['val_mean']:.3f}" for p in report.get("pairs", []))
        )
        print("\n".join(lines), flush=True)
        if args.out:
            await asyncio.to_thread(
                Path(args.out).write_text,
                json.dumps({"rows": out, "equilibrium": report}, indent=2),
            )
    finally:
        await close_litellm()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    """Parse arguments, start the model server if asked, run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url")
    parser.add_argument("--start-server", action="store_true")
    parser.add_argument("--budget", type=int, default=800, help="paid calls per method")
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--strategy", default="fewshot", help="fewshot, instruction or mipro")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.base_url:
        asyncio.run(main_async(args, args.base_url))
        return
    if not args.start_server:
        raise SystemExit("give --base-url URL or --start-server")
    with llama_server() as url:
        asyncio.run(main_async(args, url))


if __name__ == "__main__":
    main()
