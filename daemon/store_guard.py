"""The store knows itself: a new store is not taken for the old one, and a killed run of
this store is not taken for a second daemon.

Both are decided when the consumer joins the group, with what the store recorded about
itself (:mod:`promptd.storage.identity`):

* **A new store while the group says data was consumed.** A database that has never
  stored an offset for the partitions it is assigned (a deleted, emptied or zero-byte
  file, the wrong data directory) is new. If the group's committed offsets for those
  partitions are past 0, the events up to them were stored in some other database, and
  resuming at the committed offsets would silently lose that store's registry and
  events. The daemon refuses with one line saying so and how to proceed: restore the
  database, or start over deliberately with ``promptd run --new-store``
  (``storage.accept_new_store``), which reads every partition from its earliest
  retained offset. The committed offsets come from the consumer's own ``committed()``
  for its assigned partitions (the test broker cannot list a group's offsets).
* **A killed run's membership.** A daemon killed with SIGKILL stays a member of the
  group until its session expires; a restart meanwhile waits for it or, if the broker
  splits the partitions with it, sees "another consumer". Each daemon records its
  member id in the store when it joins, with its process (host, pid and the process's
  start time, which tells a reused pid apart). A member recorded by this store whose
  process is gone (on this host; the data directory's lock says no other process of
  this store runs here) is a dead run: before joining, such members are removed from
  the group on their behalf (a LeaveGroup), and a first assignment shared only with
  them waits for the rebalance that follows instead of refusing. Any other member (one
  the store does not know, or whose process still runs: a daemon on a copy of this
  database) is a live second daemon, and is refused as before.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from promptd.daemon.kafka import group_members, remove_group_member
from promptd.daemon.settings import KafkaSettings
from promptd.storage.database import Database
from promptd.storage.identity import Owner, StoreIdentity, load_identity, record_owner

log = structlog.get_logger("promptd.ingest")

#: How many committed offsets a refusal names.
_SHOWN = 4


@dataclass
class StoreGuard:
    """What ingestion asks the store about itself when it joins the group."""

    db: Database
    kafka: KafkaSettings
    bootstrap: str
    identity: StoreIdentity
    #: ``storage.accept_new_store``: a new store starts over instead of refusing.
    accept_new_store: bool = False
    _recorded: set[str] = field(default_factory=set)

    async def remove_stale_members(self) -> list[str]:
        """Before joining: remove the group members that dead runs of this store left
        behind (best effort); returns their ids."""
        members = await group_members(self.kafka, self.bootstrap)
        stale, _ = await self._split([m for m, _ in members or ()])
        await self.remove(stale)
        return stale

    async def remove(self, stale: Sequence[str]) -> None:
        """Remove members of dead runs of this store from the group (best effort)."""
        for member in stale:
            try:
                await remove_group_member(self.kafka, self.bootstrap, member)
            except (KafkaError, OSError, TimeoutError) as exc:
                log.warning("consumer_group_stale_member_kept", member=member, error=repr(exc))
            else:
                log.warning(
                    "consumer_group_stale_member_removed",
                    member=member,
                    reason="a killed run of this store was still a group member",
                )

    async def joined(self, member_id: str | None) -> None:
        """Record this daemon's member id (and process) in the store, once per id."""
        if member_id and member_id not in self._recorded:
            await record_owner(self.db, this_process(member_id))
            self._recorded.add(member_id)

    async def split_members(self, mine: str | None) -> tuple[list[str], list[str]]:
        """The other members of the group: (dead runs of this store, and consumers this
        process replaced; the rest). The rest holds a placeholder when the group cannot
        be described."""
        members = await group_members(self.kafka, self.bootstrap)
        if members is None:
            return [], ["(the group could not be described)"]
        return await self._split([m for m, _ in members if m != mine])

    async def _split(self, members: Sequence[str]) -> tuple[list[str], list[str]]:
        owners = {o.member_id: o for o in (await load_identity(self.db)).owners}
        stale = [m for m in members if m in owners and process_gone(owners[m]) is True]
        return stale, [m for m in members if m not in stale]

    async def new_store_refusal(
        self, consumer: AIOKafkaConsumer, assigned: Sequence[TopicPartition]
    ) -> str | None:
        """For a store that never stored an offset of ``assigned``: why it must not
        start, or ``None`` (when it is accepted as new, every partition is read from its
        earliest offset)."""
        consumed: dict[str, int] = {}
        timeout = self.kafka.request_timeout_ms / 1000
        for tp in sorted(assigned):
            offset = await asyncio.wait_for(consumer.committed(tp), timeout)
            if offset is not None and offset > 0:
                consumed[f"{tp.topic}:{tp.partition}"] = int(offset)
        if not consumed:
            return None
        if self.accept_new_store:
            log.warning(
                "new_store_accepted",
                database=self.db.location,
                committed_offsets=consumed,
                action="reading every partition from its earliest offset",
            )
            await consumer.seek_to_beginning(*assigned)
            return None
        return self._refusal(consumed)

    def _refusal(self, consumed: dict[str, int]) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in list(consumed.items())[:_SHOWN])
        more = f" and {len(consumed) - _SHOWN} more" if len(consumed) > _SHOWN else ""
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.identity.created_at))
        restore = (
            "promptd restore BACKUP) or point storage.data_dir at it"
            if self.db.dialect == "sqlite"
            else "pg_restore of its pg_dump) or point storage.url at it"
        )
        return (
            f"the database {self.db.location!r} is a new store (id {self.identity.store_id}, "
            f"created {created}, no event stored) but consumer group "
            f"{self.kafka.group_id!r} has committed offsets ({shown}{more}): the events "
            "before them were stored in another database, which this one is not. Restore "
            f"that database ({restore}; to start over with an empty store that re-reads "
            "what Kafka still holds, run promptd run --new-store"
        )


def this_process(member_id: str) -> Owner:
    """This daemon's process as the owner of ``member_id``."""
    pid = os.getpid()
    return Owner(member_id, socket.gethostname(), pid, _start_ticks(pid))


def process_gone(owner: Owner) -> bool | None:
    """Whether the process that recorded ``owner`` has ended: ``None`` when it cannot be
    told (it ran on another host). This process counts as gone for a member id it no
    longer uses (a consumer it replaced)."""
    if owner.host != socket.gethostname():
        return None
    if owner.pid == os.getpid():
        return owner.started == _start_ticks(owner.pid)
    if Path("/proc").is_dir():
        # Gone, or the pid now names another process (started at another time).
        started = _start_ticks(owner.pid)
        return started is None or started != owner.started
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux /proc), or ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces) start at field 3.
    return int(stat.rsplit(")", 1)[1].split()[19])


def member_id(consumer: AIOKafkaConsumer) -> str | None:
    """The consumer's member id in its group (``None`` before it joined)."""
    coordinator: Any = getattr(consumer, "_coordinator", None)
    member = getattr(coordinator, "member_id", None)
    return member if isinstance(member, str) and member else None
