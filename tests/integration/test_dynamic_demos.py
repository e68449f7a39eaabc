"""Dynamic few-shot end to end: an SDK app's calls through the real broker fill the pool,
a ``knn`` run registers a version pinning a pool snapshot, the rollout serves each call
its nearest demos, and the calls' events name them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

import promptd
from promptd.daemon.settings import Settings
from promptd.replacement.registry import NewVersion
from tests.conftest import wait_for
from tests.optimize_fake_llm import FakeLLM, serving
from tests.optimize_task import CITIES, responder

pytestmark = pytest.mark.integration

PROMPT = "city"
TOKEN = "test-admin-token-0123"
CONFIG: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "Read the message."},
        {"role": "user", "content": "Message: {text}\nCity:"},
    ]
}
CALLS = 90


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    """The scripted model: chatty alone, the city alone after demonstration turns."""
    async with serving(responder) as server:
        yield server


def _settings(make_settings: Callable[..., Settings], fake: FakeLLM) -> Settings:
    model = {"model": "openai/test-model", "api_base": fake.api_base, "temperature": 0.0}
    return make_settings(
        http={"admin_token": TOKEN},
        monitoring={"feedback_volume_threshold": 1_000_000_000},
        optimization={
            "strategies": ["knn"],
            "proposer": model,
            "evaluation": {"model": model, "metric": "token_f1", "bootstrap_samples": 1000},
            "splits": {"min_test": 10},
            "knn": {
                "k_values": [1, 2],
                "max_distances": [0.9],
                "num_instructions": 1,
                "minibatch_size": 6,
                "top_k_full_eval": 1,
            },
            "retry_backoff_s": 0.01,
            "schedule_check_interval_s": 3600,
        },
    )


class App:
    """The app: one decorated call rendering the served variant's messages."""

    def __init__(self, settings: Settings, daemon_url: str) -> None:
        kafka = settings.kafka
        promptd.configure(
            bootstrap_servers=kafka.bootstrap_servers,
            metrics_topic=kafka.metrics_topic,
            feedback_topic=kafka.feedback_topic,
            daemon_url=daemon_url,
            routing_ttl_s=0.2,
            routing_retry_s=0.5,
            prompts=[PROMPT],
            registry=CollectorRegistry(),
            poll_interval_s=0.01,
        )
        self.served: list[tuple[str, str, list[dict[str, str]], list[str] | None]] = []

        @promptd.instrument(prompt=PROMPT, model="m", inject="variant", capture=True)
        def call(text: str, variant: Any = None) -> str:
            messages = variant.messages(text=text)
            request_id = promptd.last_request_id() or ""
            self.served.append((request_id, variant.version, messages, variant.demo_ids))
            return "The city mentioned in the text is somewhere, I think."

        self.call = call

    def traffic(self, start: int, n: int) -> None:
        """``n`` calls, each corrected by the user."""
        for i in range(start, start + n):
            city = CITIES[i % len(CITIES)]
            self.call(f"Please ship {i + 2} boxes to {city} by order r{i}.")
            request_id = self.served[-1][0]
            promptd.feedback(request_id, 0.2, kind="quality", correction=city)
        assert promptd.flush(10)


async def _stored(daemon: Any, n: int) -> bool:
    async with daemon.db.reader.execute(
        "SELECT count(*) FROM feedback_events WHERE prompt = ?", (PROMPT,)
    ) as cur:
        row = await cur.fetchone()
    return bool(row and row[0] >= n)


async def test_sdk_calls_fill_the_pool_and_a_knn_rollout_serves_per_request_demos(
    make_settings: Callable[..., Settings], start_daemon: Any, fake_llm: FakeLLM
) -> None:
    """Calls and corrections through the broker; a knn run pins a pool of their train
    split and rolls the version out; calls in the candidate arm get demo turns chosen
    for their input, and their stored events carry those demos' ids."""
    settings = _settings(make_settings, fake_llm)
    running = await start_daemon(settings)
    daemon = running.daemon
    await daemon.components["registry"].register(
        PROMPT, NewVersion.model_validate({"config": CONFIG})
    )
    app = await asyncio.to_thread(App, settings, running.url)
    await asyncio.to_thread(app.traffic, 0, CALLS)
    assert {version for _r, version, _m, _d in app.served} == {"v1"}
    await wait_for(lambda: _stored(daemon, CALLS), timeout=30)

    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(running.url, headers=headers) as http:
        # An operator can build a snapshot by hand: the same trusted train split.
        async with http.post(f"/v1/prompts/{PROMPT}/pools", json={}) as resp:
            assert resp.status == 201, await resp.text()
            built = await resp.json()
        assert (built["seq"], built["origin"]) == (1, "manual")
        async with http.post(f"/v1/prompts/{PROMPT}/pools", json={"embedding": True}) as resp:
            assert resp.status == 422  # no embedding model configured: said, not ignored
        async with http.post(f"/v1/optimize/{PROMPT}", json={"strategies": ["knn"]}) as resp:
            assert resp.status == 202, await resp.text()
        runner = daemon.components["optimizer"]

        async def finished() -> dict[str, Any] | None:
            runs = await runner.list_runs()
            return runs[0] if runs and runs[0]["status"] != "running" else None

        run = await wait_for(finished, timeout=60)
        assert (run["status"], run["outcome"]) == ("completed", "deployed"), run
        version = await daemon.components["registry"].get_version(PROMPT, run["deployed_version"])
        spec = version.config["demos"]
        async with http.get(f"/v1/prompts/{PROMPT}/pools") as resp:
            pools = (await resp.json())["pools"]
        # The run's snapshot has the same content as the manual one: one snapshot.
        assert [p["pool"] for p in pools] == [built["pool"]]
        assert spec["pool"] == built["pool"]
        async with http.get(f"/v1/prompts/{PROMPT}/pools/{spec['pool']}") as resp:
            pool = await resp.json()
    # The pool is made of the app's own calls (their request ids), answered by corrections.
    sdk_ids = {r for r, _v, _m, _d in app.served}
    pool_ids = {d["id"] for d in pool["demos"]}
    assert pool_ids
    assert pool_ids <= sdk_ids
    assert len(pool_ids) < CALLS  # the train split only

    # New calls: those in the candidate arm get per-request demos from the pinned pool.
    candidate = run["deployed_version"]

    def served_by_candidate() -> int:
        return sum(1 for _r, v, _m, _d in app.served if v == candidate)

    def sdk_sees_the_rollout() -> bool:
        entry = promptd.sdk.client.get_client().routing.entries.get(PROMPT)
        return entry is not None and entry.candidate is not None

    await wait_for(sdk_sees_the_rollout, timeout=20)
    start = CALLS
    while served_by_candidate() < 3:
        await asyncio.to_thread(app.traffic, start, 20)
        start += 20
        assert start < CALLS + 400, "the candidate arm never served a call"
    for _request_id, v, messages, demo_ids in app.served[CALLS:]:
        if v != candidate:
            assert demo_ids is None
            assert len(messages) == 2
            continue
        assert demo_ids
        assert set(demo_ids) <= pool_ids
        assert len(messages) == 2 + 2 * len(demo_ids)
        assert messages[1]["role"] == "user"
        assert messages[2]["role"] == "assistant"
    by_request = {r: d for r, v, _m, d in app.served if v == candidate}

    async def stored_demo_ids() -> dict[str, list[str]] | None:
        marks = ",".join("?" * len(by_request))
        async with daemon.db.reader.execute(
            f"SELECT request_id, demo_ids FROM metric_events WHERE request_id IN ({marks})",
            tuple(by_request),
        ) as cur:
            rows = {r: json.loads(d) for r, d in await cur.fetchall() if d is not None}
        return rows if len(rows) == len(by_request) else None

    assert await wait_for(stored_demo_ids, timeout=20) == by_request
    promptd.shutdown(5)
