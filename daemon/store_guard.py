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
  member id in the store when it joins. The daemon holds the data directory's lock, so
  every earlier run of this store is dead: before joining, members recorded by this
  store are removed from the group on their behalf (a LeaveGroup), and a first
  assignment shared only with such members waits for the rebalance that follows
  instead of refusing. A member the store does not know is a live second daemon, and
  is refused as before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from promptd.daemon.kafka import group_members, remove_group_member
from promptd.daemon.settings import KafkaSettings
from promptd.storage.database import Database
from promptd.storage.identity import StoreIdentity, load_identity, record_owner

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
        """Before joining: remove the group members that earlier runs of this store left
        behind (best effort); returns their ids."""
        members = await group_members(self.kafka, self.bootstrap)
        owners = set((await load_identity(self.db)).owners)
        stale = [m for m, _ in members or () if m in owners]
        await self.remove(stale)
        return stale

    async def remove(self, stale: Sequence[str]) -> None:
        """Remove members of earlier runs of this store from the group (best effort)."""
        for member in stale:
            try:
                await remove_group_member(self.kafka, self.bootstrap, member)
            except (KafkaError, OSError, TimeoutError) as exc:
                log.warning("consumer_group_stale_member_kept", member=member, error=repr(exc))
            else:
                log.warning(
                    "consumer_group_stale_member_removed",
                    member=member,
                    reason="an earlier run of this store (killed?) was still a group member",
                )

    async def joined(self, member_id: str | None) -> None:
        """Record this daemon's member id in the store (once per id)."""
        if member_id and member_id not in self._recorded:
            await record_owner(self.db, member_id)
            self._recorded.add(member_id)

    async def split_members(self, mine: str | None) -> tuple[list[str], list[str]]:
        """The other members of the group: (earlier runs of this store, unknown ones).
        Unknown when the group cannot be described."""
        members = await group_members(self.kafka, self.bootstrap)
        if members is None:
            return [], ["(the group could not be described)"]
        owners = set((await load_identity(self.db)).owners) - self._recorded
        others = [m for m, _ in members if m != mine]
        return [m for m in others if m in owners], [m for m in others if m not in owners]

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
                database=str(self.db.path),
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
        return (
            f"the database {str(self.db.path)!r} is a new store (id {self.identity.store_id}, "
            f"created {created}, no event stored) but consumer group "
            f"{self.kafka.group_id!r} has committed offsets ({shown}{more}): the events "
            "before them were stored in another database, which this one is not. Restore "
            "that database (promptd restore BACKUP) or point storage.data_dir at it; to "
            "start over with an empty store that re-reads what Kafka still holds, run "
            "promptd run --new-store"
        )


def member_id(consumer: AIOKafkaConsumer) -> str | None:
    """The consumer's member id in its group (``None`` before it joined)."""
    coordinator: Any = getattr(consumer, "_coordinator", None)
    member = getattr(coordinator, "member_id", None)
    return member if isinstance(member, str) and member else None
