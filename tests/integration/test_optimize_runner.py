"""The optimization runner on a real SQLite file and litellm over HTTP (no broker)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from promptd.daemon.optimize_config import OptimizationSettings
from promptd.daemon.optimize_llm import close_litellm
from promptd.daemon.optimize_runner import OptimizationMetrics, OptimizationRunner
from promptd.monitoring.triggers import OptimizationTrigger
from promptd.replacement.registry import NewVersion, Registry
from promptd.storage.database import Database
from tests.optimize_fake_llm import FakeLLM
from tests.optimize_helpers import Row, seed

pytestmark = pytest.mark.integration


class FakeRollouts:
    """Records rollout starts instead of running them."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str, str | None]] = []

    def live_prompts(self) -> set[str]:
        """Prompts with a started rollout."""
        return {p for p, _, _ in self.started}

    async def start_rollout(
        self, prompt: str, candidate: str, profile: str | None = None, primary_metric: str = ""
    ) -> Any:
        """Remember the start."""
        self.started.append((prompt, candidate, profile))
        return type("Rollout", (), {"id": f"ro-{len(self.started)}"})()


def boom(prediction: str, reference: str, example: Any) -> float:
    """A user metric that fails (the run must record it and survive)."""
    raise RuntimeError("metric exploded")


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Database, Registry]]:
    """A database with prompt ``p`` and 20 rated examples."""
    db = await Database.open(tmp_path / "opt.db")
    registry = Registry(db)
    await registry.register("p", NewVersion(template="Summarize {document}."))
    rows = [Row(f"r{i}", {"document": f"doc {i}"}, f"out {i}", (0.9,)) for i in range(20)]
    await seed(db, "p", rows)
    yield db, registry
    await close_litellm()
    await db.close()


def _runner(
    db: Database, registry: Registry, rollouts: FakeRollouts, **settings: Any
) -> tuple[OptimizationRunner, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    async def publish(event: dict[str, Any]) -> None:
        events.append(event)

    runner = OptimizationRunner(
        db,
        registry,
        rollouts,
        OptimizationSettings(**settings),
        OptimizationMetrics(CollectorRegistry()),
        publish,
    )
    return runner, events


def _trigger(kind: str = "degradation") -> OptimizationTrigger:
    return OptimizationTrigger("p", kind, time.time(), "test")  # type: ignore[arg-type]


async def test_fewshot_without_eval_model_goes_to_conservative_rollout(
    env: tuple[Database, Registry],
) -> None:
    """No evaluation model + conservative_rollout: the candidate is registered and rolled out."""
    db, registry = env
    rollouts = FakeRollouts()
    runner, events = _runner(db, registry, rollouts, strategies=("fewshot",))
    await runner.resume()
    decision, run_id = await runner.submit(_trigger())
    assert decision.run
    await runner.wait_idle()
    run = await runner.get_run(str(run_id))
    assert run is not None
    assert (run["status"], run["outcome"]) == ("completed", "deployed")
    version = await registry.get_version("p", run["deployed_version"])
    assert version.origin == "optimizer:fewshot"
    assert version.run_id == run_id
    assert rollouts.started == [("p", version.version, "conservative")]
    assert events[0]["event"] == "optimization_start"
    assert events[-1]["event"] == "optimization_complete"
    assert {"candidate_generated", "candidate_evaluated"} <= {e["event"] for e in events}


async def test_timeout_stops_a_run_cleanly(env: tuple[Database, Registry]) -> None:
    """A proposer slower than the run timeout ends the run as timed_out, recorded."""
    db, registry = env

    async def slow(body: dict[str, Any]) -> str:
        await asyncio.sleep(2)
        return "<template>x {document}</template>"

    fake = await FakeLLM(slow).start()
    try:
        runner, events = _runner(
            db,
            registry,
            FakeRollouts(),
            strategies=("instruction",),
            proposer={
                "model": "openai/test-model",
                "api_base": fake.api_base,
                "request_timeout_s": 0.5,
            },
            optimization_timeout_minutes=0.005,
            max_retries=0,
        )
        await runner.resume()
        _, run_id = await runner.submit(_trigger("manual"))
        await asyncio.wait_for(runner.wait_idle(), 5)
        await close_litellm()
    finally:
        await fake.stop()
    run = await runner.get_run(str(run_id))
    assert run is not None
    assert run["status"] == "timed_out"
    assert "timed out" in run["error"]
    assert "p" not in runner.state.running
    assert events[-1]["status"] == "timed_out"


async def test_failed_run_is_recorded_and_policy_state_survives_restart(
    env: tuple[Database, Registry],
) -> None:
    """A crashing metric fails the run with its error; a restart keeps the cooldown."""
    db, registry = env

    fake = await FakeLLM(lambda body: "some answer").start()
    try:
        runner, _ = _runner(
            db,
            registry,
            FakeRollouts(),
            strategies=("fewshot",),
            evaluation={
                "model": {"model": "openai/test-model", "api_base": fake.api_base},
                "metric": "tests.integration.test_optimize_runner:boom",
            },
        )
        await runner.resume()
        _, run_id = await runner.submit(_trigger())
        await runner.wait_idle()
    finally:
        await fake.stop()
    run = await runner.get_run(str(run_id))
    assert run is not None
    assert run["status"] == "failed"
    assert "metric exploded" in run["error"]
    assert run["llm_calls"] > 0

    # A run left 'running' by a crash is marked interrupted; the cooldown is remembered.
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO optimization_runs (id, prompt, trigger_kind, trigger_reason, "
            "strategies, status, started_at) VALUES ('opt-x', 'q', 'manual', 'x', '[]', "
            "'running', 1)"
        )
    restarted, _ = _runner(db, registry, FakeRollouts())
    await restarted.resume()
    assert (await restarted.get_run("opt-x") or {})["status"] == "interrupted"
    decision, none = await restarted.submit(_trigger())
    assert (decision.reason, none) == ("cooldown", None)
