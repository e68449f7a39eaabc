"""Event storage: idempotent batch writes with consumer offsets, counters, retention.

A batch is written in one ``BEGIN IMMEDIATE`` transaction together with the next
offsets of the partitions it came from, so the database alone says where ingestion
resumes after a crash. Events insert with ``ON CONFLICT(event_id) DO NOTHING`` (not
``INSERT OR IGNORE``, which would also swallow CHECK violations); the difference between
rows offered and rows inserted is the duplicate count.
"""

from __future__ import annotations

import functools
import operator
import sqlite3
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Final, TypeVar

import aiosqlite

from promptd.events import FeedbackEvent, MetricEvent
from promptd.storage.database import Database
from promptd.storage.rows import (
    FEEDBACK_COLUMNS,
    FEEDBACK_SOURCE_AT,
    METRIC_CAPTURES_AT,
    METRIC_COLUMNS,
    METRIC_EPISODE_COLUMNS,
    METRIC_PLAIN_COLUMNS,
    FeedbackRow,
    FeedbackView,
    MetricRow,
    MetricView,
    feedback_row,
    feedback_views,
    metric_episode_part,
    metric_plain_part,
    metric_row,
    metric_views,
)

TopicPartitionKey = tuple[str, int]
R = TypeVar("R", MetricRow, FeedbackRow)
Row = tuple[object, ...]

_TS = operator.itemgetter(1)
# The optional tail of a metric row: the episode id, then the captured payloads.
_TAIL = operator.itemgetter(slice(len(METRIC_PLAIN_COLUMNS), len(METRIC_COLUMNS)))
_NO_TAIL: Final = (None,) * (len(METRIC_COLUMNS) - len(METRIC_PLAIN_COLUMNS))
_CAPTURES = operator.itemgetter(slice(METRIC_CAPTURES_AT, len(METRIC_COLUMNS)))
_NO_CAPTURES: Final = (None,) * (len(METRIC_COLUMNS) - METRIC_CAPTURES_AT)


#: Most rows per INSERT statement. Statements of many rows instead of ``executemany`` of
#: one-row ones: less time per row (bench/sqlite_rows.py), and, what matters more in the
#: daemon, the writer thread gives up and retakes the GIL once per statement instead of
#: once per row; each retake can wait for the event loop's thread to let go of it.
ROWS_PER_STATEMENT: Final = 128


@functools.cache
def _insert_sql(table: str, cols: tuple[str, ...], rows: int) -> str:
    """An INSERT of ``rows`` rows; parameter 1 is ``ingested_at``, shared by all rows.

    The text depends only on the shape, so sqlite3's statement cache compiles each
    shape once (large statements take a while to compile).
    """
    names = ", ".join((*cols, "ingested_at"))
    width = len(cols)
    values = ", ".join(
        "(" + ", ".join(f"?{2 + r * width + c}" for c in range(width)) + ", ?1)"
        for r in range(rows)
    )
    return f"INSERT INTO {table} ({names}) VALUES {values} ON CONFLICT (event_id) DO NOTHING"


def _insert_rows(
    conn: sqlite3.Connection,
    table: str,
    cols: tuple[str, ...],
    rows: Sequence[Row],
    now: float,
) -> int:
    """Insert ``rows`` (tuples of exactly ``cols``); returns how many were new.

    Statements have a power-of-two number of rows (the largest that fits first), so a
    batch of any length takes a few statements of a few cached shapes.
    """
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    size = 1 << (min(ROWS_PER_STATEMENT, max(1, (limit - 1) // len(cols))).bit_length() - 1)
    stored = done = 0
    while done < len(rows):
        left = len(rows) - done
        while size > left:
            size //= 2
        end = done + left // size * size
        params = [(now, *chain.from_iterable(rows[i : i + size])) for i in range(done, end, size)]
        stored += conn.executemany(_insert_sql(table, cols, size), params).rowcount
        done = end
    return int(stored)


_UPSERT_OFFSET: Final = """
INSERT INTO consumer_offsets (topic, partition, next_offset, updated_at, watermark)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (topic, partition) DO UPDATE SET
    next_offset = excluded.next_offset, updated_at = excluded.updated_at,
    watermark = coalesce(excluded.watermark, consumer_offsets.watermark)
"""
_ADD_COUNTER: Final = """
INSERT INTO counters (name, value) VALUES (?, ?)
ON CONFLICT (name) DO UPDATE SET value = value + excluded.value
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
#: The feedback a reader of ``feedback_events f`` takes when not told otherwise: people's
#: and apps' (no source), as a SQL condition with its (named) parameters. A reader of other
#: signals passes its own condition on ``f.source``
#: (promptd.monitoring.signals.MonitorSignals.sql_condition builds the monitor's).
PEOPLE: Final[tuple[str, Mapping[str, str]]] = ("f.source IS NULL", {})
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
    # The window watermark the batch is windowed under (``None``: none; see
    # monitoring/eventtime.py), stored in ``batch_watermarks`` by ``ingested_at``.
    watermark: float | None = None

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


def _insert_metrics(
    conn: sqlite3.Connection, rows: Sequence[MetricRow], now: float
) -> tuple[int, Sequence[MetricRow]]:
    """Insert ``rows``; returns how many were new and the rows in the order they were
    stored (row ids), which is the order listeners and replays see them in."""
    tails = list(map(_TAIL, rows))
    table = "metric_events"
    if tails.count(_NO_TAIL) == len(rows):
        # The common case: no episode, no payloads, so the narrowest statement (no NULLs
        # to bind).
        plain_rows = list(map(metric_plain_part, rows))
        return _insert_rows(conn, table, METRIC_PLAIN_COLUMNS, plain_rows, now), rows
    # One statement shape at a time: rows without the optional tail, rows with an
    # episode only, rows with captured payloads.
    shapes: tuple[list[MetricRow], list[MetricRow], list[MetricRow]] = ([], [], [])
    for row, tail in zip(rows, tails, strict=True):
        shape = 0 if tail == _NO_TAIL else 1 if _CAPTURES(row) == _NO_CAPTURES else 2
        shapes[shape].append(row)
    plain, episode, full = shapes
    stored = _insert_rows(conn, table, METRIC_PLAIN_COLUMNS, [*map(metric_plain_part, plain)], now)
    stored += _insert_rows(
        conn, table, METRIC_EPISODE_COLUMNS, [*map(metric_episode_part, episode)], now
    )
    stored += _insert_rows(conn, table, METRIC_COLUMNS, full, now)
    return stored, [*plain, *episode, *full]


def _insert_feedback(conn: sqlite3.Connection, rows: Sequence[FeedbackRow], now: float) -> int:
    return _insert_rows(conn, "feedback_events", FEEDBACK_COLUMNS, rows, now)


def _record_batch(
    conn: sqlite3.Connection, table: str, mark: int, rows: Sequence[MetricRow | FeedbackRow]
) -> int:
    """Note the id and time range this batch added to ``table``; returns the last id."""
    last = _max_id(conn, table)
    if last > mark:
        stamps = list(map(_TS, rows))
        conn.execute(
            "INSERT INTO ingest_batches (tbl, first_id, last_id, min_ts, max_ts) "
            "VALUES (?, ?, ?, ?, ?)",
            (table, mark + 1, last, min(stamps), max(stamps)),
        )
    return last


@dataclass(frozen=True, slots=True)
class BatchTime:
    """The event-time facts of one batch (see monitoring/eventtime.py): when it is stored,
    the window watermark it is windowed under (``None``: none) and the partitions'
    watermarks once it is in."""

    ingested_at: float
    watermark: float | None = None
    partition_watermarks: Mapping[TopicPartitionKey, float] | None = None


def _store_sync(
    conn: sqlite3.Connection,
    metrics: Sequence[MetricRow],
    feedback: Sequence[FeedbackRow],
    offsets: Mapping[TopicPartitionKey, int],
    dead_letters: Mapping[str, int],
    clock: BatchTime,
    extra: Mapping[str, int],
) -> BatchOutcome:
    """The body of :meth:`EventRepository.store_batch`, on the writer thread."""
    now = clock.ingested_at
    new_metrics: Sequence[MetricRow] = metrics
    new_feedback: Sequence[FeedbackRow] = feedback
    m_stored = f_stored = 0
    last_m = mark = _max_id(conn, "metric_events")
    if metrics:
        m_stored, new_metrics = _insert_metrics(conn, metrics, now)
        last_m = _record_batch(conn, "metric_events", mark, metrics)
        if m_stored != len(metrics):
            new_metrics = _only_new(conn, "metric_events", mark, new_metrics)
    last_f = mark = _max_id(conn, "feedback_events")
    if feedback:
        f_stored = _insert_feedback(conn, feedback, now)
        last_f = _record_batch(conn, "feedback_events", mark, feedback)
        if f_stored != len(feedback):
            new_feedback = _only_new(conn, "feedback_events", mark, feedback)
    duplicates = len(metrics) + len(feedback) - m_stored - f_stored
    if offsets:
        marks = clock.partition_watermarks or {}
        conn.executemany(
            _UPSERT_OFFSET, [(t, p, o, now, marks.get((t, p))) for (t, p), o in offsets.items()]
        )
    if clock.watermark is not None and (m_stored or f_stored):
        conn.execute(
            "INSERT INTO batch_watermarks (ingested_at, watermark) VALUES (?, ?)",
            (now, clock.watermark),
        )
    human, evaluations = _by_source(new_feedback)
    counters = [
        (STORED_METRICS, m_stored),
        (STORED_FEEDBACK, f_stored),
        (STORED_EVALUATIONS, len(evaluations)),
        (DUPLICATES, duplicates),
        (DEAD_LETTERED, sum(dead_letters.values())),
        *((f"{DEAD_LETTERED}.{reason}", n) for reason, n in dead_letters.items()),
        *extra.items(),
    ]
    conn.executemany(_ADD_COUNTER, [(k, v) for k, v in counters if v])
    return BatchOutcome(
        m_stored,
        f_stored,
        duplicates,
        metric_rows=tuple(new_metrics),
        feedback_rows=human,
        evaluation_rows=evaluations,
        last_metric_id=last_m,
        last_feedback_id=last_f,
        ingested_at=now,
        watermark=clock.watermark,
    )


def _by_source(
    rows: Sequence[FeedbackRow],
) -> tuple[tuple[FeedbackRow, ...], tuple[FeedbackRow, ...]]:
    """Feedback from people and apps, and evaluators' results, each in storage order."""
    evaluations = tuple(row for row in rows if row[FEEDBACK_SOURCE_AT] is not None)
    if not evaluations:
        return tuple(rows), ()
    return tuple(row for row in rows if row[FEEDBACK_SOURCE_AT] is None), evaluations


def _max_id(conn: sqlite3.Connection, table: str) -> int:
    row = conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def _only_new(conn: sqlite3.Connection, table: str, mark: int, offered: Sequence[R]) -> list[R]:
    """The offered rows that this transaction inserted (rows above ``mark``).

    Only called when duplicates were seen, so the common path pays nothing; the
    monitor must see each event once, like storage does.
    """
    rows = conn.execute(
        f"SELECT event_id FROM {table} WHERE id > ?",
        (mark,),
    ).fetchall()
    inserted = {str(row[0]) for row in rows}
    out: list[R] = []
    for row in offered:
        if row[0] in inserted:
            inserted.discard(row[0])  # a repeat inside the batch is not new
            out.append(row)
    return out


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
        return await self.db.run_in_transaction(
            lambda conn: _store_sync(
                conn, m_rows, f_rows, offsets, dead_letters or {}, when, counters or {}
            )
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
