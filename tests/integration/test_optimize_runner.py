"""The optimization runner on a real SQLite file, litellm over HTTP to the scripted model,
and a recording stand-in for the rollout controller (the daemon tests use the real one)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from promptd.monitoring.triggers import OptimizationTrigger
from promptd.optimization.llm import close_litellm
from promptd.optimization.metrics import OptimizationMetrics
from promptd.optimization.runner import OptimizationRunner
from promptd.optimization.store import OptimizationStore
from promptd.optimization.templates import DEMO_HEADING
from promptd.optimization.tracking import build_tracker
from promptd.replacement.registry import NewVersion, Registry
from promptd.storage.database import Database
from tests.conftest import wait_for
from tests.optimize_fake_llm import FakeLLM, user_text
from tests.optimize_helpers import (
    FakeRollouts,
    PipelineRollouts,
    make_runner,
    no_publish,
    run_once,
    runner_settings,
    seed,
)
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


async def test_a_run_searches_gates_registers_and_rolls_out_requiring_a_win(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """fewshot finds demos on validation, the gate confirms on test, the version is
    registered and its rollout must win online."""
    fake = await fake_llm()
    rollouts = FakeRollouts()
    runner = make_runner(db, runner_settings(fake), rollouts)
    run = await run_once(runner, ["fewshot"])
    assert (run["status"], run["outcome"]) == ("completed", "deployed"), run["error"]
    gate = run["gate"]
    assert gate["passed"]
    assert gate["gain"] > 0.5
    assert gate["ci_low"] > 0
    assert gate["n"] >= 30
    assert run["selection"]["method"] == "manual"
    progress = run["progress"]
    assert progress["baseline_val_mean"] == pytest.approx(2 / 11)
    assert progress["splits"]["test"] == gate["n"]
    chosen = run["candidates"][progress["selected"]]
    assert chosen["val_mean"] == max(c["val_mean"] for c in run["candidates"])
    version = await Registry(db).get_version(PROMPT, run["deployed_version"])
    assert DEMO_HEADING in version.template
    assert version.origin == "optimizer:fewshot"
    assert "gate: gain" in (version.rationale or "")
    assert rollouts.started == [
        {
            "id": "ro-1",
            "prompt": PROMPT,
            "candidate": version.version,
            "profile": None,
            "require_win": True,
        }
    ]
    outcomes = await OptimizationStore(db).outcomes()
    assert [(o.strategy, o.successes, o.failures) for o in outcomes] == [("fewshot", 1.0, 0.0)]


async def test_the_test_split_never_reaches_the_search(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """No request during the search renders a test-split input; the gate does."""
    fake = await fake_llm()
    runner = make_runner(db, runner_settings(fake))
    run = await run_once(runner, ["instruction"])
    assert run["outcome"] == "deployed"
    from promptd.optimization.examples import split_of

    def split_name(body: dict[str, Any]) -> str | None:
        orders = list(user_text(body).split("by order ")[1:])
        if not orders:
            return None
        rid = orders[-1].split(".")[0]
        return split_of(rid, "promptd", 0.4, 0.3)

    names = [split_name(b) for b in fake.requests]
    first_test = names.index("test")
    gate_phase = names[first_test:]
    assert all(n in ("test", None) for n in gate_phase)
    assert "test" not in names[:first_test]


async def test_a_no_better_search_ends_without_gate_or_registration(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """When no candidate beats the active version on validation, nothing is gated or
    registered, and the strategy's failure is recorded for the bandit."""
    fake = await fake_llm(lambda body: "same answer whatever the prompt")
    rollouts = FakeRollouts()
    run = await run_once(make_runner(db, runner_settings(fake), rollouts), ["fewshot"])
    assert run["outcome"] == "no_improvement_on_validation"
    assert run["gate"] is None
    assert run["deployed_version"] is None
    assert rollouts.started == []
    assert [(o.successes, o.failures) for o in await OptimizationStore(db).outcomes()] == [
        (0.0, 1.0)
    ]


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_a_budget_stops_the_search_but_keeps_the_gate(
    db: Database, fake_llm: Callable[..., Any], concurrency: int
) -> None:
    """A small call budget ends the search early, mid-candidate; the calls queued behind
    the spent budget are cancelled, so the reserve still pays for the whole gate."""
    fake = await fake_llm()
    settings = runner_settings(
        fake, max_llm_calls=200, fewshot={"num_candidates": 20}, max_concurrency=concurrency
    )
    run = await run_once(make_runner(db, settings), ["fewshot"])
    assert run["outcome"] == "deployed", run["error"]
    assert run["gate"] is not None
    assert "llm_calls budget spent" in run["error"]
    assert run["llm_calls"] <= 200
    assert len(fake.requests) <= 200


async def test_too_few_examples_is_an_outcome_with_a_reason(
    tmp_path: Path, fake_llm: Callable[..., Any]
) -> None:
    """A prompt with a handful of corrected calls ends as not_enough_examples."""
    fake = await fake_llm()
    db = await Database.open(tmp_path / "few.db")
    try:
        await Registry(db).register(PROMPT, NewVersion(template=TEMPLATE))
        await seed(db, PROMPT, rows(20))
        run = await run_once(make_runner(db, runner_settings(fake)), ["fewshot"])
        assert run["outcome"] == "not_enough_examples"
        assert "need 5 and 30" in run["error"]
        assert fake.requests == []
    finally:
        await db.close()


async def test_triggered_runs_choose_their_strategy_and_say_why(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """A trigger's run gets its strategy from the bandit; the row shows the draws."""
    fake = await fake_llm()
    runner = make_runner(db, runner_settings(fake))
    decision, run_id = await runner.submit(OptimizationTrigger(PROMPT, "degradation", 0.0, "drop"))
    assert decision.run
    assert run_id is not None
    await runner.wait_idle()
    run = await runner.get_run(run_id)
    assert run is not None
    selection = run["selection"]
    assert selection["method"] == "thompson"
    assert set(selection["draws"]) == {"fewshot", "instruction", "mipro"}
    assert run["strategies"] == [selection["strategy"]]
    assert "posterior draw" in selection["reason"]


async def test_unavailable_strategies_are_skipped_or_refused(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """Without a proposer only fewshot can run; asking for instruction is refused (422)."""
    fake = await fake_llm()
    settings = runner_settings(fake, proposer=None)
    runner = make_runner(db, settings)
    _decision, run_id = await runner.submit(OptimizationTrigger(PROMPT, "degradation", 0.0, "x"))
    await runner.wait_idle()
    run = await runner.get_run(run_id or "")
    assert run is not None
    assert run["selection"]["strategy"] == "fewshot"
    assert run["selection"]["method"] == "only_one"
    from promptd.optimization.runner import RunError

    with pytest.raises(RunError) as err:
        await runner.start_manual(PROMPT, ["instruction"], "x")
    assert err.value.status == 422
    assert "no proposer model" in str(err.value)


async def test_without_an_evaluation_model_the_rollout_is_the_judge(
    db: Database,
) -> None:
    """No evaluation model: fewshot proposes unscored, a conservative rollout that must
    win decides, and the run record says in its first note that the candidate is
    unscored and which setting would score it."""
    rejecting = runner_settings(None, without_evaluation="reject")
    run = await run_once(make_runner(db, rejecting, FakeRollouts()), ["fewshot"])
    assert run["outcome"] == "rejected_without_evaluation"
    rollouts = FakeRollouts()
    run = await run_once(make_runner(db, runner_settings(None), rollouts), ["fewshot"])
    assert (run["outcome"], run["gate"]) == ("deployed", None)
    assert rollouts.started[0]["profile"] == "conservative"
    assert rollouts.started[0]["require_win"] is True
    assert run["progress"]["unscored"] is True
    first = run["progress"]["notes"][0]
    assert "unscored" in first
    assert "[optimization.evaluation.model]" in first
    assert run["error"].startswith(first)
    assert run["candidates"][0]["val_mean"] is None
    # The registered proposal is not proposed again by the next run.
    again = await run_once(make_runner(db, runner_settings(None), FakeRollouts()), ["fewshot"])
    assert again["outcome"] == "no_candidate"
    assert again["discarded"] == {"fewshot:duplicate": 1}


async def test_online_results_teach_the_bandit_once(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """An optimizer rollout that is promoted adds online successes, once."""
    fake = await fake_llm()
    rollouts = FakeRollouts()
    runner = make_runner(db, runner_settings(fake), rollouts)
    await run_once(runner, ["fewshot"])
    await runner.learn_online()
    assert len(await OptimizationStore(db).outcomes()) == 1  # still running: nothing yet
    rollouts.status["ro-1"] = "promoted"
    await runner.learn_online()
    await runner.learn_online()
    outcomes = await OptimizationStore(db).outcomes()
    assert [(o.successes, o.failures) for o in outcomes] == [(2.0, 0.0)]


async def test_a_stopped_run_resumes_without_paying_twice(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """A run cut short mid-search (daemon stop) stays 'running'; a new runner resumes it
    from its plan, every finished call comes from the cache, and it ends as the
    uninterrupted run would."""
    gate_open = asyncio.Event()
    calls: list[str] = []

    async def slow(body: dict[str, Any]) -> str:
        calls.append(json.dumps(body["messages"], sort_keys=True))
        if len(calls) > 60:
            await gate_open.wait()
        return responder(body)

    fake = await fake_llm(slow)
    settings = runner_settings(fake, max_concurrency=1)
    first = make_runner(db, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(first.run(stop, asyncio.Queue()))
    _d, run_id = await first.start_manual(PROMPT, ["mipro"], "test")
    await wait_for(lambda: len(calls) > 60, timeout=30)
    stop.set()
    await asyncio.wait_for(task, 10)
    row = await OptimizationStore(db).get_run(run_id)
    assert row is not None
    assert row["status"] == "running"
    assert row["phase"] == "search"
    paid_before = len(calls) - 1  # the last one was in flight, never answered
    gate_open.set()

    second = make_runner(db, settings)
    await second.resume()
    stop2 = asyncio.Event()
    task2 = asyncio.create_task(second.run(stop2, asyncio.Queue()))
    done = await wait_for(lambda: _finished(second, run_id), timeout=60)
    stop2.set()
    await asyncio.wait_for(task2, 10)
    assert done["status"] == "completed", done["error"]
    assert done["resumes"] == 1
    repeated = [c for c, n in Counter(calls).items() if n > 1]
    assert len(repeated) <= 1, "only the call in flight at the stop may be repeated"
    assert calls[paid_before] in repeated or not repeated
    # Same plan, same answers: the same outcome as a run that was never interrupted.
    assert done["outcome"] == "deployed"
    # Paid calls: every request the model received, the one cut off by the stop included.
    assert done["llm_calls"] == len(calls)


async def _finished(runner: OptimizationRunner, run_id: str) -> dict[str, Any] | None:
    run = await runner.get_run(run_id)
    return run if run is not None and run["status"] != "running" else None


@pytest.mark.parametrize("store", ["sqlite", "file"])
async def test_runs_are_tracked_in_mlflow(
    db: Database,
    fake_llm: Callable[..., Any],
    tmp_path: Path,
    store: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a tracking URI (a local SQLite store, or MLflow's file store when allowed) every
    finished run is an MLflow run with parameters, per-candidate metrics, the templates as
    artifacts and the outcome."""
    import mlflow  # the dev extra installs it: missing, the test fails

    fake = await fake_llm()
    if store == "file":
        # MLflow 3 refuses its file store unless told to accept it.
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (tmp_path / "mlruns").as_uri()
    else:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = runner_settings(fake, tracking={"mlflow_tracking_uri": uri})
    tracker = build_tracker(settings.tracking)
    run = await run_once(make_runner(db, settings, tracker=tracker), ["fewshot"])
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("promptd")
    assert experiment is not None
    [tracked] = client.search_runs([experiment.experiment_id])
    assert tracked.data.tags["promptd.run_id"] == run["id"]
    assert tracked.data.tags["promptd.outcome"] == "deployed"
    assert tracked.data.params["prompt"] == PROMPT
    assert tracked.data.metrics["gate_passed"] == 1.0
    history = client.get_metric_history(tracked.info.run_id, "candidate_val_mean")
    assert len(history) == len(run["candidates"])
    names = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert "baseline.txt" in names
    assert "run.json" in names
    assert any(n.startswith("candidate-000-fewshot") for n in names)
    artifacts = tmp_path / ("mlflow-artifacts" if store == "sqlite" else "mlruns")
    assert artifacts.is_dir(), "artifacts beside the store, not in the working directory"


async def test_a_chat_configuration_gets_demonstrations_as_turns(
    tmp_path: Path, fake_llm: Callable[..., Any]
) -> None:
    """A prompt registered as a chat configuration is optimized as one: the winning
    candidate is a configuration version with user/assistant demonstration turns."""
    fake = await fake_llm()
    db = await Database.open(tmp_path / "chat.db")
    try:
        config = {
            "messages": [
                {"role": "system", "content": "Read the message."},
                {"role": "user", "content": "Message: {text}\nCity:"},
            ],
            "params": {"temperature": 0.0},
        }
        await Registry(db).register(PROMPT, NewVersion.model_validate({"config": config}))
        await seed(db, PROMPT, rows(240))
        run = await run_once(make_runner(db, runner_settings(fake)), ["fewshot"])
        assert run["outcome"] == "deployed", run["error"]
        version = await Registry(db).get_version(PROMPT, run["deployed_version"])
        assert version.config is not None
        roles = [m["role"] for m in version.config["messages"]]
        assert roles[0] == "system"
        assert roles[-1] == "user"
        assert roles.count("assistant") >= 1
        assert version.config["params"] == {"temperature": 0.0}
        assert version.placeholders == ["text"]
    finally:
        await db.close()


async def test_a_trigger_for_a_pipeline_step_optimizes_the_pipeline(tmp_path: Path) -> None:
    """A trigger for one step of a pipeline runs leader/follower on the whole pipeline, the
    gate passes end to end, both steps get versions and one coordinated rollout starts."""
    from promptd.optimization.examples import Snapshot
    from promptd.replacement.pipelines import PipelineRegistry
    from tests.optimize_pipeline_task import ANSWER, EXTRACT, PIPELINE, episodes
    from tests.optimize_pipeline_task import responder as pipeline_responder

    class Episodes:
        async def snapshot(self, now: float) -> Snapshot:
            return Snapshot(now, 0, 0)

        async def episodes(self, pipeline: Any, snapshot: Any) -> list[Any]:
            return episodes(400)

    fake = await FakeLLM(pipeline_responder).start()
    db = await Database.open(tmp_path / "pipe.db")
    try:
        registry = Registry(db)
        await registry.register("extract", NewVersion(template=EXTRACT))
        await registry.register("answer", NewVersion(template=ANSWER))
        pipelines = PipelineRegistry(db, registry)
        await pipelines.register(PIPELINE.to_dict())
        rollouts = PipelineRollouts()
        settings = runner_settings(fake, strategies=["instruction", "gepa"], max_llm_calls=5000)
        runner = OptimizationRunner(
            db,
            registry,
            rollouts,
            settings,
            OptimizationMetrics(CollectorRegistry()),
            publish=no_publish,
            pipelines=pipelines,
            episodes=Episodes(),
        )
        decision, run_id = await runner.submit(
            OptimizationTrigger("answer", "degradation", 0.0, "answers got worse")
        )
        assert decision.run
        await runner.wait_idle()
        run = await runner.get_run(run_id or "")
        assert run is not None
        assert run["prompt"] == "geo"
        assert (run["status"], run["outcome"]) == ("completed", "deployed"), run["error"]
        assert run["selection"]["strategy"] == "instruction"  # gepa is not for pipelines
        assert run["target"]["kind"] == "pipeline"
        assert run["progress"]["equilibrium"]["stable"] is True
        assert run["gate"]["passed"]
        [rollout] = rollouts.pipelines
        assert set(rollout["candidates"]) == {"extract", "answer"}
        assert rollout["require_win"] is True
        version = await registry.get_version("answer", rollout["candidates"]["answer"])
        assert version.origin == "optimizer:pipeline:instruction"
        again, _ = await runner.submit(OptimizationTrigger("extract", "degradation", 0.0, "x"))
        assert again.reason in ("cooldown", "rollout_in_progress")
    finally:
        await close_litellm()
        await fake.stop()
        await db.close()


async def test_a_stopped_pipeline_run_resumes_from_its_row(tmp_path: Path) -> None:
    """A pipeline run cut short resumes from its plan (pipeline, versions, strategy,
    seed): it asks exactly what an uninterrupted run asks, plus at most the call that was
    in flight at the stop."""
    from promptd.optimization.examples import Snapshot
    from promptd.replacement.pipelines import PipelineRegistry
    from tests.optimize_pipeline_task import ANSWER, EXTRACT, PIPELINE, episodes
    from tests.optimize_pipeline_task import responder as pipeline_responder

    class Episodes:
        async def snapshot(self, now: float) -> Snapshot:
            return Snapshot(now, 0, 0)

        async def episodes(self, pipeline: Any, snapshot: Any) -> list[Any]:
            return episodes(400)

    async def one_run(name: str, stop_after: int | None) -> tuple[dict[str, Any], Counter[str]]:
        gate_open = asyncio.Event()
        calls: list[str] = []

        async def answer(body: dict[str, Any]) -> str:
            calls.append(json.dumps(body["messages"], sort_keys=True))
            if stop_after is not None and len(calls) > stop_after:
                await gate_open.wait()
            return pipeline_responder(body)

        fake = await FakeLLM(answer).start()
        db = await Database.open(tmp_path / f"{name}.db")
        try:
            registry = Registry(db)
            await registry.register("extract", NewVersion(template=EXTRACT))
            await registry.register("answer", NewVersion(template=ANSWER))
            pipelines = PipelineRegistry(db, registry)
            await pipelines.register(PIPELINE.to_dict())
            settings = runner_settings(
                fake, strategies=["instruction"], max_llm_calls=5000, max_concurrency=1
            )

            def make() -> OptimizationRunner:
                return OptimizationRunner(
                    db,
                    registry,
                    PipelineRollouts(),
                    settings,
                    OptimizationMetrics(CollectorRegistry()),
                    publish=no_publish,
                    pipelines=pipelines,
                    episodes=Episodes(),
                )

            runner = make()
            stop = asyncio.Event()
            task = asyncio.create_task(runner.run(stop, asyncio.Queue()))
            _d, run_id = await runner.start_manual("geo", None, "test")
            if stop_after is not None:
                await wait_for(lambda: len(calls) > stop_after, timeout=30)
                stop.set()
                await asyncio.wait_for(task, 10)
                gate_open.set()
                runner = make()
                await runner.resume()
                stop = asyncio.Event()
                task = asyncio.create_task(runner.run(stop, asyncio.Queue()))
            done = await wait_for(lambda: _finished(runner, run_id), timeout=60)
            stop.set()
            await asyncio.wait_for(task, 10)
            return done, Counter(calls)
        finally:
            await close_litellm()
            await fake.stop()
            await db.close()

    reference, asked = await one_run("reference", None)
    resumed, asked_resumed = await one_run("resumed", 150)
    assert (resumed["status"], resumed["outcome"], resumed["resumes"]) == (
        "completed",
        "deployed",
        1,
    )
    assert reference["outcome"] == "deployed"
    extra = asked_resumed - asked
    assert sum(extra.values()) <= 1, "only the call in flight at the stop may be asked again"
    assert asked - asked_resumed == Counter()
