"""Kafka ingestion: consume event topics, dead-letter bad records, store batches once.

Delivery (see the design's "Delivery and durability"):

1. ``getmany`` a batch; decode every record; records that are not valid events are
   sent to the dead-letter topic *first*, with headers naming the reason and source,
   and the sends are awaited (bounded), so a crash can repeat a dead letter but never
   lose one.
2. The valid events and the partitions' next offsets are written in one SQLite
   transaction (idempotent by ``event_id``). SQLite, not the broker, is the truth: on
   assignment the consumer seeks to the offsets stored there.
3. Offsets are then committed to Kafka, bounded by a timeout, only so that lag shows in
   the usual tools; a failed commit is counted and harmless.

Writes are pipelined one deep: batch N+1 is fetched while batch N is being written in
SQLite's thread (it is decoded only after that write ends: both need the GIL). Any
failure (broker gone, disk full) closes the consumer, waits with exponential backoff and
starts over from the stored offsets: it never crash-loops and never skips.

Broker resets: a stored offset past a partition's log means the log started over (the
broker restarted empty, the topic was recreated). After every fetch the stored offsets
are compared with the high-water marks the fetch answered (not ListOffsets, which the
test broker gets wrong), and out-of-range fetches are caught (``auto_offset_reset`` is
``none``, so aiokafka never resets silently). Either way the partition is re-read from
its earliest offset (deduplication by ``event_id`` makes that safe), and the reset is
counted, logged (``kafka_offset_reset``) and alerted.

Poison: a record batch that cannot be decoded (corrupt, or an unknown codec; gzip,
snappy, lz4 and zstd are all read) halts ingestion loudly rather than skip it: nothing
is lost, ``/healthz`` and ``/readyz`` fail naming the error, an alert fires.

One daemon per consumer group: a daemon whose first assignment lacks some partitions of
its topics shares the group with another member; it refuses to consume (raises
:class:`GroupConflictError`) and leaves the group. A daemon that already ran alone keeps
consuming its share but turns unready and logs an error until it has every partition.
Members left behind by killed runs of this same store are not "another member", and a
new store is not taken for the one the group fed (:mod:`.store_guard`,
:class:`NewStoreError`).
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import math
import operator
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cramjam
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    KafkaError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    UnsupportedCodecError,
)

from promptd._aio import wait_event
from promptd.daemon.decode import RowDecoder
from promptd.daemon.health import IngestState, Verdict, is_stalled, liveness, readiness
from promptd.daemon.kafka import (
    Headers,
    KafkaSendError,
    Producer,
    client_options,
    describe_group_members,
    ensure_topics,
)
from promptd.daemon.settings import KafkaSettings
from promptd.daemon.store_guard import StoreGuard, member_id
from promptd.events import Rejection
from promptd.monitoring.eventtime import PartitionClock
from promptd.monitoring.metrics import IngestMetrics
from promptd.storage.database import Fence, FencedError
from promptd.storage.repository import OTLP_COUNTERS, BatchOutcome, BatchTime, EventRepository
from promptd.storage.rows import FeedbackRow, MetricRow

if TYPE_CHECKING:
    # Only a daemon that reads the OTLP topic loads protobuf (see app.py).
    from promptd.daemon.otlp.decoder import OtlpDecoder

log = structlog.get_logger("promptd.ingest")

# Kafka commits are only for lag visibility, so one per second is plenty and keeps a
# broker round trip out of most batches.
COMMIT_INTERVAL_S = 1.0

# What a record batch that cannot be decoded raises out of ``getmany`` (aiokafka's own
# errors, or the codec's: cramjam for snappy/lz4/zstd, the standard library for gzip).
DECODE_ERRORS: tuple[type[Exception], ...] = (
    UnsupportedCodecError,
    CorruptRecordException,
    cramjam.DecompressionError,
    gzip.BadGzipFile,
    zlib.error,
    EOFError,
)

BatchListener = Callable[[BatchOutcome], Awaitable[None]]
Key = tuple[str, int]


class IngestRefusedError(RuntimeError):
    """This daemon must not consume (one line for the operator says why)."""


class GroupConflictError(IngestRefusedError):
    """Another member shares the consumer group: this daemon refuses to consume."""


class NewStoreError(IngestRefusedError):
    """A new store while the group's committed offsets say events were consumed."""


class GroupBusyError(RuntimeError):
    """On a shared store, the group still holds another member when this daemon starts
    to lead: a former leader whose session has not expired yet. Ingestion leaves the
    group and joins again after a backoff (retried like any failure)."""


@dataclass(frozen=True, slots=True)
class IngestAlert:
    """A data-safety alert raised by ingestion (offset reset, halt)."""

    rule: str
    labels: dict[str, str]
    reason: str
    metric: str = ""
    value: float | None = None
    threshold: float | None = None
    severity: str = "critical"


AlertHook = Callable[[IngestAlert], None]
StorageCheck = Callable[[], str | None]


@dataclass(frozen=True, slots=True)
class OffsetReset:
    """A partition whose stored offset lies past its log."""

    topic: str
    partition: int
    stored_offset: int
    high_watermark: int | None
    reason: str


def find_resets(
    stored: Mapping[Key, int], highwaters: Mapping[Key, int | None]
) -> list[OffsetReset]:
    """Partitions whose stored next offset is beyond the high-water mark, pure.

    The high-water mark comes from the latest fetch answer, which is never older than
    any record stored, so in a log that only grows it is never below a stored offset.
    """
    out = []
    for (topic, partition), hw in highwaters.items():
        offset = stored.get((topic, partition))
        if hw is not None and offset is not None and hw < offset:
            out.append(OffsetReset(topic, partition, offset, hw, "log_behind_stored_offset"))
    return out


@dataclass(slots=True)
class DecodedBatch:
    """One consumed batch after decoding, before storage."""

    metrics: list[MetricRow] = field(default_factory=list)
    feedback: list[FeedbackRow] = field(default_factory=list)
    dead: list[tuple[Any, Rejection]] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    consumed: dict[str, int] = field(default_factory=dict)
    #: What the OTLP decoder counted of the batch's spans (``spans.call``, ...).
    spans: dict[str, int] = field(default_factory=dict)
    # The newest event ts of each partition's valid records (its watermark's candidate).
    newest: dict[tuple[str, int], float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


_TS = operator.itemgetter(1)


def decode_batch(
    records: Mapping[Any, Sequence[Any]], decoder: RowDecoder, otlp: OtlpDecoder | None = None
) -> DecodedBatch:
    """Decode a ``getmany`` result (partition -> records in offset order) to rows; the
    OTLP topic's records through ``otlp``."""
    batch = DecodedBatch()
    metrics, feedback, dead = batch.metrics, batch.feedback, batch.dead
    for tp, recs in records.items():
        if not recs:
            continue
        key = (tp.topic, tp.partition)
        batch.offsets[key] = recs[-1].offset + 1
        batch.consumed[tp.topic] = batch.consumed.get(tp.topic, 0) + len(recs)
        first_metric, first_feedback = len(metrics), len(feedback)
        is_otlp = otlp is not None and tp.topic == otlp.topic
        decode = otlp.decode_into if otlp is not None and is_otlp else decoder.decode_into
        for rec in recs:
            rejection = decode(rec.value, metrics, feedback)
            if rejection is not None:
                dead.append((rec, rejection))
        newest = max(
            max(map(_TS, metrics[first_metric:]), default=-math.inf),
            max(map(_TS, feedback[first_feedback:]), default=-math.inf),
        )
        if newest > -math.inf:
            batch.newest[key] = newest
    if otlp is not None:
        batch.spans = otlp.take_counts()
    return batch


def dead_letter_record(
    rec: Any, rejection: Rejection
) -> tuple[bytes | None, bytes | None, Headers]:
    """The dead-letter copy of ``rec``: value and key unchanged, headers saying why."""
    headers: list[tuple[str, bytes]] = list(rec.headers or ())
    headers += [
        ("promptd-reason", rejection.reason.encode()),
        ("promptd-detail", rejection.detail.encode()[:1000]),
        ("promptd-source-topic", str(rec.topic).encode()),
        ("promptd-source-partition", str(rec.partition).encode()),
        ("promptd-source-offset", str(rec.offset).encode()),
    ]
    return rec.key, rec.value, headers


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, ingestor: Ingestor, consumer: AIOKafkaConsumer) -> None:
        self._ingestor = ingestor
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Finish the write in hand so the next owner resumes after it.
        await self._ingestor.drain()
        await self._ingestor.commit_kafka(self._consumer)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        try:
            await self._ingestor.on_assigned(self._consumer, assigned)
        except Exception as exc:
            # aiokafka would log this and consume from the group's offsets instead of the
            # stored ones: hold the partitions and let the loop restart the consumer.
            self._consumer.pause(*assigned)
            self._ingestor.assign_error = exc


class Ingestor:
    """The consumer loop; run it as a task and set ``stop`` to end it after the batch."""

    def __init__(
        self,
        kafka: KafkaSettings,
        bootstrap: str,
        repo: EventRepository,
        producer: Producer,
        metrics: IngestMetrics,
        listeners: Sequence[BatchListener] = (),
        alert: AlertHook | None = None,
        storage_check: StorageCheck | None = None,
        guard: StoreGuard | None = None,
        fence: Fence | None = None,
        otlp: OtlpDecoder | None = None,
    ) -> None:
        self.kafka = kafka
        self.bootstrap = bootstrap
        self.repo = repo
        self.producer = producer
        self.metrics = metrics
        self.listeners = list(listeners)
        self.alert = alert
        # Called before every write and commit: a reason when the database file is gone.
        self.storage_check = storage_check
        # On a shared store: the leadership, checked before a batch has any effect (dead
        # letters included); the store checks it again inside the write.
        self.fence = fence
        # Daemons sharing a store share the group: only the leader consumes, and a
        # member it meets is a former leader on its way out (GroupBusyError).
        self.shared = fence is not None
        self.state = IngestState()
        self._decoder = RowDecoder(kafka.max_record_bytes)
        # Records of the OTLP topic (OpenTelemetry spans), when it is read.
        self._otlp = otlp
        self._pending: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._uncommitted: dict[Key, int] = {}
        self._last_commit = 0.0
        self._was_alone = False
        self._refusal: IngestRefusedError | GroupBusyError | None = None
        # What the store knows of itself (None: no checks, e.g. in unit tests).
        self.guard = guard
        # While only earlier runs of this store share the group: give up at this time.
        self._stale_until: float | None = None
        #: Why the last assignment could not be handled (the loop restarts the consumer).
        self.assign_error: Exception | None = None
        self._last_topic_check = 0.0
        # Event time of the assigned partitions (see monitoring/eventtime.py).
        self._clock = PartitionClock()

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set or ingestion halts, restarting with backoff
        after any failure; raises :class:`IngestRefusedError` when it must not run."""
        self._stop = stop
        # What is alive when consumption starts (modules, settings, rebuilt windows) lives
        # as long as the daemon. Ingestion allocates fast enough to trigger a full garbage
        # collection every few hundred milliseconds, and frozen objects are not rescanned
        # by them: about 1 us less CPU per event (bench/ingest.py). Collect first so that
        # no garbage is frozen; unfreeze at the end so that a process running several
        # daemons one after another (the tests) frees each one.
        gc.collect()
        gc.freeze()
        try:
            await self._consume_until(stop)
        finally:
            gc.unfreeze()

    async def _consume_until(self, stop: asyncio.Event) -> None:
        backoff = self.kafka.retry_backoff_initial_s
        while not stop.is_set() and self.state.halted is None:
            try:
                await self._consume(stop)
                backoff = self.kafka.retry_backoff_initial_s
            except (asyncio.CancelledError, IngestRefusedError, FencedError):
                raise
            except UndecodableBatchError as exc:
                self.metrics.undecodable_batches.inc()
                self.halt("undecodable record batch", str(exc), rule="kafka_undecodable_batch")
            except Exception as exc:
                self.state.connected = False
                self.metrics.kafka_connected.set(0)
                self.state.last_error = repr(exc)
                if self.state.halted is not None:
                    break
                log.warning("ingest_restart", error=repr(exc), backoff_s=round(backoff, 2))
                await wait_event(stop, backoff)
                backoff = min(backoff * 2, self.kafka.retry_backoff_max_s)
        self.state.connected = False
        self.metrics.kafka_connected.set(0)

    def halt(self, what: str, detail: str, rule: str) -> None:
        """Stop ingesting for good in this process: logged, alerted, unhealthy."""
        if self.state.halted is not None:
            return
        self.state.halted = f"{what}: {detail}"
        log.error("ingest_halted", reason=what, detail=detail)
        self._raise_alert(IngestAlert(rule, {}, self.state.halted))

    def _stopping(self, stop: asyncio.Event) -> bool:
        return stop.is_set() or self.state.halted is not None

    async def _consume(self, stop: asyncio.Event) -> None:
        self._refusal = None
        consumer = AIOKafkaConsumer(
            **client_options(self.kafka, self.bootstrap),
            group_id=self.kafka.group_id,
            enable_auto_commit=False,
            # Never reset silently: out-of-range and missing offsets come to _fetch.
            auto_offset_reset="none",
            fetch_max_wait_ms=self.kafka.fetch_max_wait_ms,
            max_partition_fetch_bytes=self.kafka.max_partition_fetch_bytes,
            session_timeout_ms=self.kafka.session_timeout_ms,
            heartbeat_interval_ms=self.kafka.heartbeat_interval_ms,
        )
        try:
            await asyncio.wait_for(consumer.start(), self.kafka.request_timeout_ms / 1000)
            if self.guard is not None:
                await self.guard.remove_stale_members()
            consumer.subscribe(list(self.kafka.event_topics), listener=_Rebalance(self, consumer))
            self.state.connected = True
            self.metrics.kafka_connected.set(1)
            self.state.last_error = None
            log.info("consumer_started", topics=list(self.kafka.event_topics))
            while not self._stopping(stop):
                records = await self._fetch(consumer)
                self.state.last_poll_at = time.monotonic()
                if self._refusal is not None:
                    raise self._refusal
                if self.assign_error is not None:
                    error, self.assign_error = self.assign_error, None
                    raise error
                if self._stale_until is not None and time.monotonic() > self._stale_until:
                    raise GroupConflictError(
                        f"consumer group {self.kafka.group_id!r}: members left by earlier "
                        "runs of this store did not leave within 3 session timeouts; "
                        "check that no other daemon uses this store"
                    )
                if self._pending is not None and self._pending.done():
                    # A failed write surfaces now (and restarts from storage), not only
                    # when the next records arrive.
                    await self.drain()
                if records:
                    await self._handle(consumer, records)
                await self._reset_if_behind(consumer)
                self._update_lag(consumer)
                await self._recreate_topics_if_gone()
                if self._uncommitted and time.monotonic() - self._last_commit >= COMMIT_INTERVAL_S:
                    await self.commit_kafka(consumer)
            await self.drain()
            await self.commit_kafka(consumer)
        finally:
            await self.drain(raise_errors=False)
            self._set_assigned(frozenset())
            try:
                await asyncio.wait_for(consumer.stop(), self.kafka.commit_timeout_s)
            except (TimeoutError, KafkaError) as exc:
                log.warning("consumer_stop_failed", error=repr(exc))

    async def _fetch(self, consumer: AIOKafkaConsumer) -> Mapping[Any, Sequence[Any]]:
        """``getmany``, with the partition errors that need a decision handled here."""
        try:
            records: Mapping[Any, Sequence[Any]] = await consumer.getmany(
                timeout_ms=500, max_records=self.kafka.max_batch_records
            )
        except OffsetOutOfRangeError as exc:
            await self._out_of_range(consumer, exc.args[0] if exc.args else {})
        except NoOffsetForPartitionError as exc:
            # A partition new to this store and to the group: read it from the start.
            fresh = [tp for tp in exc.args if tp in consumer.assignment()]
            if fresh:
                await consumer.seek_to_beginning(*fresh)
        except DECODE_ERRORS as exc:
            raise UndecodableBatchError(repr(exc)) from exc
        else:
            return records
        return {}

    # -- assignment and group --------------------------------------------------------

    async def on_assigned(
        self, consumer: AIOKafkaConsumer, assigned: Sequence[TopicPartition]
    ) -> None:
        """Check the group is ours alone and the store is the group's, then seek every
        partition to its stored offset."""
        keys = [(tp.topic, tp.partition) for tp in assigned]
        # aiokafka's fetcher starts on the new assignment while this listener awaits: left
        # fetchable, a partition is read from the group's committed offset (behind the
        # stored one: duplicates) until the seek below. Held until the seek.
        consumer.pause(*assigned)
        mine = member_id(consumer)
        if self.guard is not None:
            await self.guard.joined(mine)
        missing = self._partitions_elsewhere(consumer, keys)
        if missing and not self._was_alone:
            # Refuse (or wait) before any fetch: pause, and let the loop decide.
            consumer.pause(*assigned)
            self._set_assigned(frozenset())
            if await self._only_stale_members(mine):
                return
            if self.shared:
                self._refusal = GroupBusyError(
                    f"consumer group {self.kafka.group_id!r} still holds another member "
                    f"({len(missing)} of {len(keys) + len(missing)} partitions elsewhere): a "
                    "former leader whose session has not expired; joining again shortly"
                )
            else:
                self._refusal = GroupConflictError(await self._conflict_message(keys, missing))
            self.state.group_conflict = str(self._refusal)
            return
        if missing:
            self.state.group_conflict = await self._conflict_message(keys, missing)
            log.error("consumer_group_shared", reason=self.state.group_conflict)
        else:
            self._was_alone = True
            self._stale_until = None
            self.state.group_conflict = None
        stored = await self.repo.load_offsets(keys)
        if not stored and self.guard is not None:
            refusal = await self.guard.new_store_refusal(consumer, assigned)
            if refusal is not None:
                consumer.pause(*assigned)
                self._refusal = NewStoreError(refusal)
                return
        self._clock.load(await self.repo.load_watermarks(keys))
        for tp in assigned:
            offset = stored.get((tp.topic, tp.partition))
            if offset is not None:
                consumer.seek(tp, offset)
                self.state.next_offsets[(tp.topic, tp.partition)] = offset
        consumer.resume(*assigned)
        self._set_assigned(frozenset(keys))
        log.info(
            "partitions_assigned",
            partitions=sorted(f"{t}:{p}" for t, p in keys),
            resumed_from_storage=len(stored),
        )

    async def _only_stale_members(self, mine: str | None) -> bool:
        """Whether every other member was left by an earlier run of this store; if so,
        remove them and wait (bounded) for the rebalance that gives this daemon all."""
        if self.guard is None:
            return False
        stale, unknown = await self.guard.split_members(mine)
        if unknown or not stale:
            return False
        await self.guard.remove(stale)
        if self._stale_until is None:
            self._stale_until = time.monotonic() + 3 * self.kafka.session_timeout_ms / 1000
        self.state.group_conflict = (
            f"waiting for members left by earlier runs of this store to leave: {stale}"
        )
        log.warning("consumer_group_stale_members", members=stale, action="waiting")
        return True

    def _partitions_elsewhere(self, consumer: AIOKafkaConsumer, keys: Sequence[Key]) -> list[Key]:
        """Partitions of our topics that exist but were given to another member."""
        mine = set(keys)
        out = []
        for topic in self.kafka.event_topics:
            for partition in sorted(consumer.partitions_for_topic(topic) or ()):
                if (topic, partition) not in mine:
                    out.append((topic, partition))
        return out

    async def _conflict_message(self, keys: Sequence[Key], missing: Sequence[Key]) -> str:
        members = await describe_group_members(self.kafka, self.bootstrap)
        shown = f"; members: {', '.join(members)}" if members else ""
        return (
            f"consumer group {self.kafka.group_id!r} is shared with another consumer: this "
            f"daemon was assigned {len(keys)} of {len(keys) + len(missing)} partitions"
            f"{shown}. One daemon per consumer group until scale-out exists: stop the "
            "other daemon or give this one its own kafka.group_id"
        )

    def _set_assigned(self, assigned: frozenset[Key]) -> None:
        now = time.monotonic()
        if assigned:
            self.state.unassigned_since = None
            self.state.last_answer_at = now
        elif self.state.unassigned_since is None:
            self.state.unassigned_since = now
        self.state.assigned = assigned

    async def _recreate_topics_if_gone(self) -> None:
        """Without partitions for a while (the broker restarted empty, the topics were
        deleted), create the topics again when the daemon is allowed to."""
        since = self.state.unassigned_since
        now = time.monotonic()
        limit = self.kafka.readiness_timeout_s
        if (
            not self.kafka.create_topics
            or since is None
            or now - since < limit
            or now - self._last_topic_check < limit
        ):
            return
        self._last_topic_check = now
        try:
            created = await ensure_topics(self.kafka, self.bootstrap, timeout_s=limit)
        except Exception as exc:
            log.warning("topic_check_failed", error=repr(exc))
        else:
            if created:
                log.warning("topics_recreated", topics=created)

    # -- broker resets -------------------------------------------------------------

    async def _reset_if_behind(self, consumer: AIOKafkaConsumer) -> None:
        """Re-read every partition whose log is now shorter than its stored offset."""
        assigned = consumer.assignment()
        highwaters = {(tp.topic, tp.partition): consumer.highwater(tp) for tp in assigned}
        if not find_resets(self.state.next_offsets, highwaters):
            return
        # The write in flight may move stored offsets; decide on the settled ones.
        await self.drain()
        for reset in find_resets(self.state.next_offsets, highwaters):
            await self._reread(consumer, reset)

    async def _out_of_range(
        self, consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int]
    ) -> None:
        await self.drain()
        for tp, offset in offsets.items():
            if tp not in consumer.assignment():
                continue
            hw = consumer.highwater(tp)
            reason = "past_log_end" if hw is not None and offset >= hw else "out_of_range"
            await self._reread(
                consumer, OffsetReset(tp.topic, tp.partition, int(offset), hw, reason)
            )

    async def _reread(self, consumer: AIOKafkaConsumer, reset: OffsetReset) -> None:
        key = (reset.topic, reset.partition)
        await consumer.seek_to_beginning(TopicPartition(*key))
        self.state.next_offsets.pop(key, None)
        self._uncommitted.pop(key, None)
        self.state.lag.pop(key, None)
        self.state.offset_resets += 1
        self.metrics.offset_resets.labels(topic=reset.topic, reason=reset.reason).inc()
        log.warning(
            "kafka_offset_reset",
            topic=reset.topic,
            partition=reset.partition,
            stored_offset=reset.stored_offset,
            high_watermark=reset.high_watermark,
            reason=reset.reason,
            action="re-reading the partition from its earliest offset (duplicates are ignored)",
        )
        self._raise_alert(
            IngestAlert(
                "kafka_offset_reset",
                {"topic": reset.topic, "partition": str(reset.partition)},
                reset.reason,
                metric="stored_offset",
                value=float(reset.stored_offset),
                threshold=None if reset.high_watermark is None else float(reset.high_watermark),
            )
        )

    def _raise_alert(self, alert: IngestAlert) -> None:
        if self.alert is None:
            return
        try:
            self.alert(alert)
        except Exception:
            log.exception("ingest_alert_failed", rule=alert.rule)

    # -- batches -------------------------------------------------------------------

    async def _handle(
        self, consumer: AIOKafkaConsumer, records: Mapping[Any, Sequence[Any]]
    ) -> None:
        # The previous batch's write overlapped with fetching this one (network waits);
        # it must end before decoding, because decoding and sqlite3 (which re-takes the GIL
        # for every row) both need the GIL and measured slower when overlapped. Writes
        # stay in order, one in flight.
        await self.drain()
        if self.fence is not None and self.fence.token() is None:
            reason = "the lease is no longer renewed in time"
            self.fence.fenced(reason)
            raise FencedError(f"batch not handled: {reason}; the leader consumes it")
        if self._otlp is not None and any(tp.topic == self._otlp.topic for tp in records):
            await self._otlp.versions.refresh()
        batch = decode_batch(records, self._decoder, self._otlp)
        if batch.dead:
            await self._dead_letter(batch)
        clock = self._batch_time(consumer, batch)
        self.state.write_started_at = time.monotonic()
        self._pending = asyncio.create_task(
            self._store(consumer, batch, clock), name="ingest-store"
        )
        # Hand the write to SQLite's thread now, before the next fetch is awaited.
        await asyncio.sleep(0)

    def _batch_time(self, consumer: AIOKafkaConsumer, batch: DecodedBatch) -> BatchTime:
        """The batch's event time: its window watermark is the minimum watermark of its
        own partitions and of every assigned partition with records left to store."""
        unread = [key for key in self.state.assigned if self._has_unread(consumer, key)]
        return self._clock.batch_time(batch.offsets, unread, batch.newest, self._clock.stamp())

    def _has_unread(self, consumer: AIOKafkaConsumer, key: Key) -> bool:
        """Whether ``key`` may have records not stored yet (unknown counts as yes)."""
        tp = TopicPartition(*key)
        hw = consumer.highwater(tp)
        if hw is None:
            return True
        stored = self.state.next_offsets.get(key)
        if stored is None:
            stored = _position(consumer, tp)
        return stored is None or hw > stored

    async def _dead_letter(self, batch: DecodedBatch) -> None:
        records = [dead_letter_record(rec, rej) for rec, rej in batch.dead]
        backoff = self.kafka.retry_backoff_initial_s
        while True:
            try:
                await self.producer.send_many(self.kafka.dlq_topic, records)
                return
            except KafkaSendError as exc:
                if self._stop.is_set():
                    # Shutting down: leave the batch unstored; it is consumed again.
                    raise
                # Not storing the batch until its dead letters are out keeps them
                # from being lost; the consumer holds here, and reports it.
                log.warning("dead_letter_send_failed", error=str(exc), records=len(records))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.kafka.retry_backoff_max_s)

    async def _store(
        self, consumer: AIOKafkaConsumer, batch: DecodedBatch, clock: BatchTime
    ) -> None:
        reasons: dict[str, int] = {}
        for _rec, rej in batch.dead:
            reasons[rej.reason] = reasons.get(rej.reason, 0) + 1
        try:
            self._check_storage()
            outcome = await self.repo.store_batch(
                batch.metrics,
                batch.feedback,
                batch.offsets,
                reasons,
                {f"{OTLP_COUNTERS}.{k}": n for k, n in batch.spans.items()},
                clock=clock,
            )
        except Exception as exc:
            self.state.write_error = repr(exc)
            raise
        finally:
            self.state.write_started_at = None
        self._clock.apply(clock.partition_watermarks or {})
        self.state.write_error = None
        self.state.next_offsets.update(batch.offsets)
        self.state.last_progress_at = time.monotonic()
        self._count(batch, outcome, reasons)
        self._update_lag(consumer)
        self._uncommitted.update(batch.offsets)
        if time.monotonic() - self._last_commit >= COMMIT_INTERVAL_S:
            await self.commit_kafka(consumer)
        for listener in self.listeners:
            try:
                await listener(outcome)
            except Exception:
                # A broken consumer of the stream (monitor, …) must not stop ingestion.
                log.exception(
                    "batch_listener_failed", listener=getattr(listener, "__qualname__", "?")
                )

    def _check_storage(self) -> None:
        problem = self.storage_check() if self.storage_check is not None else None
        if problem is not None:
            self.halt("database file changed", problem, rule="database_file_changed")
            raise StorageGoneError(problem)

    def _count(self, batch: DecodedBatch, outcome: BatchOutcome, reasons: dict[str, int]) -> None:
        m = self.metrics
        for topic, n in batch.consumed.items():
            m.consumed.labels(topic=topic).inc(n)
        m.stored.labels(type="metric").inc(outcome.metrics_stored)
        m.stored.labels(type="feedback").inc(outcome.feedback_stored)
        m.duplicates.inc(outcome.duplicates)
        for reason, n in reasons.items():
            m.dead_lettered.labels(reason=reason).inc(n)
        for outcome_name, n in batch.spans.items():
            m.otlp.labels(outcome=outcome_name).inc(n)
        elapsed = time.perf_counter() - batch.started
        m.batch_duration.observe(elapsed)
        log.debug(
            "batch_stored",
            consumed=sum(batch.consumed.values()),
            stored=outcome.stored,
            duplicates=outcome.duplicates,
            dead_lettered=len(batch.dead),
            duration_ms=round(elapsed * 1000, 2),
        )

    async def commit_kafka(self, consumer: AIOKafkaConsumer) -> None:
        """Commit the stored offsets to Kafka (for lag tools only; bounded, never fatal)."""
        offsets, self._uncommitted = self._uncommitted, {}
        self._last_commit = time.monotonic()
        assigned = self.state.assigned
        commit = {TopicPartition(t, p): o for (t, p), o in offsets.items() if (t, p) in assigned}
        if not commit:
            return
        # Offsets of writes that went to a deleted file must not become the group's
        # starting point for a fresh database.
        if self.storage_check is not None and self.storage_check() is not None:
            return
        try:
            await asyncio.wait_for(consumer.commit(commit), self.kafka.commit_timeout_s)
        except (TimeoutError, KafkaError) as exc:
            self.metrics.commit_failures.inc()
            log.warning("kafka_commit_failed", error=repr(exc))

    @property
    def writing(self) -> bool:
        """Whether a batch write is in flight (its listeners, the monitor's windows among
        them, run when it has committed)."""
        return self._pending is not None and not self._pending.done()

    async def drain(self, raise_errors: bool = True) -> None:
        """Wait for the batch write in flight, if any."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            await pending
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if raise_errors:
                raise
            log.error("batch_store_failed", error=repr(exc))

    # -- observation -----------------------------------------------------------------

    def _update_lag(self, consumer: AIOKafkaConsumer) -> None:
        now = time.monotonic()
        answered_ms = 0
        for topic, partition in self.state.assigned:
            tp = TopicPartition(topic, partition)
            answered_ms = max(answered_ms, consumer.last_poll_timestamp(tp) or 0)
            hw = consumer.highwater(tp)
            if hw is None:
                continue
            # Nothing stored yet from this partition: all of its log is still to store.
            lag = max(0, int(hw) - self.state.next_offsets.get((topic, partition), 0))
            self.state.lag[(topic, partition)] = lag
            self.metrics.lag.labels(topic=topic, partition=str(partition)).set(lag)
        if answered_ms:
            # aiokafka stamps fetch answers with wall-clock milliseconds.
            answered = now - max(0.0, time.time() - answered_ms / 1000)
            self.state.last_answer_at = max(self.state.last_answer_at or 0.0, answered)
        if self.state.assigned:
            # Lag of partitions lost to a rebalance is no longer ours to report; across
            # a consumer restart (nothing assigned) it is kept, with the stall timer.
            for key in list(self.state.lag):
                if key not in self.state.assigned:
                    del self.state.lag[key]
        if self.state.assigned and self.state.total_lag == 0:
            # Nothing to store is not a stall.
            self.state.last_progress_at = now
        stalled = is_stalled(self.state, self.kafka, now)
        if stalled and not self.state.stalled:
            log.error("consumer_stalled", lag=self.state.total_lag)
        self.state.stalled = stalled
        self.metrics.consumer_stalled.set(1 if stalled else 0)

    def health(self) -> tuple[bool, str]:
        """Liveness (``/healthz``), see :mod:`promptd.daemon.health`."""
        verdict: Verdict = liveness(self.state, self.kafka, time.monotonic())
        return verdict.ok, verdict.reason

    def readiness(self) -> tuple[bool, str]:
        """Readiness (``/readyz``), see :mod:`promptd.daemon.health`."""
        verdict = readiness(self.state, self.kafka, time.monotonic())
        return verdict.ok, verdict.reason


def _position(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The consumer's position in ``tp`` if it has one, without waiting for it.

    ``AIOKafkaConsumer.position`` waits (up to the request timeout) for a position it does
    not have yet; this reads aiokafka's subscription state instead, and says ``None`` if
    that internal ever changes shape.
    """
    try:
        state = consumer._subscription.subscription.assignment.state_value(tp)
        return int(state.position) if state is not None and state.has_valid_position else None
    except (AttributeError, TypeError, KeyError):
        return None


class UndecodableBatchError(RuntimeError):
    """A fetched record batch cannot be decoded (corrupt data or an unknown codec)."""


class StorageGoneError(RuntimeError):
    """The database file was deleted or replaced under the running daemon."""
