"""Daemons sharing one PostgreSQL store: one leads and consumes, the others stand by."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from promptd.daemon.settings import Settings
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

HA = {"lease_duration_s": 3.0, "renew_deadline_s": 2.0, "retry_period_s": 0.3}


async def _get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.json()


async def test_one_leads_the_other_stands_by(
    make_settings: Callable[..., Settings], start_daemon: Callable[..., Any], pg_url: str
) -> None:
    """Two daemons on one store: the first leads and consumes; the second stands by,
    says who leads, and serves routing from the database."""
    first = make_settings(storage={"url": pg_url}, ha={**HA, "identity": "a"})
    kafka = first.kafka.model_dump()
    second = make_settings(storage={"url": pg_url}, ha={**HA, "identity": "b"}, kafka=kafka)
    leader = await start_daemon(first)
    standby = await start_daemon(second, ready=False)
    await wait_for(lambda: standby.daemon.readiness()[0], timeout=10)
    status, body = await _get(standby.url + "/readyz")
    assert status == 200, body
    assert body["role"] == "standby"
    assert body["leader"]["identity"] == "a"
    status, body = await _get(leader.url + "/readyz?role=leader")
    assert status == 200, body
    status, body = await _get(standby.url + "/readyz?role=leader")
    assert status == 503
