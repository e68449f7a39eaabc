"""SQLite's batch write: multi-row INSERTs on the writer's own thread.

The body of :meth:`~promptd.storage.sqlite.SqliteDatabase.store_events`: the whole batch
runs as one function on aiosqlite's connection thread (one thread hop per batch), inside
``BEGIN IMMEDIATE`` … ``COMMIT``. Events insert with ``ON CONFLICT(event_id) DO NOTHING``
(not ``INSERT OR IGNORE``, which would also swallow CHECK violations); the difference
between rows offered and rows inserted is the duplicate count.
"""

from __future__ import annotations

import functools
import operator
import sqlite3
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Final, TypeVar

from promptd.storage.batch import (
    ADD_COUNTER,
    INSERT_WATERMARK,
    UPSERT_OFFSET,
    BatchOutcome,
    BatchTime,
    TopicPartitionKey,
    batch_counters,
    by_source,
)
from promptd.storage.rows import (
    FEEDBACK_COLUMNS,
    METRIC_CAPTURES_AT,
    METRIC_COLUMNS,
    METRIC_EPISODE_COLUMNS,
    METRIC_PLAIN_COLUMNS,
    FeedbackRow,
    MetricRow,
    metric_episode_part,
    metric_plain_part,
)

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


def store_sync(
    conn: sqlite3.Connection,
    metrics: Sequence[MetricRow],
    feedback: Sequence[FeedbackRow],
    offsets: Mapping[TopicPartitionKey, int],
    dead_letters: Mapping[str, int],
    clock: BatchTime,
    extra: Mapping[str, int],
) -> BatchOutcome:
    """The batch write, on the writer thread inside its transaction."""
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
        conn.executemany(UPSERT_OFFSET, clock.offset_rows(offsets))
    if clock.watermark is not None and (m_stored or f_stored):
        conn.execute(INSERT_WATERMARK, (now, clock.watermark))
    human, evaluations = by_source(new_feedback)
    counters = batch_counters(m_stored, f_stored, len(evaluations), duplicates, dead_letters, extra)
    conn.executemany(ADD_COUNTER, counters)
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
