"""PostgreSQL's batch write: COPY, inside the fenced transaction.

A batch normally holds no event already stored, so its rows are COPYed straight into
their table (binary COPY: about a fifth of the CPU of an INSERT of column arrays, on both
sides) inside a savepoint. If an ``event_id`` is already there (a re-read after a crash,
a producer's retry), the unique index refuses the COPY, the savepoint undoes it alone,
and the batch is inserted again with ``INSERT … SELECT * FROM unnest($1::text[], …)
ON CONFLICT (event_id) DO NOTHING RETURNING id, event_id``, whose answer names exactly
the rows stored: the duplicate count and the rows handed to the batch listeners come
from it. Offsets and counters are upserted with the same SQL texts as on SQLite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeVar

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
from promptd.storage.dialect import to_postgresql
from promptd.storage.rows import FEEDBACK_COLUMNS, METRIC_COLUMNS, FeedbackRow, MetricRow

R = TypeVar("R", MetricRow, FeedbackRow)

_METRIC_TYPES: Final = (
    "text", "float8", "text", "text", "text", "text", "text", "float8", "bool", "text",
    "float8", "int8", "int8", "float8", "int8", "text", "text", "text", "text", "text",
)  # fmt: skip
_FEEDBACK_TYPES: Final = (
    "text", "float8", "text", "text", "text", "text", "float8", "text", "text", "text", "text",
    "text",
)  # fmt: skip
# A column added to the rows needs its array type here (the fallback INSERT).
assert len(_METRIC_TYPES) == len(METRIC_COLUMNS)
assert len(_FEEDBACK_TYPES) == len(FEEDBACK_COLUMNS)


def _insert(table: str, columns: Sequence[str], types: Sequence[str]) -> str:
    arrays = ", ".join(f"${i + 2}::{t}[]" for i, t in enumerate(types))
    # success is stored as 0/1 (the shared schema); the array is bool for the encoder.
    values = ", ".join(
        f"u.{c}::int" if t == "bool" else f"u.{c}" for c, t in zip(columns, types, strict=True)
    )
    return (
        f"INSERT INTO {table} ({', '.join(columns)}, ingested_at) "
        f"SELECT {values}, $1::float8 FROM unnest({arrays}) AS u ({', '.join(columns)}) "
        "ON CONFLICT (event_id) DO NOTHING RETURNING id, event_id"
    )


# The shared texts, translated once (this module runs on asyncpg's own connection).
_UPSERT_OFFSET: Final = to_postgresql(UPSERT_OFFSET).sql
_INSERT_WATERMARK: Final = to_postgresql(INSERT_WATERMARK).sql
_ADD_COUNTER: Final = to_postgresql(ADD_COUNTER).sql
_INSERT_METRICS: Final = _insert("metric_events", METRIC_COLUMNS, _METRIC_TYPES)
_INSERT_FEEDBACK: Final = _insert("feedback_events", FEEDBACK_COLUMNS, _FEEDBACK_TYPES)
_LAST_IDS: Final = (
    "SELECT (SELECT coalesce(max(id), 0) FROM metric_events), "
    "(SELECT coalesce(max(id), 0) FROM feedback_events)"
)
_RECORD_BATCH: Final = (
    "INSERT INTO ingest_batches (tbl, first_id, last_id, min_ts, max_ts) "
    "VALUES ($1, $2, $3, $4, $5)"
)


async def _insert_rows(
    conn: Any,
    table: str,
    columns: Sequence[str],
    rows: Sequence[R],
    mark: int,
    now: float,
) -> tuple[list[R], int]:
    """Insert ``rows`` (ids above ``mark``); the new ones in storage order, and the last
    id stored (``mark``: none)."""
    import asyncpg

    records = _stamped(rows, now)
    try:
        async with conn.transaction():  # a savepoint: a duplicate undoes only the COPY
            await conn.copy_records_to_table(
                table, records=records, columns=[*columns, "ingested_at"]
            )
    except asyncpg.UniqueViolationError:
        return await _insert_skipping_duplicates(conn, table, rows, mark, now)
    last = int(await conn.fetchval(f"SELECT max(id) FROM {table}"))
    await _record_batch(conn, table, mark + 1, last, rows)
    return list(rows), last


def _stamped(rows: Sequence[tuple[object, ...]], now: float) -> list[tuple[object, ...]]:
    """The rows as COPY records: each with its ``ingested_at``."""
    return [(*row, now) for row in rows]


async def _insert_skipping_duplicates(
    conn: Any, table: str, rows: Sequence[R], mark: int, now: float
) -> tuple[list[R], int]:
    sql = _INSERT_METRICS if table == "metric_events" else _INSERT_FEEDBACK
    stored = await conn.fetch(sql, now, *zip(*rows, strict=True))
    if not stored:
        return [], mark
    ids = sorted((int(r[0]), str(r[1])) for r in stored)
    first: dict[str, R] = {}
    for row in rows:  # a repeat inside the batch is not new: the first one is
        first.setdefault(row[0], row)
    await _record_batch(conn, table, ids[0][0], ids[-1][0], rows)
    return [first[event_id] for _, event_id in ids], ids[-1][0]


async def _record_batch(conn: Any, table: str, first: int, last: int, rows: Sequence[R]) -> None:
    """Note the id and time range the batch added (see the schema's ingest_batches)."""
    stamps = [row[1] for row in rows]
    await conn.execute(_RECORD_BATCH, table, first, last, min(stamps), max(stamps))


async def store(
    conn: Any,
    metrics: Sequence[MetricRow],
    feedback: Sequence[FeedbackRow],
    offsets: Mapping[TopicPartitionKey, int],
    dead_letters: Mapping[str, int],
    clock: BatchTime,
    extra: Mapping[str, int],
) -> BatchOutcome:
    """Write one batch on ``conn`` (asyncpg's, inside the fenced transaction); see the
    module docstring."""
    now = clock.ingested_at
    last_m, last_f = (int(v) for v in await conn.fetchrow(_LAST_IDS))
    new_metrics: list[MetricRow] = []
    new_feedback: list[FeedbackRow] = []
    if metrics:
        new_metrics, last_m = await _insert_rows(
            conn, "metric_events", METRIC_COLUMNS, metrics, last_m, now
        )
    if feedback:
        new_feedback, last_f = await _insert_rows(
            conn, "feedback_events", FEEDBACK_COLUMNS, feedback, last_f, now
        )
    duplicates = len(metrics) + len(feedback) - len(new_metrics) - len(new_feedback)
    if offsets:
        await conn.executemany(_UPSERT_OFFSET, clock.offset_rows(offsets))
    if clock.watermark is not None and (new_metrics or new_feedback):
        await conn.execute(_INSERT_WATERMARK, now, clock.watermark)
    human, evaluations = by_source(new_feedback)
    counters = batch_counters(
        len(new_metrics), len(new_feedback), len(evaluations), duplicates, dead_letters, extra
    )
    if counters:
        await conn.executemany(_ADD_COUNTER, counters)
    return BatchOutcome(
        len(new_metrics),
        len(new_feedback),
        duplicates,
        metric_rows=tuple(new_metrics),
        feedback_rows=human,
        evaluation_rows=evaluations,
        last_metric_id=int(last_m),
        last_feedback_id=int(last_f),
        ingested_at=now,
        watermark=clock.watermark,
    )
