"""Leader election among daemons that share a PostgreSQL store (client-go's pattern).

One lease in the database (:mod:`promptd.storage.leases`), three durations:

* ``lease_duration_s``: how long a lease lasts after its last renewal; a standby takes
  it over once it has run out (by the database's clock);
* ``renew_deadline_s``: the leader stops acting when it has not renewed for this long,
  by its own monotonic clock: before its lease can run out, whatever happened (a pause,
  a slow or unreachable database);
* ``retry_period_s``: how often the leader renews and a standby tries to take over.

Each new holder gets a new ``generation``, the fencing token: :class:`Leadership` is the
:class:`~promptd.storage.database.Fence` of the store, so every write transaction checks
it inside the database, and a leader paused past its lease writes nothing when it wakes.
Losing the lease (renewal refused, deadline passed, or a write fenced) sets :attr:`lost`
and logs ``leadership_lost``; the daemon then stops its leader work and stands by again
(:meth:`Leadership.allow_acquire` once that is done).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from promptd._aio import wait_event
from promptd.storage.leases import Lease

log = structlog.get_logger("promptd.leadership")


class LeaseBackend(Protocol):
    """The lease statements (:class:`~promptd.storage.leases.LeaseStore`, or a fake)."""

    async def acquire(self, holder: str, address: str | None, duration_s: float) -> int | None: ...

    async def renew(self, holder: str, generation: int, duration_s: float) -> bool: ...

    async def release(self, holder: str, generation: int) -> None: ...

    async def read(self) -> Lease | None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Timing:
    """The three durations of the lease (see the module docstring)."""

    lease_duration_s: float
    renew_deadline_s: float
    retry_period_s: float


def default_identity() -> str:
    """``host-pid-xxxx``: unique per process, readable in status and logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def still_leading(renewed_at: float | None, now: float, timing: Timing) -> bool:
    """Pure: may a leader that last renewed at ``renewed_at`` (monotonic, when the
    renewal was sent) still act at ``now``? Only within the renew deadline, which ends
    before the lease can have run out in the database."""
    return renewed_at is not None and now - renewed_at < timing.renew_deadline_s


class Leadership:
    """This daemon's side of the election, and the fence of its writes."""

    def __init__(
        self,
        store: LeaseBackend,
        identity: str,
        address: str | None,
        timing: Timing,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.identity = identity
        self.address = address
        self.timing = timing
        self.clock = clock
        self.generation: int | None = None
        #: Set while this daemon leads; cleared when it stops.
        self.elected = asyncio.Event()
        #: Set when the current leadership ended (a new event per term).
        self.lost = asyncio.Event()
        #: The lease as last read (the other leader, while standing by).
        self.lease: Lease | None = None
        #: ``(wall time, reason)`` of the last time this daemon stepped down.
        self.stepped_down: tuple[float, str] | None = None
        self.last_error: str | None = None
        self.last_contact: float | None = None
        self._renewed_at: float | None = None
        self._may_acquire = True

    # -- the fence -------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """True while this daemon holds the lease and may act."""
        return self.generation is not None and still_leading(
            self._renewed_at, self.clock(), self.timing
        )

    def token(self) -> tuple[str, int] | None:
        """``(holder, generation)`` while this daemon may write, else ``None``."""
        if self.generation is None or not self.leading:
            return None
        return (self.identity, self.generation)

    def fenced(self, reason: str) -> None:
        """A write was refused (see :class:`~promptd.storage.database.Fence`)."""
        self._lose(f"a write was fenced: {reason}")

    # -- the loop --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Renew or try to acquire every ``retry_period_s`` until ``stop``."""
        try:
            while not stop.is_set():
                await self.step()
                await wait_event(stop, self.timing.retry_period_s)
        finally:
            await self.store.close()

    async def step(self) -> None:
        """One round: renew while leading, else try to take the lease."""
        if self.generation is not None:
            await self._renew()
        elif self._may_acquire:
            await self._acquire()

    async def _renew(self) -> None:
        assert self.generation is not None
        sent = self.clock()
        if not still_leading(self._renewed_at, sent, self.timing):
            self._lose(f"the lease was not renewed within {self.timing.renew_deadline_s} s")
            return
        assert self._renewed_at is not None
        left = self.timing.renew_deadline_s - (sent - self._renewed_at)
        try:
            async with asyncio.timeout(left):
                ok = await self.store.renew(
                    self.identity, self.generation, self.timing.lease_duration_s
                )
        except Exception as exc:
            self.last_error = repr(exc)
            log.warning("lease_renewal_failed", error=repr(exc), generation=self.generation)
            if not still_leading(self._renewed_at, self.clock(), self.timing):
                self._lose(f"the lease could not be renewed: {exc!r}")
            return
        self.last_contact = self.clock()
        if ok:
            self._renewed_at = sent
            self.last_error = None
        else:
            self._lose("the lease ran out or another daemon took it over")

    async def _acquire(self) -> None:
        sent = self.clock()
        timeout = self.timing.retry_period_s
        try:
            async with asyncio.timeout(timeout):
                generation = await self.store.acquire(
                    self.identity, self.address, self.timing.lease_duration_s
                )
                if generation is None:
                    self.lease = await self.store.read()
        except Exception as exc:
            self.last_error = repr(exc)
            log.warning("lease_acquire_failed", error=repr(exc))
            return
        self.last_contact = self.clock()
        self.last_error = None
        if generation is None:
            return
        self.generation = generation
        self._renewed_at = sent
        self.lease = Lease(self.identity, generation, self.address, self.timing.lease_duration_s)
        self.lost = asyncio.Event()
        self.elected.set()
        log.info("leadership_acquired", identity=self.identity, generation=generation)

    def _lose(self, reason: str) -> None:
        if self.generation is None:
            return
        generation, self.generation = self.generation, None
        self._renewed_at = None
        self._may_acquire = False
        self.lease = None  # read again at the next round
        self.stepped_down = (time.time(), reason)
        self.elected.clear()
        self.lost.set()
        log.error(
            "leadership_lost",
            identity=self.identity,
            generation=generation,
            reason=reason,
            action="stepped down: leader work stopped, nothing more is written; standing by",
        )

    def allow_acquire(self) -> None:
        """The leader work of the last term has stopped: this daemon may lead again."""
        self._may_acquire = True

    async def release(self) -> None:
        """On a clean stop, end the lease at once so a standby need not wait it out."""
        if self.generation is None:
            return
        generation, self.generation = self.generation, None
        self.elected.clear()
        try:
            async with asyncio.timeout(2.0):
                await self.store.release(self.identity, generation)
        except Exception as exc:
            log.warning("lease_release_failed", error=repr(exc))
            return
        log.info("leadership_released", identity=self.identity, generation=generation)

    # -- views -----------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """What ``/readyz`` and ``/v1/status`` show of the election."""
        lease = self.lease
        leader = None
        if self.leading:
            leader = {"identity": self.identity, "address": self.address}
        elif lease is not None and lease.expires_in_s > 0:
            leader = {"identity": lease.holder, "address": lease.address}
        out: dict[str, Any] = {
            "role": "leader" if self.leading else "standby",
            "identity": self.identity,
            "generation": self.generation
            if self.leading
            else (lease.generation if lease else None),
            "leader": leader,
        }
        if self.stepped_down is not None:
            out["stepped_down"] = {"at": self.stepped_down[0], "reason": self.stepped_down[1]}
        if self.last_error is not None:
            out["last_error"] = self.last_error
        return out
