"""The run's phases for a prompt and a pipeline alike (RunExecution), on the scripted
models over real HTTP and a real SQLite call cache: the gate's reserve, what proposers
are told, a budget spent in the middle of leader/follower search."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from promptd.optimization.config import OptimizationSettings
from promptd.optimization.evaluator import Evaluator
from promptd.optimization.examples import Snapshot
from promptd.optimization.llm import Budget, CachedLLM, LiteLLMClient, close_litellm
from promptd.optimization.pipeline import ChainEvaluator
from promptd.optimization.plan import RunBudget, RunPlan, StepPlan
from promptd.optimization.program import Program, seen_key
from promptd.optimization.run import RunExecution, RunProgress
from promptd.optimization.stackelberg import LeaderFollower
from promptd.optimization.store import OptimizationStore
from promptd.optimization.strategies.base import Candidate, SearchContext
from promptd.storage.database import Database
from tests.optimize_fake_llm import FakeLLM, user_text
from tests.optimize_helpers import run_services, seed
from tests.optimize_pipeline_task import ACTIVE, PIPELINE, episodes
from tests.optimize_pipeline_task import responder as pipeline_responder
from tests.optimize_task import TEMPLATE, rows
from tests.optimize_task import responder as prompt_responder

JUDGE = "You grade an AI assistant's answer."


def judging(inner: Any) -> Any:
    """``inner``, plus a judge: 10 for an answer equal to the reference, 5 for one that
    contains it, else 0."""

    def answer(body: dict[str, Any]) -> str:
        text = user_text(body)
        if text.startswith(JUDGE):
            reference = text.split("Reference answer (may be empty):\n")[1]
            reference = reference.split("\n\nAssistant's answer:")[0].strip()
            said = text.split("Assistant's answer:\n")[1].split("\n\nScore 0")[0].strip()
            if not reference or reference.lower() not in said.lower():
                return "SCORE: 0"
            return "SCORE: 10" if said.lower() == reference.lower() else "SCORE: 5"
        return str(inner(body))

    return answer


def numbered(inner: Any) -> Any:
    """``inner``, with the extraction step's answers naming their order, so that every
    later call of an episode (the answer step's, the judge's) is its own."""

    def answer(body: dict[str, Any]) -> str:
        text = user_text(body)
        said = str(inner(body))
        order = re.findall(r"Ship order (\d+) to", text)
        if order and "Message:" in text and not text.startswith(JUDGE):
            return f"{said} (order {order[-1]})"
        return said

    return answer


class MemoryEpisodes:
    """The scripted pipeline's episodes, held in memory."""

    async def snapshot(self, now: float) -> Snapshot:
        """Any bounds: the episodes do not change."""
        return Snapshot(now, 0, 0)

    async def episodes(self, pipeline: Any, snapshot: Any) -> list[Any]:
        """400 episodes of the active pipeline, every other one corrected."""
        return episodes(400)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A database with the city prompt's 240 captured calls."""
    database = await Database.open(tmp_path / "run.db")
    await seed(database, "city", rows(240))
    yield database
    await database.close()


def _settings(fake: FakeLLM, **over: Any) -> OptimizationSettings:
    model = {"model": "openai/test-model", "api_base": fake.api_base, "temperature": 0.0}
    evaluation = {"model": model, "metric": "token_f1", "bootstrap_samples": 500}
    evaluation |= over.pop("evaluation", {})
    return OptimizationSettings.model_validate(
        {
            "proposer": model,
            "evaluation": evaluation,
            "instruction": {"n_candidates": 3, "depth": 1},
            "max_llm_calls": 5000,
            "max_concurrency": 1,
            **over,
        }
    )


def _plan(settings: OptimizationSettings, pipeline: bool, strategy: str) -> RunPlan:
    if pipeline:
        steps = tuple(StepPlan(p, "v1", ACTIVE[p]) for p in PIPELINE.prompts)
    else:
        steps = (StepPlan("city", "v1", Program.text(TEMPLATE)),)
    return RunPlan(
        run_id="run-1",
        target=PIPELINE.name if pipeline else "city",
        steps=steps,
        strategies=(strategy,),
        selection={"strategy": strategy, "method": "manual"},
        seed=11,
        snapshot=Snapshot(time.time() + 60, 10**9, 10**9),
        budget=RunBudget.configured(settings),
        trigger_kind="manual",
        trigger_reason="test",
        started_at=0.0,
        pipeline=PIPELINE if pipeline else None,
    )


async def _notify(event: str, fields: dict[str, Any]) -> None:
    return None


@pytest.mark.parametrize(
    ("pipeline", "strategy"),
    [(False, "fewshot"), (True, "instruction")],
    ids=["prompt", "pipeline"],
)
async def test_the_gate_reserve_covers_every_call_the_gate_pays(
    db: Database, pipeline: bool, strategy: str
) -> None:
    """With a judge, the gate pays both programs' answers through every step and a
    judge's verdict on each: the reserve held back during the search covers all of it,
    for a prompt (2 calls per example and program) and a two-step pipeline (3)."""
    inner = numbered(pipeline_responder) if pipeline else prompt_responder
    fake = await FakeLLM(judging(inner)).start()
    try:
        settings = _settings(
            fake, evaluation={"metric": "llm_judge"}, splits={"max_validation": 20, "max_test": 40}
        )
        at_gate: dict[str, float] = {}

        async def checkpoint(progress: RunProgress, budget: Budget) -> None:
            if progress.phase == "gate" and not at_gate:
                at_gate["requests"] = len(fake.requests)
                at_gate["reserve"] = budget.reserve_share * budget.max_calls

        services = run_services(db, settings, episodes=MemoryEpisodes())
        execution = RunExecution(_plan(settings, pipeline, strategy), services, checkpoint, _notify)
        progress = await execution.execute()
        assert progress.gate is not None, progress.notes
        n = progress.gate.n
        gate_calls = len(fake.requests) - at_gate["requests"]
        assert gate_calls > 2 * n * (2 if pipeline else 1), "the judge's calls are paid"
        assert gate_calls <= at_gate["reserve"] + 1e-9
    finally:
        await close_litellm()
        await fake.stop()


async def test_a_followers_proposer_is_told_what_its_prompt_scores_in_the_pipeline(
    db: Database,
) -> None:
    """Round 2 of a follower's instruction search shows the follower's current
    instruction with its end-to-end validation score under the leader candidate being
    answered (2/3 under "city and its country"), not 0."""
    fake = await FakeLLM(pipeline_responder).start()
    try:
        settings = _settings(fake, instruction={"n_candidates": 3, "depth": 2})
        services = run_services(db, settings, episodes=MemoryEpisodes())
        execution = RunExecution(_plan(settings, True, "instruction"), services, _cp, _notify)
        progress = await execution.execute()
        assert progress.outcome == "gate_passed", progress.notes
        follower_rounds = [
            user_text(b)
            for b in fake.requests
            if "expert prompt engineer" in user_text(b)
            and "Notes: {notes}" in user_text(b)
            and "with their scores" in user_text(b)
        ]
        assert any("Score 0.67: Answer from the notes." in p for p in follower_rounds)
    finally:
        await close_litellm()
        await fake.stop()


async def _cp(progress: RunProgress, budget: Budget) -> None:
    return None


async def test_a_budget_spent_during_leader_follower_search_ends_it_cleanly(
    tmp_path: Path,
) -> None:
    """Once the budget is spent, scoring a pair it has not scored yet stops the search
    with a note instead of failing: no pair, no choice."""
    db = await Database.open(tmp_path / "lf.db")
    fake = await FakeLLM(pipeline_responder).start()
    try:
        settings = _settings(fake)
        budget = Budget(0, 100.0)
        llm = CachedLLM(LiteLLMClient(0, 0.0), OptimizationStore(db), budget, "r", 1)
        chain = ChainEvaluator(Evaluator(llm, settings.evaluation), PIPELINE, ACTIVE)
        data = [e for e in episodes(24) if chain.usable(e)]

        def make(prompt: str, step_chain: ChainEvaluator, tag: str, now: float) -> Any:
            async def hook(cand: Candidate) -> None:
                return None

            base = step_chain.programs[prompt]
            return SearchContext(
                run_id=f"r:{tag}",
                prompt=prompt,
                seed=7,
                baseline=base,
                train=[],
                validation=data,
                evaluator=step_chain,
                llm=llm,
                settings=settings,
                seen={seen_key(base)},
                on_candidate=hook,
                baseline_val_mean=now,
            )

        eq = await LeaderFollower(PIPELINE, ACTIVE, chain, data, make, "instruction").solve()
        assert (eq.responses, eq.chosen) == ([], None)
        assert any("llm_calls budget spent" in note for note in eq.notes)
        assert fake.requests == []
    finally:
        await close_litellm()
        await fake.stop()
        await db.close()
