"""One run model for prompts and pipelines: the hand-off on resume and against a moved
baseline, the bandit's gate evidence, per-run budgets and the run's record (trials,
gepa's progress, unscored candidates). The runner on a real SQLite file, litellm over
HTTP to the scripted model, recording stand-ins for the rollout controller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from promptd.optimization.examples import Snapshot, split_of
from promptd.optimization.llm import close_litellm
from promptd.optimization.plan import BudgetRequest
from promptd.optimization.runner import OptimizationRunner, RunError
from promptd.optimization.store import OptimizationStore
from promptd.replacement.pipelines import PipelineRegistry
from promptd.replacement.registry import NewVersion, PromptVersion, Registry, RegistryError
from promptd.storage.database import Database
from tests.conftest import wait_for
from tests.optimize_fake_llm import FakeLLM, user_text
from tests.optimize_helpers import (
    FakeRollouts,
    PipelineRollouts,
    make_runner,
    run_once,
    runner_settings,
    seed,
)
from tests.optimize_pipeline_task import ANSWER, EXTRACT, PIPELINE, episodes
from tests.optimize_pipeline_task import responder as pipeline_responder
from tests.optimize_task import TEMPLATE, responder, rows

pytestmark = pytest.mark.integration

PROMPT = "city"


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A database with prompt ``city`` and 240 captured calls (every other corrected)."""
    database = await Database.open(tmp_path / "opt.db")
    await Registry(database).register(PROMPT, NewVersion(template=TEMPLATE))
    await seed(database, PROMPT, rows(240))
    yield database
    await database.close()


@pytest.fixture
async def fake_llm() -> AsyncIterator[Callable[..., Any]]:
    """Factory of scripted servers, stopped afterwards."""
    servers: list[FakeLLM] = []

    async def start(answer: Any = responder) -> FakeLLM:
        server = await FakeLLM(answer).start()
        servers.append(server)
        return server

    yield start
    await close_litellm()
    for server in servers:
        await server.stop()


class Episodes:
    """The scripted pipeline's episodes, held in memory."""

    async def snapshot(self, now: float) -> Snapshot:
        """Any bounds: the episodes do not change."""
        return Snapshot(now, 0, 0)

    async def episodes(self, pipeline: Any, snapshot: Any) -> list[Any]:
        """400 episodes of the active pipeline, every other one corrected."""
        return episodes(400)


async def _pipeline_runner(
    db: Database, fake: FakeLLM, registry: Registry, **over: Any
) -> tuple[OptimizationRunner, PipelineRollouts]:
    await registry.register("extract", NewVersion(template=EXTRACT))
    await registry.register("answer", NewVersion(template=ANSWER))
    pipelines = PipelineRegistry(db, registry)
    await pipelines.register(PIPELINE.to_dict())
    rollouts = PipelineRollouts()
    settings = runner_settings(fake, strategies=["instruction"], max_llm_calls=5000, **over)
    runner = make_runner(
        db, settings, rollouts, registry=registry, pipelines=pipelines, episodes=Episodes()
    )
    return runner, rollouts


async def _resume(runner: OptimizationRunner, run_id: str) -> dict[str, Any]:
    """Resume ``run_id`` on ``runner`` and wait for its end."""
    await runner.resume()
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop, asyncio.Queue()))
    try:
        return await wait_for(lambda: _finished(runner, run_id), timeout=60)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _finished(runner: OptimizationRunner, run_id: str) -> dict[str, Any] | None:
    run = await runner.get_run(run_id)
    return run if run is not None and run["status"] != "running" else None


@pytest.mark.parametrize("rollout_started", [False, True])
async def test_a_stop_in_the_hand_off_resumes_to_its_own_version_and_rollout(
    db: Database, fake_llm: Callable[..., Any], rollout_started: bool
) -> None:
    """The state a stop during the hand-off leaves (the version registered, the row still
    running, no rollout id, no gate evidence; the rollout started or not): the resumed
    run replays to the same candidate without paying, keeps its version, finds or starts
    its one rollout, writes its id, and the bandit learns the rollout's result."""
    fake = await fake_llm()
    rollouts = FakeRollouts()
    settings = runner_settings(fake)
    runner = make_runner(db, settings, rollouts)
    _d, run_id = await runner.start_manual(
        PROMPT, ["fewshot"], "test", BudgetRequest(max_llm_calls=300)
    )
    await runner.wait_idle()
    run = await runner.get_run(run_id)
    assert run is not None
    assert run["outcome"] == "deployed", run["error"]
    version = run["deployed_version"]
    if not rollout_started:
        rollouts.started.clear()
        rollouts.status.clear()
    async with db.transaction() as conn:
        await conn.execute(
            "UPDATE optimization_runs SET status = 'running', outcome = NULL, finished_at = "
            "NULL, phase = 'hand_off', deployed_version = NULL, rollout_id = NULL, "
            "error = NULL WHERE id = ?",
            (run_id,),
        )
        await conn.execute("DELETE FROM optimization_outcomes WHERE run_id = ?", (run_id,))
    paid = len(fake.requests)

    resumed = make_runner(db, settings, rollouts)
    done = await _resume(resumed, run_id)
    assert (done["status"], done["outcome"], done["resumes"]) == ("completed", "deployed", 1)
    assert done["deployed_version"] == version
    assert [v.version for v in await Registry(db).versions(PROMPT)] == ["v1", version]
    assert [s["candidate"] for s in rollouts.started] == [version]
    assert done["rollout_id"] == rollouts.started[0]["id"]
    assert len(fake.requests) == paid, "the replay, gate included, came from the cache"
    assert done["target"]["budget"]["llm_calls"] == 300
    rollouts.status[done["rollout_id"]] = "promoted"
    await resumed.learn_online()
    outcomes = await OptimizationStore(db).outcomes()
    assert [(o.successes, o.failures) for o in outcomes] == [(2.0, 0.0)]


async def test_the_hand_off_registers_nothing_when_the_active_version_moved(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """Someone activates another version while the gate runs: the gate compared the
    candidate with v1, so nothing is registered or rolled out against v2."""
    registry = Registry(db)
    moved = asyncio.Event()

    async def answer(body: dict[str, Any]) -> str:
        orders = user_text(body).split("by order ")[1:]
        rid = orders[-1].split(".")[0] if orders else ""
        if rid and not moved.is_set() and split_of(rid, "promptd", 0.4, 0.3) == "test":
            moved.set()
            other = "Name the city.\nMessage: {text}\nCity:"
            await registry.register(PROMPT, NewVersion(template=other, activate=True))
        return responder(body)

    fake = await fake_llm(answer)
    rollouts = FakeRollouts()
    run = await run_once(make_runner(db, runner_settings(fake), rollouts), ["fewshot"])
    assert (run["status"], run["outcome"]) == ("completed", "parent_changed"), run["error"]
    assert run["gate"]["passed"]
    assert "city: v1 -> v2" in run["error"]
    assert run["deployed_version"] is None
    assert rollouts.started == []
    assert [v.version for v in await registry.versions(PROMPT)] == ["v1", "v2"]


class RefusingRegistry(Registry):
    """Refuses every version the optimizer registers."""

    async def register(self, name: str, body: NewVersion) -> PromptVersion:
        """Humans' versions only."""
        if body.origin.startswith("optimizer:"):
            raise RegistryError("the registry is read-only for the optimizer today")
        return await super().register(name, body)


async def test_a_gate_pass_is_the_strategys_success_even_when_registration_fails(
    db: Database, fake_llm: Callable[..., Any], tmp_path: Path
) -> None:
    """For a prompt and a pipeline alike: the gate passed, the registry refused the
    version; the run ends as register_failed and the bandit counts the gate's success."""
    fake = await fake_llm()
    runner = make_runner(db, runner_settings(fake), registry=RefusingRegistry(db))
    run = await run_once(runner, ["fewshot"])
    assert (run["outcome"], run["gate"]["passed"]) == ("register_failed", True)
    assert "read-only" in run["error"]
    outcomes = await OptimizationStore(db).outcomes()
    assert [(o.strategy, o.successes, o.failures) for o in outcomes] == [("fewshot", 1.0, 0.0)]

    pipe_db = await Database.open(tmp_path / "pipe.db")
    pipe_fake = await fake_llm(pipeline_responder)
    try:
        runner, rollouts = await _pipeline_runner(pipe_db, pipe_fake, RefusingRegistry(pipe_db))
        run = await run_once(runner, None, prompt="geo")
        assert (run["outcome"], run["gate"]["passed"]) == ("register_failed", True)
        assert rollouts.pipelines == []
        outcomes = await OptimizationStore(pipe_db).outcomes()
        assert [(o.strategy, o.successes, o.failures) for o in outcomes] == [
            ("instruction", 1.0, 0.0)
        ]
    finally:
        await pipe_db.close()


async def test_a_runs_budget_is_its_own_within_the_configured_maximum(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """A manual run asks for less than the configured budget and keeps to it; asking for
    more is refused (422) naming the setting."""
    fake = await fake_llm()
    runner = make_runner(db, runner_settings(fake, max_llm_calls=400))
    with pytest.raises(RunError) as err:
        await runner.start_manual(PROMPT, ["fewshot"], "x", BudgetRequest(max_llm_calls=401))
    assert err.value.status == 422
    assert "optimization.max_llm_calls = 400" in str(err.value)
    _d, run_id = await runner.start_manual(
        PROMPT, ["fewshot"], "x", BudgetRequest(max_llm_calls=120)
    )
    await runner.wait_idle()
    run = await runner.get_run(run_id)
    assert run is not None
    assert run["target"]["budget"]["llm_calls"] == 120
    assert 0 < run["llm_calls"] <= 120
    assert "llm_calls budget spent" in run["error"]


async def test_every_trial_is_in_the_run_mipro_minibatches_included(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """The run's record lists every scoring: mipro's minibatch trials with the choice
    each tried, and the candidates' validation scores."""
    fake = await fake_llm()
    run = await run_once(make_runner(db, runner_settings(fake)), ["mipro"])
    trials = run["progress"]["trials"]
    minibatch = [t for t in trials if t["kind"] == "minibatch"]
    assert len(minibatch) == 4
    assert all(t["strategy"] == "mipro" and t["n"] == 8 for t in minibatch)
    assert {"instruction", "demo_set"} <= set(minibatch[0]["details"])
    validation = [t for t in trials if t["kind"] == "validation"]
    assert len(validation) == len(run["candidates"])


async def test_gepa_shows_its_candidates_and_calls_while_it_runs(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """While gepa searches, the run's row already lists gepa's evaluations (with the
    instruction each tried) and its paid calls."""

    async def slow(body: dict[str, Any]) -> str:
        await asyncio.sleep(0.02)
        return responder(body)

    fake = await fake_llm(slow)
    settings = runner_settings(fake, gepa={"max_metric_calls": 80})
    runner = make_runner(db, settings)
    _d, run_id = await runner.start_manual(PROMPT, ["gepa"], "test")

    async def live() -> dict[str, Any] | None:
        run = await runner.get_run(run_id)
        assert run is not None
        trials = (run["progress"] or {}).get("trials") or []
        if run["status"] == "running" and any(t["kind"] == "gepa" for t in trials):
            return run
        assert run["status"] == "running", "gepa ended before showing any progress"
        return None

    seen = await wait_for(live, timeout=60)
    assert seen["llm_calls"] > 0
    assert seen["phase"] == "search"
    gepa_trial = next(t for t in seen["progress"]["trials"] if t["kind"] == "gepa")
    assert gepa_trial["details"]["instruction"]
    await runner.wait_idle()
    done = await runner.get_run(run_id)
    assert done is not None
    assert done["status"] == "completed", done["error"]
    assert done["llm_calls"] > seen["llm_calls"]
