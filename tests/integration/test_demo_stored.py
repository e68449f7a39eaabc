"""The demo's closing count waits for the daemon to store what the app delivered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from promptd.daemon.demo import wait_stored
from promptd.events import MetricEvent, new_event_id
from tests.kafka_helpers import produce

pytestmark = pytest.mark.integration


def _events(n: int) -> list[bytes]:
    return [
        MetricEvent(
            event_id=new_event_id(),
            ts=time.time(),
            prompt="summarize",
            variant="v1",
            model="m",
            request_id=new_event_id(),
            latency_ms=10.0,
            success=True,
        ).to_json()
        for _ in range(n)
    ]


async def test_wait_stored_returns_the_final_count(
    make_settings: Callable[..., Any], start_daemon: Callable[..., Any]
) -> None:
    """Right after the app's last events are acknowledged by Kafka, the status returned by
    wait_stored counts all of them (a single immediate read may not)."""
    settings = make_settings()
    running = await start_daemon(settings)
    n = 3000
    await produce(settings.kafka.bootstrap_servers, settings.kafka.metrics_topic, _events(n))
    async with aiohttp.ClientSession() as http:
        status = await wait_stored(http, running.url, delivered=n)
    assert status["events"]["stored"] == n


async def test_wait_stored_is_bounded_when_events_never_arrive(
    make_settings: Callable[..., Any], start_daemon: Callable[..., Any]
) -> None:
    """If fewer events than delivered ever arrive, it returns once the count has settled,
    within the bound, with the count as it is."""
    running = await start_daemon(make_settings())
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with aiohttp.ClientSession() as http:
        status = await wait_stored(http, running.url, delivered=10, timeout_s=5, settle_s=0.5)
    assert status["events"]["stored"] == 0
    assert loop.time() - began < 3
