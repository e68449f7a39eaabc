"""The optimization loop through the real daemon: broker, SQLite, HTTP, litellm over HTTP
to the scripted model, and the real rollout controller."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from promptd.events import FeedbackEvent, MetricEvent, new_event_id
from promptd.monitoring.triggers import OptimizationTrigger
from promptd.replacement.registry import NewVersion
from tests.conftest import wait_for
from tests.kafka_helpers import produce, read_all
from tests.optimize_fake_llm import FakeLLM, serving
from tests.optimize_task import TEMPLATE, responder, rows

pytestmark = pytest.mark.integration

PROMPT = "city"
TOKEN = "test-admin-token-0123"


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    """The scripted model and proposer."""
    async with serving(responder) as server:
        yield server


def _settings(make_settings: Any, fake: FakeLLM, **optimization: Any) -> Any:
    model = {"model": "openai/test-model", "api_base": fake.api_base, "temperature": 0.0}
    return make_settings(
        http={"admin_token": TOKEN},
        # The test sends the trigger itself once every example is stored: a feedback-volume
        # trigger half-way through ingestion would start a run on a part of them.
        monitoring={"feedback_volume_threshold": 1_000_000_000},
        optimization={
            "strategies": ["fewshot", "instruction"],
            "proposer": model,
            "evaluation": {"model": model, "metric": "token_f1", "bootstrap_samples": 1000},
            "fewshot": {"num_candidates": 3},
            "instruction": {"n_candidates": 2, "depth": 1},
            "retry_backoff_s": 0.01,
            "schedule_check_interval_s": 3600,
            **optimization,
        },
    )


async def _publish(bootstrap: str, settings: Any, n: int) -> None:
    """Captured calls with chatty answers, low ratings, every other one corrected."""
    now = time.time()
    metrics, feedback = [], []
    for i, r in enumerate(rows(n)):
        metrics.append(
            MetricEvent(
                event_id=new_event_id(),
                ts=now - 600 + i * 0.01,
                prompt=PROMPT,
                variant="v1",
                model="m",
                request_id=r.request_id,
                latency_ms=10.0,
                success=True,
                input=r.input,
                output=r.output,
            ).to_json()
        )
        feedback.append(
            FeedbackEvent(
                event_id=new_event_id(),
                ts=now - 300 + i * 0.01,
                prompt=PROMPT,
                variant="v1",
                request_id=r.request_id,
                score=r.scores[0],
                kind="quality",
                correction=r.correction,
            ).to_json()
        )
    await produce(bootstrap, settings.kafka.metrics_topic, metrics, key=PROMPT.encode())
    await produce(bootstrap, settings.kafka.feedback_topic, feedback, key=PROMPT.encode())


async def _count(daemon: Any, table: str) -> int:
    async with daemon.db.reader.execute(
        f"SELECT count(*) FROM {table} WHERE prompt = ?", (PROMPT,)
    ) as cur:
        row = await cur.fetchone()
    return int(row[0])


async def _finished_runs(runner: Any) -> list[dict[str, Any]] | None:
    runs = await runner.list_runs()
    return runs if runs and runs[0]["status"] != "running" else None


async def test_degradation_trigger_gates_and_rolls_out_requiring_a_win(
    make_settings: Any, start_daemon: Any, broker: Any, fake_llm: FakeLLM
) -> None:
    """Degraded production feedback + trigger: the bandit picks a strategy, the search finds
    a better template on validation, the gate confirms it on test, and a rollout that
    promotes only on a significant online win starts. A second trigger meets the cooldown."""
    settings = _settings(make_settings, fake_llm)
    running = await start_daemon(settings)
    daemon = running.daemon
    registry = daemon.components["registry"]
    active = await registry.register(PROMPT, NewVersion(template=TEMPLATE))
    await _publish(broker.bootstrap_servers, settings, 240)
    await wait_for(lambda: _stored(daemon, 240), timeout=30)

    queue = daemon.components["optimization_triggers"]
    queue.put(OptimizationTrigger(PROMPT, "degradation", time.time(), "feedback score -40%"))
    runner = daemon.components["optimizer"]
    [run] = await wait_for(lambda: _finished_runs(runner), timeout=60)
    assert (run["status"], run["outcome"]) == ("completed", "deployed"), run["error"]
    assert run["selection"]["method"] == "thompson"
    assert run["gate"]["passed"]
    assert run["gate"]["ci_low"] > 0
    version = await registry.get_version(PROMPT, run["deployed_version"])
    assert version.origin == f"optimizer:{run['selection']['strategy']}"
    assert version.parent_version == active.version
    rollouts = daemon.components["rollouts"]
    assert PROMPT in rollouts.live_prompts()
    described = await rollouts.describe(run["rollout_id"])
    assert described["require_win"] is True

    queue.put(OptimizationTrigger(PROMPT, "degradation", time.time(), "still degraded"))
    sample = {"kind": "degradation", "decision": "cooldown"}
    await wait_for(
        lambda: daemon.registry.get_sample_value("promptd_optimization_triggers_total", sample),
        timeout=10,
    )
    assert len(await runner.list_runs()) == 1

    records = await read_all(broker.bootstrap_servers, settings.kafka.optimization_topic, 4)
    names = [json.loads(r.value)["event"] for r in records]
    assert names[0] == "optimization_start"
    assert {"candidate_evaluated", "gate_decided", "optimization_complete"} <= set(names)


async def _stored(daemon: Any, n: int) -> bool:
    # Both topics: they are consumed independently, and an example needs its call.
    return (
        await _count(daemon, "metric_events") >= n and await _count(daemon, "feedback_events") >= n
    )


async def test_manual_route_validates_strategies_and_lists_runs(
    make_settings: Any, start_daemon: Any, fake_llm: FakeLLM
) -> None:
    """POST /v1/optimize/{prompt}: 401 without token, 404 unknown prompt, 400 unknown
    strategy, 422 a strategy that cannot run; 202 starts a run; GET lists it with its
    strategy choice and the bandit's view of each strategy."""
    settings = _settings(make_settings, fake_llm, proposer=None)
    running = await start_daemon(settings, ready=False)
    registry = running.daemon.components["registry"]
    await registry.register("classify", NewVersion(template="Classify {text}."))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(running.url) as http:
        async with http.post("/v1/optimize/classify") as resp:
            assert resp.status == 401
        async with http.post("/v1/optimize/nope", headers=auth) as resp:
            assert resp.status == 404
        async with http.post(
            "/v1/optimize/classify", json={"strategies": ["nope"]}, headers=auth
        ) as resp:
            assert resp.status == 400
            assert "known" in (await resp.json())["error"]
        async with http.post(
            "/v1/optimize/classify", json={"strategies": ["instruction"]}, headers=auth
        ) as resp:
            assert resp.status == 422
            assert "no proposer model" in (await resp.json())["error"]
        too_much = {"strategies": ["fewshot"], "budget": {"max_llm_calls": 100_000}}
        async with http.post("/v1/optimize/classify", json=too_much, headers=auth) as resp:
            assert resp.status == 422
            answer = await resp.json()
            assert answer["reason"] == "budget_too_large"
            assert "optimization.max_llm_calls = 400" in answer["error"]
        bad = {"budget": {"max_cost_usd": -1}}
        async with http.post("/v1/optimize/classify", json=bad, headers=auth) as resp:
            assert resp.status == 400
            assert "budget.max_cost_usd" in (await resp.json())["error"]
        body = {
            "strategies": ["fewshot"],
            "reason": "operator asked",
            "budget": {"max_llm_calls": 50, "timeout_minutes": 2},
        }
        async with http.post("/v1/optimize/classify", json=body, headers=auth) as resp:
            assert resp.status == 202
            started = await resp.json()
            run_id = started["run_id"]
        assert started["budget"]["llm_calls"] == 50
        assert started["budget"]["timeout_s"] == 120
        assert "warning" not in started

        async def finished() -> dict[str, Any] | None:
            async with http.get(f"/v1/optimizations/{run_id}") as r:
                run = await r.json()
            return run if run["status"] != "running" else None

        run = await wait_for(finished, timeout=30)
        # No production examples: nothing to search on, nothing deploys.
        assert (run["status"], run["outcome"]) == ("completed", "not_enough_examples")
        assert run["selection"]["method"] == "manual"
        async with http.get("/v1/optimizations", params={"prompt": "classify"}) as resp:
            listed = await resp.json()
        assert run_id in [r["id"] for r in listed["runs"]]
        assert listed["strategies"]["fewshot"]["available"] is True
        assert listed["strategies"]["instruction"]["available"] is False
        async with http.get("/v1/recommendations") as resp:
            assert resp.status == 200
            assert "recommendations" in await resp.json()


async def test_a_run_without_an_evaluation_model_says_its_candidate_goes_unscored(
    make_settings: Any, start_daemon: Any
) -> None:
    """Without an evaluation model, starting a run answers with a one-line warning naming
    the setting that would score the candidate before it reaches traffic."""
    settings = make_settings(
        http={"admin_token": TOKEN}, optimization={"schedule_check_interval_s": 3600}
    )
    running = await start_daemon(settings, ready=False)
    registry = running.daemon.components["registry"]
    await registry.register("classify", NewVersion(template="Classify {text}."))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession(running.url) as http,
        http.post("/v1/optimize/classify", json={}, headers=auth) as resp,
    ):
        assert resp.status == 202
        warning = (await resp.json())["warning"]
    assert "\n" not in warning
    assert "[optimization.evaluation.model]" in warning
    assert "unscored" in warning or "not be scored" in warning
