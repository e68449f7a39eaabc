"""PostgreSQL's batch write: one array INSERT per event table, inside the fenced transaction.

``INSERT … SELECT * FROM unnest($1::text[], …) ON CONFLICT (event_id) DO NOTHING
RETURNING id, event_id`` sends a whole batch as one statement of column arrays (binary
encoded by asyncpg) and answers with exactly the rows it stored, in id order: the
duplicate count and the rows handed to the batch listeners come from that answer,
without a second query. Offsets and counters are upserted with the same SQL texts as on
SQLite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, TypeVar

from promptd.storage.postgres import PgConnection
from promptd.storage.repository import (
    ADD_COUNTER,
    UPSERT_OFFSET,
    BatchOutcome,
    TopicPartitionKey,
    batch_counters,
)
from promptd.storage.rows import FEEDBACK_COLUMNS, METRIC_COLUMNS, FeedbackRow, MetricRow

R = TypeVar("R", MetricRow, FeedbackRow)

_METRIC_TYPES: Final = (
    "text", "float8", "text", "text", "text", "text", "text", "float8", "bool", "text",
    "float8", "int8", "int8", "float8", "text", "text", "text", "text",
)  # fmt: skip
_FEEDBACK_TYPES: Final = (
    "text", "float8", "text", "text", "text", "text", "float8", "text", "text", "text", "text",
)  # fmt: skip


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
    conn: PgConnection, sql: str, table: str, rows: Sequence[R], now: float
) -> tuple[list[R], int]:
    """Insert ``rows``; the new ones in storage order, and the last id stored (0: none)."""
    raw = conn.raw
    columns = list(zip(*rows, strict=True))
    stored = await raw.fetch(sql, now, *columns)
    if not stored:
        return [], 0
    ids = sorted((int(r[0]), str(r[1])) for r in stored)
    first: dict[str, R] = {}
    for row in rows:  # a repeat inside the batch is not new: the first one is
        first.setdefault(row[0], row)
    stamps = [row[1] for row in rows]
    await raw.execute(_RECORD_BATCH, table, ids[0][0], ids[-1][0], min(stamps), max(stamps))
    return [first[event_id] for _, event_id in ids], ids[-1][0]


async def store(
    conn: PgConnection,
    metrics: Sequence[MetricRow],
    feedback: Sequence[FeedbackRow],
    offsets: Mapping[TopicPartitionKey, int],
    dead_letters: Mapping[str, int],
    now: float,
) -> BatchOutcome:
    """Write one batch on ``conn`` (inside its transaction); see the module docstring."""
    last_m, last_f = await conn.raw.fetchrow(_LAST_IDS)
    new_metrics: list[MetricRow] = []
    new_feedback: list[FeedbackRow] = []
    if metrics:
        new_metrics, last = await _insert_rows(conn, _INSERT_METRICS, "metric_events", metrics, now)
        last_m = last or last_m
    if feedback:
        new_feedback, last = await _insert_rows(
            conn, _INSERT_FEEDBACK, "feedback_events", feedback, now
        )
        last_f = last or last_f
    duplicates = len(metrics) + len(feedback) - len(new_metrics) - len(new_feedback)
    if offsets:
        await conn.executemany(UPSERT_OFFSET, [(t, p, o, now) for (t, p), o in offsets.items()])
    counters = batch_counters(len(new_metrics), len(new_feedback), duplicates, dead_letters)
    if counters:
        await conn.executemany(ADD_COUNTER, counters)
    return BatchOutcome(
        len(new_metrics),
        len(new_feedback),
        duplicates,
        metric_rows=tuple(new_metrics),
        feedback_rows=tuple(new_feedback),
        last_metric_id=int(last_m),
        last_feedback_id=int(last_f),
        ingested_at=now,
    )
