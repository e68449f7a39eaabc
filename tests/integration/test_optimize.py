"""The optimization loop end to end: real broker, daemon, SQLite, and litellm over HTTP."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from promptd.events import FeedbackEvent, MetricEvent, new_event_id
from promptd.monitoring.triggers import OptimizationTrigger
from promptd.optimization.llm import close_litellm
from promptd.replacement.registry import NewVersion
from tests.conftest import wait_for
from tests.kafka_helpers import produce, read_all
from tests.optimize_fake_llm import FakeLLM, user_text

pytestmark = pytest.mark.integration

PROMPT = "summarize"
TOKEN = "test-admin-token-0123"
BETTER = "CONCISE. Summarize {document}."


def _model(body: dict[str, Any]) -> str:
    """Proposer: prefixes CONCISE to the template; evaluated model: right only under CONCISE."""
    text = user_text(body)
    if "expert prompt engineer" in text:
        current = re.search(r"<template>\n(.*?)\n</template>", text, re.DOTALL)
        assert current is not None
        proposal = "CONCISE. " + current.group(1)
        return f"<template>{proposal}</template><rationale>ask for concision</rationale>"
    found = re.search(r"doc (\d+)", text)
    return f"summary {found.group(1)}" if found and "CONCISE" in text else "a long ramble"


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    """The local OpenAI-compatible server."""
    server = await FakeLLM(_model).start()
    yield server
    await close_litellm()
    await server.stop()


def _settings(make_settings: Any, fake: FakeLLM) -> Any:
    model = {"model": "openai/test-model", "api_base": fake.api_base, "temperature": 0.0}
    return make_settings(
        http={"admin_token": TOKEN},
        rollout={"time_scale": 0.001},
        optimization={
            "strategies": ["instruction"],
            "proposer": model,
            "instruction": {"n_candidates": 2},
            "evaluation": {
                "model": model,
                "metric": "exact_match",
                "held_out_size": 10,
                "bootstrap_samples": 500,
            },
            "retry_backoff_s": 0.01,
            "schedule_check_interval_s": 3600,
        },
    )


async def _publish_degraded(bootstrap: str, settings: Any, n: int) -> None:
    """Captured calls with bad answers, poor scores and the right answer as correction."""
    now = time.time()
    metrics, feedback = [], []
    for i in range(n):
        rid = f"req-{i}"
        metrics.append(
            MetricEvent(
                event_id=new_event_id(),
                ts=now - 60 + i * 0.01,
                prompt=PROMPT,
                variant="v1",
                model="m",
                request_id=rid,
                latency_ms=10.0,
                success=True,
                input={"document": f"doc {i}"},
                output="a long ramble",
            ).to_json()
        )
        feedback.append(
            FeedbackEvent(
                event_id=new_event_id(),
                ts=now - 30 + i * 0.01,
                prompt=PROMPT,
                variant="v1",
                request_id=rid,
                score=0.1,
                comment="too long",
                correction=f"summary {i}",
            ).to_json()
        )
    await produce(bootstrap, settings.kafka.metrics_topic, metrics, key=PROMPT.encode())
    await produce(bootstrap, settings.kafka.feedback_topic, feedback, key=PROMPT.encode())


async def _feedback_stored(daemon: Any) -> int:
    async with daemon.db.reader.execute(
        "SELECT count(*) FROM feedback_events WHERE prompt = ?", (PROMPT,)
    ) as cur:
        row = await cur.fetchone()
    return int(row[0])


async def test_degradation_trigger_runs_registers_and_rolls_out_then_cools_down(
    make_settings: Any, start_daemon: Any, broker: Any, fake_llm: FakeLLM
) -> None:
    """Degraded feedback + trigger → run → gated candidate registered and rolled out; cooldown."""
    settings = _settings(make_settings, fake_llm)
    running = await start_daemon(settings)
    daemon = running.daemon
    registry = daemon.components["registry"]
    active = await registry.register(PROMPT, NewVersion(template="Summarize {document}."))
    await _publish_degraded(broker.bootstrap_servers, settings, 30)
    await wait_for(lambda: _feedback_stored(daemon), timeout=20)
    await wait_for(lambda: _stored_all(daemon, 30), timeout=20)

    queue = daemon.components["optimization_triggers"]
    queue.put(OptimizationTrigger(PROMPT, "degradation", time.time(), "feedback score -40%"))
    runner = daemon.components["optimizer"]
    runs = await wait_for(lambda: _finished_runs(runner), timeout=20)
    run = runs[0]
    assert (run["status"], run["outcome"]) == ("completed", "deployed"), run
    version = await registry.get_version(PROMPT, run["deployed_version"])
    assert version.template == BETTER
    assert version.origin == "optimizer:instruction"
    assert version.parent_version == active.version
    assert PROMPT in daemon.components["rollouts"].live_prompts()
    assert run["candidates"][0]["confidence"] >= 0.8
    assert run["llm_calls"] > 0

    # A second degradation trigger during the cooldown starts nothing.
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
    assert {"candidate_generated", "candidate_evaluated", "optimization_complete"} <= set(names)


async def _stored_all(daemon: Any, n: int) -> bool:
    return await _feedback_stored(daemon) >= n


async def _finished_runs(runner: Any) -> list[dict[str, Any]] | None:
    runs = await runner.list_runs()
    return runs if runs and runs[0]["status"] != "running" else None


async def test_manual_route_starts_a_run_and_lists_it(
    make_settings: Any, start_daemon: Any, fake_llm: FakeLLM
) -> None:
    """POST /v1/optimize/{prompt} needs the admin token, starts a run; GET lists it."""
    running = await start_daemon(_settings(make_settings, fake_llm), ready=False)
    registry = running.daemon.components["registry"]
    await registry.register("classify", NewVersion(template="Classify {text}."))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(running.url) as http:
        async with http.post("/v1/optimize/classify") as resp:
            assert resp.status == 401
        async with http.post("/v1/optimize/nope", headers=auth) as resp:
            assert resp.status == 404
        body = {"strategies": ["instruction"], "reason": "operator asked"}
        async with http.post("/v1/optimize/classify", json=body, headers=auth) as resp:
            assert resp.status == 202
            run_id = (await resp.json())["run_id"]
        async with http.post("/v1/optimize/classify", json=body, headers=auth) as resp:
            assert resp.status in (202, 409)  # 409 while the first run is still going

        async def finished() -> dict[str, Any] | None:
            async with http.get(f"/v1/optimizations/{run_id}") as r:
                run = await r.json()
            return run if run["status"] != "running" else None

        run = await wait_for(finished, timeout=20)
        # No production examples yet: the candidate cannot be validated, nothing deploys.
        assert (run["status"], run["outcome"]) == ("completed", "no_candidate")
        assert run["trigger_kind"] == "manual"
        assert run["candidates"][0]["status"] == "not_evaluated"
        async with http.get("/v1/optimizations", params={"prompt": "classify"}) as resp:
            listed = (await resp.json())["runs"]
        assert run_id in [r["id"] for r in listed]
        async with http.get("/v1/recommendations") as resp:
            assert resp.status == 200
            assert "recommendations" in await resp.json()
