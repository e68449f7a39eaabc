"""Daemons sharing one PostgreSQL store: one leads and consumes, the others stand by,
serve reads and routing from the database and hand everything else to the leader."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from promptd.daemon.forward import SERVED_BY
from promptd.daemon.settings import Settings
from promptd.storage.identity import load_identity
from promptd.storage.leases import LeaseStore
from tests.conftest import wait_for
from tests.integration.test_ingest import _metric
from tests.kafka_helpers import produce

pytestmark = pytest.mark.integration

TOKEN = "shared-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _call(method: str, url: str, body: Any = None) -> tuple[int, Any, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=body, headers=AUTH) as resp,
    ):
        return resp.status, await resp.json(content_type=None), dict(resp.headers)


def _pair_settings(
    make_settings: Callable[..., Settings], pg_url: str
) -> tuple[Settings, Settings]:
    common = {"storage": {"url": pg_url}, "http": {"admin_token": TOKEN}}
    first = make_settings(**common, ha={"identity": "a"}, rollout={"tick_interval_s": 0.1})
    kafka = first.kafka.model_dump()
    second = make_settings(
        **common, ha={"identity": "b"}, kafka=kafka, rollout={"tick_interval_s": 0.1}
    )
    return first, second


async def test_the_standby_reads_the_store_and_hands_mutations_to_the_leader(
    make_settings: Callable[..., Settings], pg_url: str, start_daemon: Callable[..., Any]
) -> None:
    """The first daemon leads, the second stands by and says who leads; versions and a
    rollout created through the standby are applied by the leader; the standby's routing
    comes from the database at every request, so a rollback shows there at once."""
    first, second = _pair_settings(make_settings, pg_url)
    leader = await start_daemon(first)
    standby = await start_daemon(second, ready=False)
    await wait_for(lambda: standby.daemon.readiness()[0], timeout=10)
    status, body, _ = await _call("GET", standby.url + "/readyz")
    assert (status, body["role"], body["leader"]["identity"]) == (200, "standby", "a")
    assert (await _call("GET", leader.url + "/readyz?role=leader"))[0] == 200
    assert (await _call("GET", standby.url + "/readyz?role=leader"))[0] == 503
    _, status_body, _ = await _call("GET", standby.url + "/v1/status")
    assert status_body["leadership"]["role"] == "standby"
    assert status_body["storage"]["backend"] == "postgresql"
    # Both are members of one store: the identity the database was created with.
    _, leader_status, _ = await _call("GET", leader.url + "/v1/status")
    assert status_body["store"] == leader_status["store"]
    assert len(status_body["store"]["id"]) == 32

    for template in ("Summarize {document}.", "Summarize {document} briefly."):
        status, body, headers = await _call(
            "POST", standby.url + "/v1/prompts/summarize/versions", {"template": template}
        )
        assert status == 201, body
        assert headers[SERVED_BY] == "a"
    status, started, _ = await _call(
        "POST",
        standby.url + "/v1/rollouts",
        {"prompt": "summarize", "candidate_version": "v2", "profile": "balanced"},
    )
    assert status == 201, started
    status, routing, headers = await _call("GET", standby.url + "/v1/prompts/summarize/routing")
    assert status == 200
    assert SERVED_BY not in headers  # answered by the standby itself
    assert (routing["rollout_id"], routing["salt"]) == (started["id"], started["salt"])
    assert routing["weight"] > 0
    _, listed, _ = await _call("GET", standby.url + "/v1/prompts")
    assert listed["prompts"][0]["rollout_live"] is True

    status, body, _ = await _call(
        "POST", f"{standby.url}/v1/rollouts/{started['id']}/rollback", {"reason": "test"}
    )
    assert status == 200, body
    _, routing, _ = await _call("GET", standby.url + "/v1/prompts/summarize/routing")
    assert routing["weight"] == 0.0
    assert routing["rollout_id"] is None


async def test_a_clean_stop_hands_the_lead_over_at_once(
    make_settings: Callable[..., Settings], pg_url: str, start_daemon: Callable[..., Any]
) -> None:
    """SIGTERM of the leader releases its lease: the standby leads within a retry period
    (not a lease duration), consumes from the stored offsets, and every event is stored
    once across the handover."""
    first, second = _pair_settings(make_settings, pg_url)
    kafka = first.kafka
    leader = await start_daemon(first)
    standby = await start_daemon(second, ready=False)
    await wait_for(lambda: standby.daemon.readiness()[0], timeout=10)
    await produce(kafka.bootstrap_servers, kafka.metrics_topic, [_json(i) for i in range(500)])
    repo = leader.daemon.repo
    await wait_for(lambda: _count_is(repo, 500), timeout=20)
    await leader.stop()
    stopped = time.monotonic()
    await wait_for(lambda: standby.daemon.leadership.leading, timeout=10)
    handover = time.monotonic() - stopped
    assert handover < first.ha.lease_duration_s, handover
    await produce(kafka.bootstrap_servers, kafka.metrics_topic, [_json(i) for i in range(500, 900)])
    await wait_for(lambda: _count_is(standby.daemon.repo, 900), timeout=30)
    counters = await standby.daemon.repo.counters()
    assert counters.get("duplicates", 0) == 0
    status, body, _ = await _call("GET", standby.url + "/readyz?role=leader")
    assert status == 200, body
    # The new leader took over the one store (not a new store of its own): the identity
    # the first leader recorded, with the group members of both leaders' terms.
    identity = await load_identity(standby.daemon.db)
    assert standby.daemon.identity.store_id == identity.store_id
    assert leader.daemon.identity.store_id == identity.store_id
    assert (identity.group_id, identity.topics) == (kafka.group_id, kafka.event_topics)
    assert len({owner.member_id for owner in identity.owners}) >= 2


async def test_without_a_reachable_leader_mutations_get_503_and_reads_still_work(
    make_settings: Callable[..., Settings], pg_url: str, start_daemon: Callable[..., Any]
) -> None:
    """A standby whose leader does not answer refuses mutations with 503 and Retry-After
    (nothing applied), and still answers reads from the database."""
    _, second = _pair_settings(make_settings, pg_url)
    standby = await start_daemon(second, ready=False)
    await standby.stop()  # migrated the store; now a leader that never answers holds it
    ghost = LeaseStore(pg_url)
    try:
        assert await ghost.acquire("ghost", "http://127.0.0.1:9", 60.0) is not None
        standby = await start_daemon(second, ready=False)
        await wait_for(lambda: standby.daemon.readiness()[0], timeout=10)
        status, body, headers = await _call(
            "POST", standby.url + "/v1/prompts/x/versions", {"template": "t {a}"}
        )
        assert status == 503, body
        assert headers["Retry-After"] == "2"
        assert "did not answer" in body["error"]
        assert (await _call("GET", standby.url + "/v1/prompts"))[:2] == (200, {"prompts": []})
    finally:
        await ghost.close()


def _json(i: int) -> bytes:
    import json

    return json.dumps(_metric(i)).encode()


async def _count_is(repo: Any, expected: int) -> bool:
    return (await repo.count_events())[0] == expected


async def test_a_daemon_does_not_lead_a_store_a_newer_promptd_migrated(
    make_settings: Callable[..., Settings], pg_url: str, start_daemon: Callable[..., Any]
) -> None:
    """In a rolling upgrade, an old daemon standing by never takes the lead of the store a
    newer promptd migrated: when its turn comes it stops with one line saying so."""
    import asyncio

    import asyncpg

    from promptd.storage.database import Database, StorageError
    from promptd.storage.schema import latest_version

    _, second = _pair_settings(make_settings, pg_url)
    ghost = LeaseStore(pg_url)
    try:
        await (await Database.open(pg_url)).close()  # the schema, with its lease table
        generation = await ghost.acquire("newer", "http://127.0.0.1:9", 60.0)
        assert generation is not None
        standby = await start_daemon(second, ready=False)
        await wait_for(lambda: standby.daemon.readiness()[0], timeout=10)  # stands by
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute("UPDATE schema_version SET version = $1", latest_version() + 1)
        finally:
            await conn.close()
        await ghost.release("newer", generation)
        with pytest.raises(StorageError, match="newer than this promptd"):
            await asyncio.wait_for(standby.task, 15)
    finally:
        await ghost.close()
