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
from dataclasses import dataclass
from typing import Final

from promptd.events import FeedbackEvent, MetricEvent
from promptd.storage.database import Connection, Database
from promptd.storage.rows import (
    FEEDBACK_SOURCE_AT,
    FeedbackRow,
    FeedbackView,
    MetricRow,
    MetricView,
    feedback_row,
    feedback_views,
    metric_row,
    metric_views,
)

TopicPartitionKey = tuple[str, int]

UPSERT_OFFSET: Final = """
INSERT INTO consumer_offsets (topic, partition, next_offset, updated_at) VALUES (?, ?, ?, ?)
ON CONFLICT (topic, partition) DO UPDATE SET
    next_offset = excluded.next_offset, updated_at = excluded.updated_at
"""
ADD_COUNTER: Final = """
INSERT INTO counters (name, value) VALUES (?, ?)
ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value
"""

#: ``FROM`` clause pairing feedback rows ``f`` from people and apps (no ``source``) with
#: the calls ``m`` of their episode that were stored with them or before them. Feedback
#: on a whole episode (no ``request_id``) is credited to exactly these calls, live and
#: when windows or rollouts are rebuilt from storage (``ingested_at`` is the storage
#: order the batch listeners saw).
EPISODE_CREDITS: Final = (
    "FROM feedback_events f JOIN metric_events m ON m.episode_id = f.episode_id "
    "AND m.episode_id IS NOT NULL AND m.ingested_at <= f.ingested_at AND f.source IS NULL"
)
#: Most episode ids per lookup statement (well below SQLite's variable limit).
_EPISODES_PER_QUERY: Final = 500

#: Counter names kept in the ``counters`` table (dead letters add ``dead_lettered.<reason>``).
STORED_METRICS: Final = "stored.metric"
STORED_FEEDBACK: Final = "stored.feedback"
#: Of the stored feedback, evaluators' results (``source`` set).
STORED_EVALUATIONS: Final = "stored.evaluation"
DUPLICATES: Final = "duplicates"
DEAD_LETTERED: Final = "dead_lettered"
#: Prefix of what ingestion counted of OpenTelemetry spans (``otlp.spans.call``, ...).
OTLP_COUNTERS: Final = "otlp"


def batch_counters(
    metrics_stored: int,
    feedback_stored: int,
    evaluations_stored: int,
    duplicates: int,
    dead_letters: Mapping[str, int],
    extra: Mapping[str, int],
) -> list[tuple[str, int]]:
    """The ``(name, increment)`` pairs one batch adds to ``counters`` (zeros left out):
    stored events (feedback including evaluators' results, counted apart too),
    duplicates, dead letters by reason, and ``extra`` (e.g. what the OTLP decoder
    counted of the batch's spans)."""
    counters = [
        (STORED_METRICS, metrics_stored),
        (STORED_FEEDBACK, feedback_stored),
        (STORED_EVALUATIONS, evaluations_stored),
        (DUPLICATES, duplicates),
        (DEAD_LETTERED, sum(dead_letters.values())),
        *((f"{DEAD_LETTERED}.{reason}", n) for reason, n in dead_letters.items()),
        *extra.items(),
    ]
    return [(k, v) for k, v in counters if v]


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What one batch write did, and the rows it newly stored (for batch listeners).

    ``last_metric_id`` and ``last_feedback_id`` are the highest row ids of the two event
    tables once the batch is in: every stored row up to them has been offered to the
    listeners by then (what a monitor snapshot records as covered).
    """

    metrics_stored: int
    feedback_stored: int
    duplicates: int
    metric_rows: tuple[MetricRow, ...] = ()
    #: Feedback from people and apps (``source`` is ``None``): what every reader of
    #: feedback counted before evaluators existed, and still does by default.
    feedback_rows: tuple[FeedbackRow, ...] = ()
    last_metric_id: int = 0
    last_feedback_id: int = 0
    # The ``ingested_at`` stored with the batch's rows (the rollouts' feedback join uses
    # it, so a replay from storage decides exactly as the live feed did).
    ingested_at: float = 0.0
    #: Evaluators' results (``source`` is ``eval:<name>``), in storage order.
    evaluation_rows: tuple[FeedbackRow, ...] = ()

    @property
    def stored(self) -> int:
        """Events newly stored by this batch."""
        return self.metrics_stored + self.feedback_stored

    @property
    def metrics(self) -> tuple[MetricView, ...]:
        """The new metric rows with names (built on each access: hot listeners read
        :attr:`metric_rows`)."""
        return metric_views(self.metric_rows)

    @property
    def feedback(self) -> tuple[FeedbackView, ...]:
        """The new feedback rows with names (built on each access)."""
        return feedback_views(self.feedback_rows)


def by_source(
    rows: Sequence[FeedbackRow],
) -> tuple[tuple[FeedbackRow, ...], tuple[FeedbackRow, ...]]:
    """Feedback from people and apps, and evaluators' results, each in storage order."""
    evaluations = tuple(row for row in rows if row[FEEDBACK_SOURCE_AT] is not None)
    if not evaluations:
        return tuple(rows), ()
    return tuple(row for row in rows if row[FEEDBACK_SOURCE_AT] is None), evaluations


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
    ) -> BatchOutcome:
        """Store a consumed batch and its partitions' next offsets atomically.

        Takes rows (what ingestion decodes to) or validated events (converted here).
        ``counters`` are added to the named counters in the same transaction (e.g. what
        the OTLP decoder counted of the batch's spans), so they count each record once.
        Returns the counts and the newly stored rows; ``duplicates`` counts events whose
        ``event_id`` was already stored (including repeats inside the batch).
        """
        now = time.time()
        m_rows, f_rows = _metric_rows(metrics), _feedback_rows(feedback)
        return await self.db.store_events(
            m_rows, f_rows, offsets, dead_letters or {}, now, counters or {}
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
        return total


_TABLES: Final = ("metric_events", "feedback_events")


async def _first_id_since(conn: Connection, table: str, since_ts: float) -> int:
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
