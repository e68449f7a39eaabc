"""The SDK end to end: decorated calls and feedback through the real broker into the daemon."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import promptd
from promptd.daemon.settings import Settings
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


async def test_sync_and_async_calls_are_stored(
    make_settings: Callable[..., Settings],
    start_daemon: Callable[..., Any],
    sdk_for: Callable[[Settings], promptd.sdk.Client],
) -> None:
    """Decorated sync and async functions publish events that the daemon stores."""
    settings = make_settings()
    daemon = await start_daemon(settings)
    client = sdk_for(settings)

    @promptd.instrument(prompt="summarization", model="gpt-4o-mini")
    def summarize(text: str) -> str:
        return text[:3]

    @promptd.instrument(prompt="summarization", model="gpt-4o-mini")
    async def asummarize(text: str) -> str:
        await asyncio.sleep(0)
        return text[:2]

    for i in range(5):
        assert summarize(f"text {i}") == "tex"
        assert await asummarize(f"text {i}") == "te"
    assert await promptd.aflush(10)
    repo = daemon.daemon.repo

    async def stored() -> bool:
        return bool((await repo.count_events())[0] == 10)

    await wait_for(stored, timeout=15)
    stats = client.stats()
    assert (stats.emitted, stats.delivered, stats.buffered, stats.dropped) == (10, 10, 0, 0)
    registry = client.config.registry
    assert registry.get_sample_value("promptd_sdk_events_delivered_total") == 10
    assert registry.get_sample_value("promptd_sdk_events_buffered") == 0


async def test_feedback_joins_by_request_id(
    make_settings: Callable[..., Settings],
    start_daemon: Callable[..., Any],
    sdk_for: Callable[[Settings], promptd.sdk.Client],
) -> None:
    """Stored feedback carries the request id, prompt and variant of its call."""
    settings = make_settings()
    daemon = await start_daemon(settings)
    sdk_for(settings)

    @promptd.instrument(prompt="qa", model="m", version="v7")
    async def answer(question: str) -> str:
        return "42"

    await answer("meaning?")
    request_id = promptd.last_request_id()
    assert request_id is not None
    await promptd.afeedback(request_id, True, kind="thumbs", comment="great")
    assert await promptd.aflush(10)
    repo = daemon.daemon.repo

    async def both_stored() -> bool:
        return await repo.count_events() == (1, 1)

    await wait_for(both_stored, timeout=15)
    query = (
        "SELECT m.request_id, f.prompt, f.variant, f.score, f.kind FROM metric_events m "
        "JOIN feedback_events f ON f.request_id = m.request_id"
    )
    async with repo.db.reader.execute(query) as cur:
        rows = list(await cur.fetchall())
    assert [tuple(r) for r in rows] == [(request_id, "qa", "v7", 1.0, "thumbs")]
