"""Pipelines: definitions, the end-to-end chain evaluator, and leader/follower search on a
scripted two-step task (litellm over real HTTP, a real SQLite call cache)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from promptd.optimization.config import OptimizationSettings
from promptd.optimization.evaluator import Evaluator
from promptd.optimization.llm import Budget, CachedLLM, LiteLLMClient, close_litellm
from promptd.optimization.pipeline import ChainEvaluator
from promptd.optimization.program import Program, seen_key
from promptd.optimization.stackelberg import LeaderFollower, independent
from promptd.optimization.store import OptimizationStore
from promptd.optimization.strategies.base import Candidate, SearchContext
from promptd.replacement.pipelines import Pipeline, PipelineError
from promptd.storage.database import Database
from tests.optimize_fake_llm import FakeLLM
from tests.optimize_helpers import run_services
from tests.optimize_pipeline_task import (
    ACTIVE,
    CITY_COUNTRY,
    COUNTRY_ONLY,
    PIPELINE,
    episodes,
    responder,
)


@pytest.fixture
async def chain(tmp_path: Path) -> AsyncIterator[tuple[ChainEvaluator, OptimizationSettings]]:
    """A chain evaluator on the scripted model, with a real SQLite call cache."""
    db = await Database.open(tmp_path / "t.db")
    fake = await FakeLLM(responder).start()
    model = {"model": "openai/test-model", "api_base": fake.api_base, "temperature": 0.0}
    settings = OptimizationSettings.model_validate(
        {
            "proposer": model,
            "evaluation": {"model": model, "metric": "token_f1"},
            "instruction": {"n_candidates": 3, "depth": 1},
        }
    )
    llm = CachedLLM(LiteLLMClient(0, 0.0), OptimizationStore(db), Budget(5000, 100.0), "r", 4)
    yield ChainEvaluator(Evaluator(llm, settings.evaluation), PIPELINE, ACTIVE), settings
    await close_litellm()
    await fake.stop()
    await db.close()


def _factory(chain: ChainEvaluator, settings: OptimizationSettings, data: list[Any]) -> Any:
    train = [e.as_example(p) for e in data for p in PIPELINE.prompts]

    def make(prompt: str, step_chain: ChainEvaluator, tag: str, current: float) -> SearchContext:
        async def hook(cand: Candidate) -> None:
            return None

        base = step_chain.programs[prompt]
        return SearchContext(
            run_id=f"run:{tag}",
            prompt=prompt,
            seed=7,
            baseline=base,
            train=[e for e in train if prompt == ("extract" if "text" in e.input else "answer")],
            validation=[e for e in data if step_chain.usable(e)],
            evaluator=step_chain,
            llm=chain.evaluator.llm,
            settings=settings,
            seen={seen_key(base)},
            on_candidate=hook,
            baseline_val_mean=current,
        )

    return make


def test_pipeline_definitions_are_checked() -> None:
    """Sources must be inputs or earlier steps; a prompt appears once; two steps at least."""
    assert PIPELINE.inputs() == {"text"}
    assert PIPELINE.depends("answer") == {"extract"}
    assert Pipeline.from_dict(PIPELINE.to_dict()) == PIPELINE
    bad = [
        {
            "name": "p",
            "steps": [
                {"prompt": "a", "bindings": {"x": "b.output"}},
                {"prompt": "b", "bindings": {"y": "input.y"}},
            ],
        },
        {
            "name": "p",
            "steps": [
                {"prompt": "a", "bindings": {"x": "input.x"}},
                {"prompt": "a", "bindings": {"y": "a.output"}},
            ],
        },
        {"name": "p", "steps": [{"prompt": "a", "bindings": {"x": "input.x"}}]},
        {
            "name": "p",
            "steps": [
                {"prompt": "a", "bindings": {"x": "a.result"}},
                {"prompt": "b", "bindings": {}},
            ],
        },
    ]
    for definition in bad:
        with pytest.raises(PipelineError):
            Pipeline.from_dict(definition)


async def test_chain_feeds_each_output_into_the_next_step(
    chain: tuple[ChainEvaluator, OptimizationSettings],
) -> None:
    """The answer step receives the extractor's output; the final answer is scored."""
    evaluator, _ = chain
    data = [e for e in episodes(4) if evaluator.usable(e)]
    programs = {
        "extract": Program.text(f"{CITY_COUNTRY}\nMessage: {{text}}"),
        "answer": Program.text(f"{COUNTRY_ONLY}\nNotes: {{notes}}"),
    }
    [result] = await evaluator.chains(programs, data[:1])
    assert result.outputs == {"extract": "Lyon, France", "answer": "France"}
    assert result.final is not None
    assert result.final.score == 1.0
    assert await evaluator.pipeline_scores(ACTIVE, data) == [0.0] * len(data)


async def test_leader_follower_beats_optimizing_each_prompt_alone(
    chain: tuple[ChainEvaluator, OptimizationSettings],
) -> None:
    """Each prompt alone stops at F1 2/3; the leader chosen for its followers' best
    response reaches 1.0, and the equilibrium is stable."""
    evaluator, settings = chain
    data = [e for e in episodes(24) if evaluator.usable(e)]
    make = _factory(evaluator, settings, data)
    alone = independent(PIPELINE, ACTIVE, evaluator, data, make, "instruction")
    programs = await alone
    alone_score = sum(await evaluator.pipeline_scores(programs, data)) / len(data)
    assert alone_score == pytest.approx(2 / 3)

    solver = LeaderFollower(PIPELINE, ACTIVE, evaluator, data, make, "instruction", top_k=3)
    eq = await solver.solve()
    best = eq.best
    assert best.val_mean == pytest.approx(1.0)
    assert CITY_COUNTRY in best.leader.template
    assert COUNTRY_ONLY in best.followers["answer"].template
    assert eq.stable is True
    report = eq.report(PIPELINE)
    assert report["leader"] == "extract"
    assert len(report["pairs"]) == 3
    assert report["pairs"][eq.chosen]["val_mean"] == pytest.approx(1.0)


class MemoryEpisodes:
    """Episodes held in memory (the daemon reads them from the event tables)."""

    def __init__(self, data: list[Any]) -> None:
        self.data = data

    async def snapshot(self, now: float) -> Any:
        from promptd.optimization.examples import Snapshot

        return Snapshot(now, 0, 0)

    async def episodes(self, pipeline: Any, snapshot: Any) -> list[Any]:
        return self.data


async def test_a_pipeline_run_searches_gates_and_names_changed_steps(tmp_path: Path) -> None:
    """A pipeline run: split episodes, leader/follower search, an end-to-end gate on test
    episodes; both steps change, the gate passes; a replay pays nothing."""
    from promptd.optimization.examples import Snapshot
    from promptd.optimization.plan import RunBudget, RunPlan, StepPlan
    from promptd.optimization.run import RunExecution

    db = await Database.open(tmp_path / "run.db")
    fake = await FakeLLM(responder).start()
    try:
        model = {"model": "openai/test-model", "api_base": fake.api_base, "temperature": 0.0}
        settings = OptimizationSettings.model_validate(
            {
                "proposer": model,
                "evaluation": {"model": model, "metric": "token_f1", "bootstrap_samples": 500},
                "instruction": {"n_candidates": 3, "depth": 1},
                "max_llm_calls": 5000,
            }
        )
        plan = RunPlan(
            run_id="prun-1",
            target=PIPELINE.name,
            steps=tuple(StepPlan(p, "v1", ACTIVE[p]) for p in PIPELINE.prompts),
            strategies=("instruction",),
            selection={"strategy": "instruction", "method": "manual"},
            seed=11,
            snapshot=Snapshot(0.0, 0, 0),
            budget=RunBudget.configured(settings),
            trigger_kind="manual",
            trigger_reason="test",
            started_at=0.0,
            pipeline=PIPELINE,
        )
        services = run_services(db, settings, episodes=MemoryEpisodes(episodes(400)))

        async def checkpoint(progress: Any, budget: Any) -> None:
            return None

        async def notify(event: str, fields: dict[str, Any]) -> None:
            return None

        async def run() -> Any:
            execution = RunExecution(plan, services, checkpoint, notify)
            return await execution.execute(), execution

        progress, _first = await run()
        assert progress.outcome == "gate_passed", progress.notes
        assert set(progress.chosen.programs) == {"extract", "answer"}
        assert all(progress.chosen.programs[p] != ACTIVE[p] for p in ACTIVE)
        assert progress.gate.gain == pytest.approx(1.0)
        assert progress.equilibrium["stable"] is True
        assert progress.baseline_val_mean == 0.0
        # Every step's candidates are trials of the run, scored end to end.
        assert {t["step"] for t in progress.trials} == {"extract", "answer"}
        paid = len(fake.requests)
        again, second = await run()
        assert again.outcome == "gate_passed"
        assert len(fake.requests) == paid
        assert second.llm is not None
        assert second.llm.misses == 0
    finally:
        await close_litellm()
        await fake.stop()
        await db.close()
