"""Event storage: idempotent batch writes with consumer offsets, counters, retention.

A batch is written in one ``BEGIN IMMEDIATE`` transaction together with the next
offsets of the partitions it came from, so the database alone says where ingestion
resumes after a crash. Events insert with ``ON CONFLICT(event_id) DO NOTHING`` (not
``INSERT OR IGNORE``, which would also swallow CHECK violations); the difference between
rows offered and rows inserted is the duplicate count.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import aiosqlite

from promptd.events import FeedbackEvent, MetricEvent
from promptd.storage.database import Database

TopicPartitionKey = tuple[str, int]
E = TypeVar("E", MetricEvent, FeedbackEvent)

_INSERT_METRIC: Final = """
INSERT INTO metric_events (event_id, ts, prompt, variant, model, request_id, unit_id,
    latency_ms, success, error, quality, tokens_in, tokens_out, cost_usd, input, output,
    attributes, ingested_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (event_id) DO NOTHING
"""
_INSERT_FEEDBACK: Final = """
INSERT INTO feedback_events (event_id, ts, prompt, variant, model, request_id, score, kind,
    comment, correction, ingested_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (event_id) DO NOTHING
"""
_UPSERT_OFFSET: Final = """
INSERT INTO consumer_offsets (topic, partition, next_offset, updated_at) VALUES (?, ?, ?, ?)
ON CONFLICT (topic, partition) DO UPDATE SET
    next_offset = excluded.next_offset, updated_at = excluded.updated_at
"""
_ADD_COUNTER: Final = """
INSERT INTO counters (name, value) VALUES (?, ?)
ON CONFLICT (name) DO UPDATE SET value = value + excluded.value
"""

#: Counter names kept in the ``counters`` table (dead letters add ``dead_lettered.<reason>``).
STORED_METRICS: Final = "stored.metric"
STORED_FEEDBACK: Final = "stored.feedback"
DUPLICATES: Final = "duplicates"
DEAD_LETTERED: Final = "dead_lettered"


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What one batch write did."""

    metrics_stored: int
    feedback_stored: int
    duplicates: int
    metrics: tuple[MetricEvent, ...] = ()
    feedback: tuple[FeedbackEvent, ...] = ()

    @property
    def stored(self) -> int:
        """Events newly stored by this batch."""
        return self.metrics_stored + self.feedback_stored


def _json(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _metric_row(e: MetricEvent, now: float) -> tuple[Any, ...]:
    return (
        e.event_id,
        e.ts,
        e.prompt,
        e.variant,
        e.model,
        e.request_id,
        e.unit_id,
        e.latency_ms,
        1 if e.success else 0,
        e.error,
        e.quality,
        e.tokens_in,
        e.tokens_out,
        e.cost_usd,
        _json(e.input),
        _json(e.output),
        _json(e.attributes),
        now,
    )


def _feedback_row(e: FeedbackEvent, now: float) -> tuple[Any, ...]:
    return (
        e.event_id,
        e.ts,
        e.prompt,
        e.variant,
        e.model,
        e.request_id,
        e.score,
        e.kind,
        e.comment,
        _json(e.correction),
        now,
    )


async def _max_id(conn: aiosqlite.Connection, table: str) -> int:
    async with conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _only_new(
    conn: aiosqlite.Connection, table: str, mark: int, offered: Sequence[E]
) -> list[E]:
    """The offered events that this transaction inserted (rows above ``mark``).

    Only called when duplicates were seen, so the common path pays nothing; the
    monitor must see each event once, like storage does.
    """
    async with conn.execute(
        f"SELECT event_id FROM {table} WHERE id > ?",
        (mark,),
    ) as cur:
        inserted = {str(row[0]) for row in await cur.fetchall()}
    out: list[E] = []
    for event in offered:
        if event.event_id in inserted:
            inserted.discard(event.event_id)  # a repeat inside the batch is not new
            out.append(event)
    return out


class EventRepository:
    """Reads and writes of raw events, consumer offsets and ingestion counters."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def store_batch(
        self,
        metrics: Sequence[MetricEvent],
        feedback: Sequence[FeedbackEvent],
        offsets: Mapping[TopicPartitionKey, int],
        dead_letters: Mapping[str, int] | None = None,
    ) -> BatchOutcome:
        """Store a consumed batch and its partitions' next offsets atomically.

        Returns the counts; ``duplicates`` counts events whose ``event_id`` was already
        stored (including repeats inside the batch).
        """
        now = time.time()
        dead_letters = dead_letters or {}
        new_metrics: Sequence[MetricEvent] = metrics
        new_feedback: Sequence[FeedbackEvent] = feedback
        async with self.db.transaction() as conn:
            m_stored = f_stored = 0
            if metrics:
                mark = await _max_id(conn, "metric_events")
                cur = await conn.executemany(_INSERT_METRIC, [_metric_row(e, now) for e in metrics])
                m_stored = cur.rowcount
                if m_stored != len(metrics):
                    new_metrics = await _only_new(conn, "metric_events", mark, metrics)
            if feedback:
                mark = await _max_id(conn, "feedback_events")
                cur = await conn.executemany(
                    _INSERT_FEEDBACK, [_feedback_row(e, now) for e in feedback]
                )
                f_stored = cur.rowcount
                if f_stored != len(feedback):
                    new_feedback = await _only_new(conn, "feedback_events", mark, feedback)
            duplicates = len(metrics) + len(feedback) - m_stored - f_stored
            if offsets:
                await conn.executemany(
                    _UPSERT_OFFSET, [(t, p, o, now) for (t, p), o in offsets.items()]
                )
            counters = [
                (STORED_METRICS, m_stored),
                (STORED_FEEDBACK, f_stored),
                (DUPLICATES, duplicates),
                (DEAD_LETTERED, sum(dead_letters.values())),
                *((f"{DEAD_LETTERED}.{reason}", n) for reason, n in dead_letters.items()),
            ]
            await conn.executemany(_ADD_COUNTER, [(k, v) for k, v in counters if v])
        return BatchOutcome(
            m_stored,
            f_stored,
            duplicates,
            metrics=tuple(new_metrics),
            feedback=tuple(new_feedback),
        )

    async def load_offsets(
        self, partitions: Iterable[TopicPartitionKey] | None = None
    ) -> dict[TopicPartitionKey, int]:
        """Stored next offsets, for all partitions or only ``partitions``."""
        async with self.db.reader.execute(
            "SELECT topic, partition, next_offset FROM consumer_offsets"
        ) as cur:
            rows = await cur.fetchall()
        stored = {(str(t), int(p)): int(o) for t, p, o in rows}
        if partitions is None:
            return stored
        wanted = set(partitions)
        return {k: v for k, v in stored.items() if k in wanted}

    async def counters(self) -> dict[str, int]:
        """All ingestion counters as stored (they survive restarts)."""
        async with self.db.reader.execute("SELECT name, value FROM counters") as cur:
            return {str(name): int(value) for name, value in await cur.fetchall()}

    async def count_events(self) -> tuple[int, int]:
        """Rows in (metric_events, feedback_events)."""
        async with self.db.reader.execute(
            "SELECT (SELECT count(*) FROM metric_events), (SELECT count(*) FROM feedback_events)"
        ) as cur:
            row = await cur.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    async def purge_older_than(self, cutoff_ts: float, chunk: int = 5_000) -> int:
        """Delete raw events with ``ts < cutoff_ts``; returns rows deleted.

        Works in chunks, each its own short transaction, so ingestion never waits long
        behind retention.
        """
        total = 0
        for table in ("metric_events", "feedback_events"):
            while True:
                async with self.db.transaction() as conn:
                    cur = await conn.execute(
                        f"DELETE FROM {table} WHERE id IN "
                        f"(SELECT id FROM {table} WHERE ts < ? LIMIT ?)",
                        (cutoff_ts, chunk),
                    )
                    deleted = cur.rowcount
                total += deleted
                if deleted < chunk:
                    break
        return total
