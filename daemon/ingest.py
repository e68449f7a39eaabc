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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from promptd._aio import wait_event
from promptd.daemon.kafka import Headers, KafkaSendError, Producer, client_options
from promptd.daemon.settings import KafkaSettings
from promptd.events import FeedbackEvent, MetricEvent, Rejection, decode_event
from promptd.monitoring.metrics import IngestMetrics
from promptd.storage.repository import BatchOutcome, EventRepository

log = structlog.get_logger("promptd.ingest")

# Kafka commits are only for lag visibility, so one per second is plenty and keeps a
# broker round trip out of most batches.
COMMIT_INTERVAL_S = 1.0

BatchListener = Callable[[BatchOutcome], Awaitable[None]]


@dataclass(slots=True)
class IngestState:
    """Live view of the consumer for health checks and ``/v1/status``."""

    connected: bool = False
    started_at: float = field(default_factory=time.monotonic)
    last_poll_at: float = field(default_factory=time.monotonic)
    last_progress_at: float = field(default_factory=time.monotonic)
    assigned: frozenset[tuple[str, int]] = frozenset()
    lag: dict[tuple[str, int], int] = field(default_factory=dict)
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    stalled: bool = False
    last_error: str | None = None

    @property
    def total_lag(self) -> int:
        """Sum of the known per-partition lags."""
        return sum(self.lag.values())


@dataclass(slots=True)
class DecodedBatch:
    """One consumed batch after decoding, before storage."""

    metrics: list[MetricEvent] = field(default_factory=list)
    feedback: list[FeedbackEvent] = field(default_factory=list)
    dead: list[tuple[Any, Rejection]] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    consumed: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


def decode_batch(records: Mapping[Any, Sequence[Any]], max_record_bytes: int) -> DecodedBatch:
    """Decode a ``getmany`` result (partition -> records in offset order), pure."""
    batch = DecodedBatch()
    metrics, feedback, dead = batch.metrics, batch.feedback, batch.dead
    for tp, recs in records.items():
        if not recs:
            continue
        batch.offsets[(tp.topic, tp.partition)] = recs[-1].offset + 1
        batch.consumed[tp.topic] = batch.consumed.get(tp.topic, 0) + len(recs)
        for rec in recs:
            result = decode_event(rec.value, max_bytes=max_record_bytes)
            if type(result) is MetricEvent:
                metrics.append(result)
            elif type(result) is FeedbackEvent:
                feedback.append(result)
            else:
                dead.append((rec, result))  # type: ignore[arg-type]
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
        await self._ingestor.on_assigned(self._consumer, assigned)


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
    ) -> None:
        self.kafka = kafka
        self.bootstrap = bootstrap
        self.repo = repo
        self.producer = producer
        self.metrics = metrics
        self.listeners = list(listeners)
        self.state = IngestState()
        self._pending: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._uncommitted: dict[tuple[str, int], int] = {}
        self._last_commit = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, restarting with backoff after any failure."""
        self._stop = stop
        backoff = self.kafka.retry_backoff_initial_s
        while not stop.is_set():
            try:
                await self._consume(stop)
                backoff = self.kafka.retry_backoff_initial_s
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.state.connected = False
                self.metrics.kafka_connected.set(0)
                self.state.last_error = repr(exc)
                log.warning("ingest_restart", error=repr(exc), backoff_s=round(backoff, 2))
                await wait_event(stop, backoff)
                backoff = min(backoff * 2, self.kafka.retry_backoff_max_s)

    async def _consume(self, stop: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(
            **client_options(self.kafka, self.bootstrap),
            group_id=self.kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.kafka.fetch_max_wait_ms,
            max_partition_fetch_bytes=self.kafka.max_partition_fetch_bytes,
            session_timeout_ms=self.kafka.session_timeout_ms,
            heartbeat_interval_ms=self.kafka.heartbeat_interval_ms,
        )
        try:
            await asyncio.wait_for(consumer.start(), self.kafka.request_timeout_ms / 1000)
            consumer.subscribe(list(self.kafka.event_topics), listener=_Rebalance(self, consumer))
            self.state.connected = True
            self.metrics.kafka_connected.set(1)
            self.state.last_error = None
            log.info("consumer_started", topics=list(self.kafka.event_topics))
            while not stop.is_set():
                records = await consumer.getmany(
                    timeout_ms=500, max_records=self.kafka.max_batch_records
                )
                self.state.last_poll_at = time.monotonic()
                if records:
                    await self._handle(consumer, records)
                self._update_lag(consumer)
                if self._uncommitted and time.monotonic() - self._last_commit >= COMMIT_INTERVAL_S:
                    await self.commit_kafka(consumer)
            await self.drain()
            await self.commit_kafka(consumer)
        finally:
            await self.drain(raise_errors=False)
            self.state.assigned = frozenset()
            try:
                await asyncio.wait_for(consumer.stop(), self.kafka.commit_timeout_s)
            except (TimeoutError, KafkaError) as exc:
                log.warning("consumer_stop_failed", error=repr(exc))

    async def on_assigned(
        self, consumer: AIOKafkaConsumer, assigned: Sequence[TopicPartition]
    ) -> None:
        """Seek every assigned partition to the offset stored in SQLite."""
        keys = [(tp.topic, tp.partition) for tp in assigned]
        stored = await self.repo.load_offsets(keys)
        for tp in assigned:
            offset = stored.get((tp.topic, tp.partition))
            if offset is not None:
                consumer.seek(tp, offset)
                self.state.next_offsets[(tp.topic, tp.partition)] = offset
        self.state.assigned = frozenset(keys)
        self.state.last_progress_at = time.monotonic()
        log.info(
            "partitions_assigned",
            partitions=sorted(f"{t}:{p}" for t, p in keys),
            resumed_from_storage=len(stored),
        )

    async def _handle(
        self, consumer: AIOKafkaConsumer, records: Mapping[Any, Sequence[Any]]
    ) -> None:
        # The previous batch's write overlapped with fetching this one (network waits);
        # it must end before decoding, because decoding and sqlite3 (which re-takes the GIL
        # for every row) both need the GIL and measured slower when overlapped. Writes
        # stay in order, one in flight.
        await self.drain()
        batch = decode_batch(records, self.kafka.max_record_bytes)
        if batch.dead:
            await self._dead_letter(batch)
        self._pending = asyncio.create_task(self._store(consumer, batch), name="ingest-store")
        # Hand the write to SQLite's thread now, before the next fetch is awaited.
        await asyncio.sleep(0)

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

    async def _store(self, consumer: AIOKafkaConsumer, batch: DecodedBatch) -> None:
        reasons: dict[str, int] = {}
        for _rec, rej in batch.dead:
            reasons[rej.reason] = reasons.get(rej.reason, 0) + 1
        outcome = await self.repo.store_batch(batch.metrics, batch.feedback, batch.offsets, reasons)
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

    def _count(self, batch: DecodedBatch, outcome: BatchOutcome, reasons: dict[str, int]) -> None:
        m = self.metrics
        for topic, n in batch.consumed.items():
            m.consumed.labels(topic=topic).inc(n)
        m.stored.labels(type="metric").inc(outcome.metrics_stored)
        m.stored.labels(type="feedback").inc(outcome.feedback_stored)
        m.duplicates.inc(outcome.duplicates)
        for reason, n in reasons.items():
            m.dead_lettered.labels(reason=reason).inc(n)
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
        try:
            await asyncio.wait_for(consumer.commit(commit), self.kafka.commit_timeout_s)
        except (TimeoutError, KafkaError) as exc:
            self.metrics.commit_failures.inc()
            log.warning("kafka_commit_failed", error=repr(exc))

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

    def _update_lag(self, consumer: AIOKafkaConsumer) -> None:
        now = time.monotonic()
        for topic, partition in self.state.assigned:
            hw = consumer.highwater(TopicPartition(topic, partition))
            nxt = self.state.next_offsets.get((topic, partition))
            if hw is None or nxt is None:
                continue
            lag = max(0, int(hw) - nxt)
            self.state.lag[(topic, partition)] = lag
            self.metrics.lag.labels(topic=topic, partition=str(partition)).set(lag)
        for key in list(self.state.lag):
            if key not in self.state.assigned:
                del self.state.lag[key]
        stalled = (
            bool(self.state.assigned)
            and self.state.total_lag > 0
            and now - self.state.last_progress_at > self.kafka.stall_timeout_s
        )
        if stalled and not self.state.stalled:
            log.error("consumer_stalled", lag=self.state.total_lag)
        self.state.stalled = stalled
        self.metrics.consumer_stalled.set(1 if stalled else 0)

    def health(self) -> tuple[bool, str]:
        """Healthy unless stalled or the poll loop itself hangs."""
        now = time.monotonic()
        if self.state.stalled:
            return False, "consumer holds partitions with lag but makes no progress"
        if self.state.connected and now - self.state.last_poll_at > self.kafka.stall_timeout_s:
            return False, "the consumer loop has not polled within stall_timeout_s"
        return True, "ok"
