"""Event storage: idempotent batch writes with consumer offsets, counters, retention.

A batch is written in one ``BEGIN IMMEDIATE`` transaction together with the next
offsets of the partitions it came from, so the database alone says where ingestion
resumes after a crash. Events insert with ``ON CONFLICT(event_id) DO NOTHING`` (not
``INSERT OR IGNORE``, which would also swallow CHECK violations); the difference between
rows offered and rows inserted is the duplicate count.
"""

from __future__ import annotations

import json
import operator
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import aiosqlite

from promptd.events import FeedbackEvent, MetricEvent
from promptd.storage.database import Database

TopicPartitionKey = tuple[str, int]
E = TypeVar("E", MetricEvent, FeedbackEvent)

_METRIC_COLS: Final = (
    "event_id",
    "ts",
    "prompt",
    "variant",
    "model",
    "request_id",
    "unit_id",
    "latency_ms",
    "success",
    "error",
    "quality",
    "tokens_in",
    "tokens_out",
    "cost_usd",
)
_METRIC_CAPTURE_COLS: Final = ("input", "output", "attributes")
_FEEDBACK_COLS: Final = (
    "event_id",
    "ts",
    "prompt",
    "variant",
    "model",
    "request_id",
    "score",
    "kind",
    "comment",
)
# attrgetter builds each row in C: per-event Python work is the largest cost of a batch.
_METRIC_ROW = operator.attrgetter(*_METRIC_COLS)
_FEEDBACK_ROW = operator.attrgetter(*_FEEDBACK_COLS)


def _insert_sql(table: str, cols: Sequence[str], now: float) -> str:
    # ``now`` is our own float, inlined so that rows need no extra Python tuple work.
    names = ", ".join((*cols, "ingested_at"))
    marks = ", ".join("?" for _ in cols)
    return (
        f"INSERT INTO {table} ({names}) VALUES ({marks}, {now!r}) ON CONFLICT (event_id) DO NOTHING"
    )


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
    # The ``ingested_at`` stored with the batch's rows (the rollouts' feedback join uses
    # it, so a replay from storage decides exactly as the live feed did).
    ingested_at: float = 0.0

    @property
    def stored(self) -> int:
        """Events newly stored by this batch."""
        return self.metrics_stored + self.feedback_stored


def _json(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _insert_metrics(conn: sqlite3.Connection, events: Sequence[MetricEvent], now: float) -> int:
    plain = [e for e in events if e.input is None and e.output is None and e.attributes is None]
    stored = conn.executemany(
        _insert_sql("metric_events", _METRIC_COLS, now), map(_METRIC_ROW, plain)
    ).rowcount
    if len(plain) != len(events):
        captured = [
            e for e in events if not (e.input is None and e.output is None and e.attributes is None)
        ]
        rows = [
            (*_METRIC_ROW(e), _json(e.input), _json(e.output), _json(e.attributes))
            for e in captured
        ]
        cols = (*_METRIC_COLS, *_METRIC_CAPTURE_COLS)
        stored += conn.executemany(_insert_sql("metric_events", cols, now), rows).rowcount
    return stored


def _insert_feedback(conn: sqlite3.Connection, events: Sequence[FeedbackEvent], now: float) -> int:
    rows = [(*_FEEDBACK_ROW(e), _json(e.correction)) for e in events]
    cols = (*_FEEDBACK_COLS, "correction")
    return conn.executemany(_insert_sql("feedback_events", cols, now), rows).rowcount


def _record_batch(
    conn: sqlite3.Connection, table: str, mark: int, events: Sequence[MetricEvent | FeedbackEvent]
) -> None:
    last = _max_id(conn, table)
    if last > mark:
        stamps = [e.ts for e in events]
        conn.execute(
            "INSERT INTO ingest_batches (tbl, first_id, last_id, min_ts, max_ts) "
            "VALUES (?, ?, ?, ?, ?)",
            (table, mark + 1, last, min(stamps), max(stamps)),
        )


def _store_sync(
    conn: sqlite3.Connection,
    metrics: Sequence[MetricEvent],
    feedback: Sequence[FeedbackEvent],
    offsets: Mapping[TopicPartitionKey, int],
    dead_letters: Mapping[str, int],
    now: float,
) -> BatchOutcome:
    """The body of :meth:`EventRepository.store_batch`, on the writer thread."""
    new_metrics: Sequence[MetricEvent] = metrics
    new_feedback: Sequence[FeedbackEvent] = feedback
    m_stored = f_stored = 0
    if metrics:
        mark = _max_id(conn, "metric_events")
        m_stored = _insert_metrics(conn, metrics, now)
        _record_batch(conn, "metric_events", mark, metrics)
        if m_stored != len(metrics):
            new_metrics = _only_new(conn, "metric_events", mark, metrics)
    if feedback:
        mark = _max_id(conn, "feedback_events")
        f_stored = _insert_feedback(conn, feedback, now)
        _record_batch(conn, "feedback_events", mark, feedback)
        if f_stored != len(feedback):
            new_feedback = _only_new(conn, "feedback_events", mark, feedback)
    duplicates = len(metrics) + len(feedback) - m_stored - f_stored
    if offsets:
        conn.executemany(_UPSERT_OFFSET, [(t, p, o, now) for (t, p), o in offsets.items()])
    counters = [
        (STORED_METRICS, m_stored),
        (STORED_FEEDBACK, f_stored),
        (DUPLICATES, duplicates),
        (DEAD_LETTERED, sum(dead_letters.values())),
        *((f"{DEAD_LETTERED}.{reason}", n) for reason, n in dead_letters.items()),
    ]
    conn.executemany(_ADD_COUNTER, [(k, v) for k, v in counters if v])
    return BatchOutcome(
        m_stored,
        f_stored,
        duplicates,
        metrics=tuple(new_metrics),
        feedback=tuple(new_feedback),
        ingested_at=now,
    )


def _max_id(conn: sqlite3.Connection, table: str) -> int:
    row = conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def _only_new(conn: sqlite3.Connection, table: str, mark: int, offered: Sequence[E]) -> list[E]:
    """The offered events that this transaction inserted (rows above ``mark``).

    Only called when duplicates were seen, so the common path pays nothing; the
    monitor must see each event once, like storage does.
    """
    rows = conn.execute(
        f"SELECT event_id FROM {table} WHERE id > ?",
        (mark,),
    ).fetchall()
    inserted = {str(row[0]) for row in rows}
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
        return await self.db.run_in_transaction(
            lambda conn: _store_sync(conn, metrics, feedback, offsets, dead_letters or {}, now)
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

    async def forget_offsets(self, topics: Iterable[str]) -> int:
        """Delete the stored offsets of ``topics`` (their log started over); returns how
        many partitions were forgotten. Their events stay: re-reads are deduplicated."""
        names = list(topics)
        marks = ",".join("?" * len(names))
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                f"DELETE FROM consumer_offsets WHERE topic IN ({marks})",
                names,
            )
            return int(cur.rowcount)

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

    async def first_id_since(self, table: str, since_ts: float) -> int:
        """A row id below which every row of ``table`` has ``ts < since_ts``.

        Scan ``WHERE id >= first_id_since(...) AND ts >= since_ts``: a primary-key range
        instead of a full table scan (there is no index on ``ts``; see the schema).
        """
        return await _first_id_since(self.db.reader, table, since_ts)

    async def purge_older_than(self, cutoff_ts: float, chunk: int = 5_000) -> int:
        """Delete raw events older than ``cutoff_ts``; returns rows deleted.

        Works at batch granularity (a batch goes once its newest event is older than
        the cutoff) and in chunks of ids, each its own short transaction, so ingestion
        never waits long behind retention.
        """
        total = 0
        for table in _TABLES:
            floor = await _first_id_since(self.db.reader, table, cutoff_ts)
            while True:
                async with self.db.transaction() as conn:
                    cur = await conn.execute(
                        f"DELETE FROM {table} WHERE id IN "
                        f"(SELECT id FROM {table} WHERE id < ? LIMIT ?)",
                        (floor, chunk),
                    )
                    deleted = cur.rowcount
                total += deleted
                if deleted < chunk:
                    break
            async with self.db.transaction() as conn:
                await conn.execute(
                    "DELETE FROM ingest_batches WHERE tbl = ? AND max_ts < ?", (table, cutoff_ts)
                )
        return total


_TABLES: Final = ("metric_events", "feedback_events")


async def _first_id_since(conn: aiosqlite.Connection, table: str, since_ts: float) -> int:
    if table not in _TABLES:
        raise ValueError(f"unknown event table {table!r}")
    async with conn.execute(
        "SELECT min(first_id) FROM ingest_batches WHERE tbl = ? AND max_ts >= ?",
        (table, since_ts),
    ) as cur:
        row = await cur.fetchone()
    if row is not None and row[0] is not None:
        return int(row[0])
    # No batch reaches since_ts: every stored row is older.
    async with conn.execute(f"SELECT coalesce(max(id), 0) + 1 FROM {table}") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 1
