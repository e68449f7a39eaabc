"""Two real ``promptd run`` processes on one PostgreSQL store and one broker.

The failover test SIGKILLs the leader under steady traffic while a rollout is live: the
standby must lead within 15 s, every produced event must be stored exactly once, the
rollout must go on from the same step with the same salt, and no transition may be
applied twice. The fencing test SIGSTOPs the leader past its lease, lets the standby
take over, then SIGCONTs the old leader: it must write nothing and say it stepped down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from promptd.daemon.broker import EmbeddedBroker
from promptd.events import new_event_id
from promptd.routing import Routing
from tests.conftest import wait_for
from tests.daemon_process import DaemonProcess, environment

pytestmark = pytest.mark.integration

TOKEN = "failover-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Step 1 (half the traffic) lasts long past the kill: the rollout is live throughout.
CONFIG = """
[rollout]
tick_interval_s = 0.2
snapshot_interval_s = 1.0
default_profile = "failover"

[rollout.profiles.failover]
steps = [
    { weight = 0.2, min_duration_s = 1.0, min_samples_per_arm = 20 },
    { weight = 0.5, min_duration_s = 600.0, min_samples_per_arm = 20 },
    { weight = 1.0, min_duration_s = 600.0, min_samples_per_arm = 20 },
]

[monitoring]
snapshot_interval_s = 1.0
"""


@pytest.fixture
def pair(
    tmp_path: Path, broker: EmbeddedBroker, pg_url: str, request: pytest.FixtureRequest
) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    """Daemons ``a`` and ``b`` (not started) on one store, one broker, one group."""
    tag = uuid.uuid4().hex[:8]
    lease = getattr(request, "param", {"lease": 4.0, "renew": 3.0, "retry": 0.3})
    config = tmp_path / "promptd.toml"
    config.write_text(CONFIG)
    env = environment(
        broker.bootstrap_servers,
        tag,
        TOKEN,
        PROMPTD_CONFIG=str(config),
        PROMPTD_STORAGE_URL=pg_url,
        PROMPTD_KAFKA__SESSION_TIMEOUT_MS="1000",
        PROMPTD_KAFKA__HEARTBEAT_INTERVAL_MS="300",
        PROMPTD_KAFKA__FETCH_MAX_WAIT_MS="50",
        PROMPTD_KAFKA__RETRY_BACKOFF_INITIAL_S="0.2",
        PROMPTD_KAFKA__RETRY_BACKOFF_MAX_S="1.0",
        PROMPTD_HA__LEASE_DURATION_S=str(lease["lease"]),
        PROMPTD_HA__RENEW_DEADLINE_S=str(lease["renew"]),
        PROMPTD_HA__RETRY_PERIOD_S=str(lease["retry"]),
        PROMPTD_STORAGE__IDLE_IN_TRANSACTION_TIMEOUT_S="1.0",
    )
    daemons = (DaemonProcess(tmp_path, "a", env), DaemonProcess(tmp_path, "b", env))
    yield daemons
    for daemon in daemons:
        daemon.stop()


async def _call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=body, headers=AUTH) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def _ready(daemon: DaemonProcess, query: str = "") -> bool:
    """``/readyz`` answers 200 (``?role=leader``: and this daemon leads)."""
    try:
        status, _ = await _call("GET", daemon.url + "/readyz" + query)
    except aiohttp.ClientError:
        return False
    return status == 200


async def _leads(daemon: DaemonProcess) -> bool:
    return await _ready(daemon, "?role=leader")


async def _start_pair(a: DaemonProcess, b: DaemonProcess) -> None:
    """``a`` first (it leads), then ``b`` (it stands by)."""
    a.start()
    await a.wait_started()
    await wait_for(lambda: _leads(a), timeout=30)
    b.start()
    await b.wait_started()
    await wait_for(lambda: _ready(b), timeout=30)


class Traffic:
    """Calls and their feedback on the rollout's prompt, arms by the served routing."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.produced: set[str] = set()
        self.routing: Routing | None = None
        self.url = ""
        self._stop = asyncio.Event()

    async def run(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.env["PROMPTD_KAFKA_BOOTSTRAP_SERVERS"], acks="all", linger_ms=5
        )
        await producer.start()
        try:
            user = 0
            while not self._stop.is_set():
                await self._refresh_routing()
                assert self.routing is not None
                for _ in range(5):  # about 50 calls and 50 ratings a second
                    user += 1
                    await self._call(producer, self.routing, f"user-{user % 400}")
                await producer.flush()
                await asyncio.sleep(0.1)
        finally:
            await producer.stop()

    async def _refresh_routing(self) -> None:
        with contextlib.suppress(aiohttp.ClientError, ValueError):
            status, body = await _call("GET", self.url + "/v1/prompts/summarize/routing")
            if status == 200:
                self.routing = Routing.model_validate(body)

    async def _call(self, producer: AIOKafkaProducer, routing: Routing, unit: str) -> None:
        version, _ = routing.choose(unit)
        request_id, call_id, feedback_id = new_event_id(), new_event_id(), new_event_id()
        common = {"ts": time.time(), "prompt": "summarize", "variant": version,
                  "request_id": request_id}  # fmt: skip
        call = {**common, "event_id": call_id, "type": "metric", "model": "m", "unit_id": unit,
                "latency_ms": 100.0, "success": True}  # fmt: skip
        rating = {**common, "event_id": feedback_id, "type": "feedback", "score": 0.7,
                  "kind": "thumbs"}  # fmt: skip
        for topic, event in (("METRICS", call), ("FEEDBACK", rating)):
            name = self.env[f"PROMPTD_KAFKA__{topic}_TOPIC"]
            await producer.send(name, json.dumps(event).encode(), key=b"s")
        self.produced.update((call_id, feedback_id))

    def stop(self) -> None:
        self._stop.set()


@contextlib.asynccontextmanager
async def _traffic(env: dict[str, str], url: str) -> AsyncIterator[Traffic]:
    traffic = Traffic(env)
    traffic.url = url
    task = asyncio.create_task(traffic.run())
    try:
        yield traffic
    finally:
        traffic.stop()
        await task


async def _stored_ids(pg_url: str) -> set[str]:
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(
            "SELECT event_id FROM metric_events UNION ALL SELECT event_id FROM feedback_events"
        )
    finally:
        await conn.close()
    return {r[0] for r in rows}


async def _rollout(url: str, rollout_id: str) -> dict[str, Any]:
    status, body = await _call("GET", f"{url}/v1/rollouts/{rollout_id}")
    assert status == 200, body
    return dict(body)


async def _start_rollout(url: str) -> str:
    for template in ("Summarize {document}.", "Summarize {document} briefly."):
        status, body = await _call(
            "POST", f"{url}/v1/prompts/summarize/versions", {"template": template}
        )
        assert status == 201, body
    status, body = await _call(
        "POST", f"{url}/v1/rollouts", {"prompt": "summarize", "candidate_version": "v2"}
    )
    assert status == 201, body
    return str(body["id"])


async def test_sigkill_of_the_leader_fails_over_exactly_once(
    pair: tuple[DaemonProcess, DaemonProcess], pg_url: str
) -> None:
    """SIGKILL the leader under steady traffic during a rollout: the standby leads within
    15 s, every produced event is stored exactly once, the rollout goes on from the same
    step with the same salt, and no transition is applied twice."""
    a, b = pair
    await _start_pair(a, b)
    # Through the standby: the mutations are handed to the leader.
    rollout_id = await _start_rollout(b.url)
    async with _traffic(a.env, b.url) as traffic:

        async def at_step_one() -> bool:
            return int((await _rollout(a.url, rollout_id))["state"]["step_index"]) == 1

        await wait_for(at_step_one, timeout=60)
        before = await _rollout(a.url, rollout_id)
        await asyncio.sleep(1.5)  # a snapshot of the rollout at this step exists by now
        a.signal(signal.SIGKILL)
        killed = time.monotonic()
        await wait_for(lambda: _leads(b), timeout=20, interval=0.1)
        failover_s = time.monotonic() - killed
        traffic.url = b.url
        await asyncio.sleep(2.0)  # traffic goes on into the new leader
    assert failover_s <= 15.0, failover_s
    print(f"failover: the standby led {failover_s:.2f} s after SIGKILL")

    async def all_stored() -> bool:
        return await _stored_ids(pg_url) >= traffic.produced

    await wait_for(all_stored, timeout=60, interval=0.5)
    stored = await _stored_ids(pg_url)
    assert stored == traffic.produced  # each exactly once: event_id is unique in storage
    conn = await asyncpg.connect(pg_url)
    try:
        duplicates = await conn.fetchval("SELECT value FROM counters WHERE name = 'duplicates'")
        decisions = await conn.fetch(
            "SELECT kind, step FROM rollout_decisions WHERE rollout_id = $1 ORDER BY id",
            rollout_id,
        )
    finally:
        await conn.close()
    print(f"failover: {len(stored)} events stored, {duplicates or 0} duplicates re-read")
    after = await _rollout(b.url, rollout_id)
    assert after["status"] == "running"
    assert after["salt"] == before["salt"]
    assert after["state"]["step_index"] == before["state"]["step_index"] == 1
    transitions = [(d["kind"], d["step"]) for d in decisions if d["kind"] != "hold"]
    assert len(transitions) == len(set(transitions)), transitions
    resumed = b.events("rollout_resumed")
    assert [(e["rollout_id"], e["step"]) for e in resumed] == [(rollout_id, 1)]
    assert b.stop() == 0


@pytest.mark.parametrize("pair", [{"lease": 4.0, "renew": 2.5, "retry": 0.3}], indirect=True)
async def test_a_leader_paused_past_its_lease_writes_nothing_when_it_wakes(
    pair: tuple[DaemonProcess, DaemonProcess], pg_url: str
) -> None:
    """SIGSTOP the leader past its lease; the standby takes over; SIGCONT the old leader:
    it writes nothing (the store is unchanged while only it runs) and says it stepped
    down, in its log and on /readyz."""
    a, b = pair
    await _start_pair(a, b)
    rollout_id = await _start_rollout(a.url)
    async with _traffic(a.env, b.url):
        await asyncio.sleep(1.0)
        a.signal(signal.SIGSTOP)
        await wait_for(lambda: _leads(b), timeout=20, interval=0.1)
        await asyncio.sleep(1.0)  # traffic into the new leader, a's partitions included
    # Only a may run now: whatever changes in the store is a's doing.
    b.signal(signal.SIGSTOP)
    try:
        before = await _fingerprint(pg_url)
        a.signal(signal.SIGCONT)
        await wait_for(lambda: a.events("leadership_lost"), timeout=10)
        await wait_for(lambda: a.events("leader_term_ended"), timeout=10)
        after = await _fingerprint(pg_url)
    finally:
        b.signal(signal.SIGCONT)
    assert after == before
    lost = a.events("leadership_lost")[0]
    assert lost["generation"] == 1

    async def standing_by() -> dict[str, Any] | None:
        _, body = await _call("GET", a.url + "/readyz")
        return body if (body.get("leader") or {}).get("identity") == "b" else None

    body = await wait_for(standing_by, timeout=10)
    assert body["role"] == "standby"
    assert "lease" in body["stepped_down"]["reason"]
    # Standing by, it serves from the database, not from its ended term's memory: a
    # rollback it hands to b shows in the routing it serves at once.
    status, _ = await _call("POST", f"{a.url}/v1/rollouts/{rollout_id}/rollback", {})
    assert status == 200
    _, routing = await _call("GET", a.url + "/v1/prompts/summarize/routing")
    assert (routing["weight"], routing["rollout_id"]) == (0.0, None)
    assert (await _rollout(b.url, rollout_id))["status"] == "rolled_back"


async def _fingerprint(pg_url: str) -> dict[str, Any]:
    """Everything a daemon writes, summarised: any write shows as a difference."""
    conn = await asyncpg.connect(pg_url)
    try:
        out: dict[str, Any] = {}
        for table in ("metric_events", "feedback_events", "ingest_batches", "rollout_decisions",
                      "alert_history"):  # fmt: skip
            out[table] = tuple(await conn.fetchrow(f"SELECT count(*), max(id) FROM {table}"))
        out["batch_watermarks"] = tuple(
            await conn.fetchrow("SELECT count(*), max(ingested_at) FROM batch_watermarks")
        )
        for table, columns in (
            ("consumer_offsets", "topic, partition, next_offset, updated_at, watermark"),
            ("store_identity", "store_id, bootstrap_servers, group_id, topics, owners"),
            ("counters", "name, value"),
            ("rollouts", "id, status, state, updated_at"),
            ("snapshots", "name, taken_at"),
            ("leadership", "holder, generation, renewed_at"),
            ("alert_states", "fingerprint, state, updated_at"),
            ("prompts", "name, active_version, updated_at"),
        ):
            out[table] = [
                tuple(r) for r in await conn.fetch(f"SELECT {columns} FROM {table} ORDER BY 1")
            ]
    finally:
        await conn.close()
    return out
