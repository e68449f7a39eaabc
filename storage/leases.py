"""The leader lease in PostgreSQL: acquire, renew, release, read (the ``leadership`` table).

Every statement uses the database's clock (``clock_timestamp()``), never a daemon's, so
daemons with skewed clocks agree on when a lease ran out. A new holder increments
``generation``: the fencing token that every write of the leader checks (see
:mod:`.postgres`). The lease runs on a connection of its own, so renewals never queue
behind the pool's readers; each statement waits at most ``lock_timeout_s`` for a lock
(a takeover waits for the old leader's write in flight, whose session the server ends
if that process is paused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

_NOW: Final = "extract(epoch FROM clock_timestamp())"

_ACQUIRE: Final = f"""
INSERT INTO leadership AS l (name, holder, generation, address, acquired_at, renewed_at,
                             expires_at)
SELECT 'leader', $1, 1, $2, t, t, t + $3 FROM (SELECT {_NOW} AS t) AS now
ON CONFLICT (name) DO UPDATE SET
    holder = excluded.holder, address = excluded.address, generation = l.generation + 1,
    acquired_at = excluded.acquired_at, renewed_at = excluded.renewed_at,
    expires_at = excluded.expires_at
WHERE l.expires_at <= excluded.acquired_at
RETURNING generation
"""
_RENEW: Final = f"""
UPDATE leadership SET renewed_at = now.t, expires_at = now.t + $3
FROM (SELECT {_NOW} AS t) AS now
WHERE name = 'leader' AND holder = $1 AND generation = $2 AND expires_at > now.t
RETURNING generation
"""
_RELEASE: Final = f"""
UPDATE leadership SET expires_at = {_NOW}
WHERE name = 'leader' AND holder = $1 AND generation = $2
"""
_READ: Final = f"""
SELECT holder, generation, address, expires_at - {_NOW} FROM leadership WHERE name = 'leader'
"""


@dataclass(frozen=True, slots=True)
class Lease:
    """The lease as stored: who holds it, its generation, where it serves HTTP, and how
    long it still runs (negative: expired)."""

    holder: str
    generation: int
    address: str | None
    expires_in_s: float


class LeaseStore:
    """The lease statements on one PostgreSQL connection (reconnected after an error)."""

    def __init__(self, url: str, lock_timeout_s: float = 1.0) -> None:
        self.url = url
        self.lock_timeout_s = lock_timeout_s
        self._conn: Any = None

    async def _connection(self) -> Any:
        if self._conn is None or self._conn.is_closed():
            import asyncpg

            self._conn = await asyncpg.connect(
                self.url,
                server_settings={
                    "application_name": "promptd-lease",
                    "lock_timeout": str(int(self.lock_timeout_s * 1000)),
                },
            )
        return self._conn

    async def _run(self, sql: str, *args: Any) -> Any:
        try:
            conn = await self._connection()
            return await conn.fetchrow(sql, *args)
        except BaseException:
            # A failed or cancelled statement (callers bound each with a timeout) may
            # leave the connection mid-protocol: start over with a new one.
            await self.close()
            raise

    async def acquire(self, holder: str, address: str | None, duration_s: float) -> int | None:
        """Take the lease if it is free or expired; the new generation, or ``None``."""
        row = await self._run(_ACQUIRE, holder, address, duration_s)
        return None if row is None else int(row[0])

    async def renew(self, holder: str, generation: int, duration_s: float) -> bool:
        """Extend this holder's unexpired lease; False when it is no longer ours."""
        row = await self._run(_RENEW, holder, generation, duration_s)
        return row is not None

    async def release(self, holder: str, generation: int) -> None:
        """End this holder's lease now (a clean stop: a standby takes over at once)."""
        await self._run(_RELEASE, holder, generation)

    async def read(self) -> Lease | None:
        """The current lease, or ``None`` when no daemon ever led this store."""
        row = await self._run(_READ)
        if row is None:
            return None
        return Lease(str(row[0]), int(row[1]), row[2], float(row[3]))

    async def close(self) -> None:
        """Close the connection (the next statement reconnects)."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
