"""Event storage: idempotent batch writes with consumer offsets, counters, retention.

A batch is written in one transaction together with the next offsets of the partitions
it came from, so the database alone says where ingestion resumes after a crash. Events
insert with ``ON CONFLICT(event_id) DO NOTHING`` (not ``INSERT OR IGNORE``, which would
also swallow CHECK violations); the difference between rows offered and rows inserted is
the duplicate count. Each backend writes the batch its fastest way
(:meth:`~promptd.storage.database.Database.store_events`: multi-row INSERTs on SQLite's
thread, one array INSERT … RETURNING on PostgreSQL) under this same contract.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Final

from promptd.events import FeedbackEvent, MetricEvent

# The batch's outcome, shared SQL and counter names live in .batch (both backends use
# them); they are importable from here as before.
from promptd.storage.batch import (
    ADD_COUNTER,
    DEAD_LETTERED,
    DUPLICATES,
    OTLP_COUNTERS,
    STORED_EVALUATIONS,
    STORED_FEEDBACK,
    STORED_METRICS,
    UPSERT_OFFSET,
    BatchOutcome,
    BatchTime,
    TopicPartitionKey,
    batch_counters,
    by_source,
)
from promptd.storage.database import Connection, Database
from promptd.storage.rows import FeedbackRow, MetricRow, feedback_row, metric_row

__all__ = [
    "ADD_COUNTER",
    "DEAD_LETTERED",
    "DUPLICATES",
    "EPISODE_CREDITS",
    "OTLP_COUNTERS",
    "STORED_EVALUATIONS",
    "STORED_FEEDBACK",
    "STORED_METRICS",
    "UPSERT_OFFSET",
    "BatchOutcome",
    "BatchTime",
    "EventRepository",
    "TopicPartitionKey",
    "batch_counters",
    "by_source",
]

#: ``FROM`` clause pairing feedback rows ``f`` from people and apps (no ``source``) with
#: the calls ``m`` of their episode that were stored with them or before them. Feedback
#: on a whole episode (no ``request_id``) is credited to exactly these calls, live and
#: when windows or rollouts are rebuilt from storage (``ingested_at`` is the storage
#: order the batch listeners saw).
EPISODE_CREDITS: Final = (
    "FROM feedback_events f JOIN metric_events m ON m.episode_id = f.episode_id "
    "AND m.episode_id IS NOT NULL AND m.ingested_at <= f.ingested_at AND f.source IS NULL"
)
#: The feedback a reader of ``feedback_events f`` takes when not told otherwise: people's
#: and apps' (no source), as a SQL condition with its (named) parameters. A reader of other
#: signals passes its own condition on ``f.source``
#: (promptd.monitoring.signals.MonitorSignals.sql_condition builds the monitor's).
PEOPLE: Final[tuple[str, Mapping[str, str]]] = ("f.source IS NULL", {})
#: Most episode ids per lookup statement (well below SQLite's variable limit).
_EPISODES_PER_QUERY: Final = 500


def _metric_rows(items: Sequence[MetricRow] | Sequence[MetricEvent]) -> Sequence[MetricRow]:
    if items and isinstance(items[0], MetricEvent):
        return [metric_row(e) for e in items]  # type: ignore[arg-type]
    return items  # type: ignore[return-value]


def _feedback_rows(
    items: Sequence[FeedbackRow] | Sequence[FeedbackEvent],
) -> Sequence[FeedbackRow]:
    if items and isinstance(items[0], FeedbackEvent):
        return [feedback_row(e) for e in items]  # type: ignore[arg-type]
    return items  # type: ignore[return-value]


class EventRepository:
    """Reads and writes of raw events, consumer offsets and ingestion counters."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def store_batch(
        self,
        metrics: Sequence[MetricRow] | Sequence[MetricEvent],
        feedback: Sequence[FeedbackRow] | Sequence[FeedbackEvent],
        offsets: Mapping[TopicPartitionKey, int],
        dead_letters: Mapping[str, int] | None = None,
        counters: Mapping[str, int] | None = None,
        clock: BatchTime | None = None,
    ) -> BatchOutcome:
        """Store a consumed batch and its partitions' next offsets atomically.

        Takes rows (what ingestion decodes to) or validated events (converted here).
        ``counters`` are added to the named counters in the same transaction (e.g. what
        the OTLP decoder counted of the batch's spans), so they count each record once.
        Returns the counts and the newly stored rows; ``duplicates`` counts events whose
        ``event_id`` was already stored (including repeats inside the batch). ``clock``
        gives the batch's event-time facts, stored with it (default: stored now, no
        watermark).
        """
        when = clock or BatchTime(time.time())
        m_rows, f_rows = _metric_rows(metrics), _feedback_rows(feedback)
        return await self.db.store_events(
            m_rows, f_rows, offsets, dead_letters or {}, when, counters or {}
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

    async def load_watermarks(
        self, partitions: Iterable[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, float | None]:
        """Stored partition watermarks of ``partitions`` (``None``: never read)."""
        async with self.db.reader.execute(
            "SELECT topic, partition, watermark FROM consumer_offsets"
        ) as cur:
            rows = await cur.fetchall()
        wanted = set(partitions)
        out: dict[TopicPartitionKey, float | None] = {}
        for topic, partition, mark in rows:
            key = (str(topic), int(partition))
            if key in wanted:
                out[key] = None if mark is None else float(mark)
        return out

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

    async def episode_calls(
        self, episode_ids: Collection[str], stored_by: float
    ) -> dict[str, list[tuple[str, str]]]:
        """``(prompt, variant)`` of every call of each episode stored at or before
        ``stored_by`` (an ``ingested_at``), in storage order: what feedback on those
        episodes stored at ``stored_by`` is credited to (see :data:`EPISODE_CREDITS`)."""
        out: dict[str, list[tuple[str, str]]] = {}
        ids = sorted(episode_ids)
        for start in range(0, len(ids), _EPISODES_PER_QUERY):
            part = ids[start : start + _EPISODES_PER_QUERY]
            marks = ",".join("?" * len(part))
            async with self.db.reader.execute(
                "SELECT episode_id, prompt, variant FROM metric_events "
                f"WHERE episode_id IN ({marks}) AND ingested_at <= ? ORDER BY id",
                (*part, stored_by),
            ) as cur:
                for episode, prompt, variant in await cur.fetchall():
                    out.setdefault(str(episode), []).append((str(prompt), str(variant)))
        return out

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
        never waits long behind retention. The newest row of each table always stays:
        SQLite hands out ``max(id) + 1``, so an emptied table would give old ids again,
        and snapshots and batch ranges rely on ids only growing.
        """
        total = 0
        for table in _TABLES:
            floor = await _first_id_since(self.db.reader, table, cutoff_ts)
            async with self.db.reader.execute(f"SELECT coalesce(max(id), 0) FROM {table}") as cur:
                row = await cur.fetchone()
            floor = min(floor, int(row[0]) if row else 0)
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
        async with self.db.transaction() as conn:
            # Batches older than the oldest row kept (ingested_at grows with the row id).
            await conn.execute(
                "DELETE FROM batch_watermarks WHERE ingested_at < min("
                "coalesce((SELECT ingested_at FROM metric_events ORDER BY id LIMIT 1), 1e308), "
                "coalesce((SELECT ingested_at FROM feedback_events ORDER BY id LIMIT 1), 1e308))"
            )
        return total


_TABLES: Final = ("metric_events", "feedback_events")


async def _first_id_since(conn: Connection, table: str, since_ts: float) -> int:
    if table not in _TABLES:
        raise ValueError(f"unknown event table {table!r}")
    # Each query runs to its end in one call: a cursor left stepped across an await (as
    # when the awaiting task is cancelled, e.g. a rollout's history read) would hold the
    # shared reader's read transaction, and every later query on it would see the store
    # as it was then, until the cursor is garbage-collected.
    ((first,),) = await conn.execute_fetchall(
        "SELECT min(first_id) FROM ingest_batches WHERE tbl = ? AND max_ts >= ?",
        (table, since_ts),
    )
    if first is not None:
        return int(first)
    # No batch reaches since_ts: every stored row is older.
    ((after,),) = await conn.execute_fetchall(f"SELECT coalesce(max(id), 0) + 1 FROM {table}")
    return int(after)
