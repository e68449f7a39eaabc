"""The store's identity: which store this is, what it consumes, which daemons ran on it.

Made when the database is created (schema v15): a random ``store_id`` and the time. The
first daemon that runs on the store records the Kafka side it consumes (bootstrap
servers, consumer group, topics); every daemon records its consumer-group member id when
it joins, so that a member left behind by a killed run is recognised as this store's
own (see :mod:`promptd.daemon.membership`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from promptd.storage.database import Database

#: How many member ids of earlier runs the store keeps.
KEEP_OWNERS: Final = 8


@dataclass(frozen=True, slots=True)
class Owner:
    """A consumer-group member id of a daemon that ran on this store, and its process."""

    member_id: str
    host: str
    pid: int
    #: The process's start time in the kernel's clock ticks since boot (``None`` where
    #: there is no /proc): with the pid, it names one process even if the pid is reused.
    started: int | None

    def to_json(self) -> dict[str, object]:
        """The stored form."""
        return {
            "member": self.member_id,
            "host": self.host,
            "pid": self.pid,
            "started": self.started,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Owner:
        """Inverse of :meth:`to_json`."""
        started = data.get("started")
        return cls(
            str(data["member"]),
            str(data["host"]),
            int(str(data["pid"])),
            None if started is None else int(str(started)),
        )


@dataclass(frozen=True, slots=True)
class StoreIdentity:
    """One row of ``store_identity``."""

    store_id: str
    created_at: float
    bootstrap_servers: str | None
    group_id: str | None
    topics: tuple[str, ...]
    #: The group members of the daemons that ran on this store, oldest first.
    owners: tuple[Owner, ...]


async def load_identity(db: Database) -> StoreIdentity:
    """The store's identity (every migrated database has one)."""
    async with db.reader.execute(
        "SELECT store_id, created_at, bootstrap_servers, group_id, topics, owners "
        "FROM store_identity WHERE id = 1"
    ) as cur:
        row = await cur.fetchone()
    if row is None:
        raise RuntimeError(f"the database {db.location!r} has no store identity row")
    store_id, created_at, bootstrap, group, topics, owners = row
    return StoreIdentity(
        str(store_id),
        float(created_at),
        bootstrap,
        group,
        tuple(json.loads(topics)) if topics else (),
        tuple(Owner.from_json(o) for o in json.loads(owners)),
    )


async def record_kafka(
    db: Database, bootstrap_servers: str, group_id: str, topics: Sequence[str]
) -> StoreIdentity:
    """Record the Kafka side the store consumes, the first time; returns the identity as
    stored (so a caller can tell when the settings no longer match it)."""
    async with db.transaction() as conn:
        await conn.execute(
            "UPDATE store_identity SET bootstrap_servers = ?, group_id = ?, topics = ? "
            "WHERE id = 1 AND group_id IS NULL",
            (bootstrap_servers, group_id, json.dumps(list(topics))),
        )
    return await load_identity(db)


async def record_owner(db: Database, owner: Owner) -> None:
    """Add a group member of this daemon to the store's owners (the newest
    :data:`KEEP_OWNERS` are kept)."""
    async with db.transaction() as conn:
        async with conn.execute("SELECT owners FROM store_identity WHERE id = 1") as cur:
            row = await cur.fetchone()
        kept = [o for o in json.loads(row[0] if row else "[]") if o["member"] != owner.member_id]
        owners = [*kept, owner.to_json()][-KEEP_OWNERS:]
        await conn.execute(
            "UPDATE store_identity SET owners = ? WHERE id = 1", (json.dumps(owners),)
        )
