"""Leader election and fencing: the pure deadline rule, the elector against a fake lease,
and the lease and the fence against a real PostgreSQL store."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from structlog.testing import capture_logs

from promptd.daemon.leadership import Leadership, Timing, still_leading
from promptd.storage.database import Database, FencedError
from promptd.storage.leases import Lease, LeaseStore
from promptd.storage.postgres import PostgresDatabase
from promptd.storage.repository import EventRepository

TIMING = Timing(lease_duration_s=10.0, renew_deadline_s=7.0, retry_period_s=2.0)


@pytest.mark.parametrize(
    ("renewed_at", "now", "leading"),
    [
        (None, 0.0, False),  # never acquired
        (100.0, 100.0, True),
        (100.0, 106.9, True),
        (100.0, 107.0, False),  # the renew deadline ends it, before the lease (110)
        (100.0, 250.0, False),  # woke from a long pause
    ],
)
def test_a_leader_acts_only_within_its_renew_deadline(
    renewed_at: float | None, now: float, leading: bool
) -> None:
    """The deadline is counted from when the last renewal was sent."""
    assert still_leading(renewed_at, now, TIMING) is leading


class FakeLease:
    """The lease statements in memory, on a clock the test moves."""

    def __init__(self) -> None:
        self.holder: str | None = None
        self.generation = 0
        self.expires = 0.0
        self.now = 0.0
        self.fail = False

    async def acquire(self, holder: str, address: str | None, duration_s: float) -> int | None:
        if self.fail:
            raise ConnectionError("database down")
        if self.holder is not None and self.expires > self.now:
            return None
        self.holder, self.generation, self.expires = (
            holder,
            self.generation + 1,
            self.now + duration_s,
        )
        return self.generation

    async def renew(self, holder: str, generation: int, duration_s: float) -> bool:
        if self.fail:
            raise ConnectionError("database down")
        if (self.holder, self.generation) != (holder, generation) or self.expires <= self.now:
            return False
        self.expires = self.now + duration_s
        return True

    async def release(self, holder: str, generation: int) -> None:
        if (self.holder, self.generation) == (holder, generation):
            self.expires = self.now

    async def read(self) -> Lease | None:
        if self.holder is None:
            return None
        return Lease(self.holder, self.generation, "http://x", self.expires - self.now)

    async def close(self) -> None:
        return None


def _elector(lease: FakeLease, identity: str) -> Leadership:
    return Leadership(lease, identity, f"http://{identity}", TIMING, clock=lambda: lease.now)


async def test_the_first_candidate_leads_and_the_second_stands_by() -> None:
    """One lease: ``a`` gets generation 1 and a token; ``b`` sees ``a`` lead."""
    lease = FakeLease()
    a, b = _elector(lease, "a"), _elector(lease, "b")
    await a.step()
    await b.step()
    assert a.leading
    assert a.token() == ("a", 1)
    assert a.elected.is_set()
    assert not b.leading
    assert b.token() is None
    assert b.view()["leader"] == {"identity": "a", "address": "http://x"}


async def test_a_standby_takes_over_an_expired_lease_with_a_new_generation() -> None:
    """``a`` stops renewing (a crash); once its lease ran out ``b`` leads, generation 2;
    ``a``'s renewal is then refused: it loses, says so, and its token is gone."""
    lease = FakeLease()
    a, b = _elector(lease, "a"), _elector(lease, "b")
    await a.step()
    lease.now = 9.0
    await b.step()
    assert not b.leading  # not yet expired
    lease.now = 10.0
    await b.step()
    assert b.token() == ("b", 2)
    lease.now = 5.0  # a's own clock has not passed its deadline
    with capture_logs() as logs:
        await a.step()
    assert a.lost.is_set()
    assert a.token() is None
    assert [e["event"] for e in logs] == ["leadership_lost"]
    assert "another daemon" in logs[0]["reason"]


async def test_a_paused_leader_stops_at_its_deadline_before_any_round_trip() -> None:
    """A leader whose clock jumped past the renew deadline (a pause) has no token at
    once, and its next round steps down without asking the database."""
    lease = FakeLease()
    a = _elector(lease, "a")
    await a.step()
    lease.now = 30.0
    assert a.token() is None
    lease.fail = True  # the database is not even asked
    await a.step()
    assert a.lost.is_set()
    assert "not renewed within 7.0 s" in (a.stepped_down or (0, ""))[1]


async def test_renewal_failures_keep_the_lead_until_the_deadline() -> None:
    """A database that does not answer costs the lead only once the deadline passes."""
    lease = FakeLease()
    a = _elector(lease, "a")
    await a.step()
    lease.fail = True
    lease.now = 3.0
    await a.step()
    assert a.leading
    assert a.last_error is not None
    lease.now = 7.5
    await a.step()
    assert not a.leading
    assert a.lost.is_set()


async def test_a_stepped_down_daemon_leads_again_only_when_allowed() -> None:
    """After losing, the daemon does not take the lease back until its leader work has
    stopped (``allow_acquire``); then it may lead again with a new generation."""
    lease = FakeLease()
    a = _elector(lease, "a")
    await a.step()
    a.fenced("test")
    lease.now = 20.0  # the lease ran out; nobody else took it
    await a.step()
    assert not a.leading
    a.allow_acquire()
    await a.step()
    assert a.token() == ("a", 2)


async def test_release_frees_the_lease_at_once() -> None:
    """A clean stop releases the lease: a standby need not wait for it to run out."""
    lease = FakeLease()
    a, b = _elector(lease, "a"), _elector(lease, "b")
    await a.step()
    await a.release()
    await b.step()
    assert b.token() == ("b", 2)


# -- against PostgreSQL ---------------------------------------------------------------


class StaticFence:
    """A fence that hands out a fixed token (what a paused process would still hold)."""

    def __init__(self, token: tuple[str, int] | None) -> None:
        self.value = token
        self.reasons: list[str] = []

    def token(self) -> tuple[str, int] | None:
        return self.value

    def fenced(self, reason: str) -> None:
        self.reasons.append(reason)


async def test_the_lease_in_postgresql(pg_url: str) -> None:
    """Acquire, refuse while held, take over once expired (new generation), refuse the
    old holder's renewal, release."""
    db = await Database.open(pg_url)
    a, b = LeaseStore(pg_url), LeaseStore(pg_url)
    try:
        assert await a.read() is None
        assert await a.acquire("a", "http://a", 0.5) == 1
        assert await b.acquire("b", "http://b", 0.5) is None
        held = await b.read()
        assert held is not None
        assert (held.holder, held.generation, held.address) == ("a", 1, "http://a")
        assert await a.renew("a", 1, 0.5)
        await asyncio.sleep(0.6)
        assert await b.acquire("b", "http://b", 5.0) == 2
        assert not await a.renew("a", 1, 5.0)
        await b.release("b", 2)
        assert await a.acquire("a", "http://a", 5.0) == 3
    finally:
        await a.close()
        await b.close()
        await db.close()


async def test_a_stale_token_writes_nothing(pg_url: str) -> None:
    """A write with the token of an earlier generation is refused inside its transaction:
    nothing of it is stored, and the fence hears why."""
    db = await Database.open(pg_url)
    assert isinstance(db, PostgresDatabase)
    leases = LeaseStore(pg_url)
    try:
        assert await leases.acquire("a", None, 30.0) == 1
        await leases.release("a", 1)
        assert await leases.acquire("b", None, 30.0) == 2
        fence = StaticFence(("a", 1))
        db.fence = fence
        with pytest.raises(FencedError, match="generation 1"):
            await EventRepository(db).store_batch([], [], {("m", 0): 5})
        assert fence.reasons
        db.fence = StaticFence(("b", 2))
        await EventRepository(db).store_batch([], [], {("m", 0): 7})
        assert await EventRepository(db).load_offsets() == {("m", 0): 7}
    finally:
        await leases.close()
        await db.close()


async def test_an_expired_lease_writes_nothing_even_before_a_takeover(pg_url: str) -> None:
    """The database's clock decides: a holder whose lease ran out cannot write, even with
    the current generation and a clock of its own that says it may."""
    db = await Database.open(pg_url)
    assert isinstance(db, PostgresDatabase)
    leases = LeaseStore(pg_url)
    try:
        assert await leases.acquire("a", None, 0.2) == 1
        db.fence = StaticFence(("a", 1))
        await asyncio.sleep(0.3)
        with pytest.raises(FencedError):
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO counters (name, value) VALUES ('x', 1)")
        async with db.reader.execute("SELECT count(*) FROM counters") as cur:
            assert (await cur.fetchone())[0] == 0
    finally:
        await leases.close()
        await db.close()


async def test_a_takeover_waits_for_a_write_in_flight_and_the_server_ends_a_paused_one(
    pg_url: str,
) -> None:
    """A leader's write transaction that passed the fence holds off a takeover (the two
    never interleave); a leader paused inside its transaction is ended by the server
    (idle_in_transaction_session_timeout), and the takeover then goes through while the
    paused write is lost."""
    db = await PostgresDatabase.connect(pg_url, idle_in_transaction_timeout_s=0.5)
    leases, takeover = LeaseStore(pg_url, lock_timeout_s=0.2), LeaseStore(pg_url)
    try:
        assert await leases.acquire("a", None, 0.3) == 1
        db.fence = StaticFence(("a", 1))
        started = time.monotonic()

        async def paused_write() -> None:
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO counters (name, value) VALUES ('paused', 1)")
                await asyncio.sleep(0.4)  # the lease runs out meanwhile
                blocked = LeaseStore(pg_url, lock_timeout_s=0.05)
                with pytest.raises(asyncpg.LockNotAvailableError):
                    await blocked.acquire("b", None, 5.0)
                await asyncio.sleep(1.0)  # "paused" past the idle timeout
                await conn.execute("SELECT 1")  # the session is gone

        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await paused_write()
        assert await takeover.acquire("b", None, 5.0) == 2
        assert time.monotonic() - started < 5
        async with db.reader.execute("SELECT count(*) FROM counters") as cur:
            assert (await cur.fetchone())[0] == 0
    finally:
        await leases.close()
        await takeover.close()
        await db.close()
