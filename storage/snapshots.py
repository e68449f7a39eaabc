"""Snapshots of in-memory aggregates, and the events stored after them.

A snapshot is a named blob with the row ids it covers: every event row up to
``(metric_id, feedback_id)`` is in it, none above. At start a component loads its
snapshot and replays only the *tail*, the rows above those ids, in the order ingestion
stored them (batch by batch, metrics before feedback within a batch, as the batch
listeners saw them), so the result is what a daemon that never stopped would hold.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import structlog

from promptd.storage.database import Database
from promptd.storage.repository import EPISODE_CREDITS, PEOPLE

log = structlog.get_logger("promptd.storage")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One stored snapshot."""

    name: str
    taken_at: float
    metric_id: int
    feedback_id: int
    config: str
    data: bytes


class SnapshotStore:
    """Reads and writes of the ``snapshots`` table (one row per name, replaced)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def save(self, snapshot: Snapshot) -> None:
        """Store ``snapshot``, replacing the previous one of its name."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO snapshots (name, taken_at, metric_id, feedback_id, config, data) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "taken_at = excluded.taken_at, metric_id = excluded.metric_id, "
                "feedback_id = excluded.feedback_id, config = excluded.config, "
                "data = excluded.data",
                (
                    snapshot.name,
                    snapshot.taken_at,
                    snapshot.metric_id,
                    snapshot.feedback_id,
                    snapshot.config,
                    snapshot.data,
                ),
            )

    async def load(self, name: str) -> Snapshot | None:
        """The snapshot called ``name``, if one was saved and its row can be read.

        A snapshot is a cache: a row that does not read (text that is not UTF-8, a value
        of the wrong type) is logged as ``snapshot_unreadable`` and treated as absent,
        so the caller rebuilds from the events instead of failing to start.
        """
        # Text columns are read as bytes and decoded here: sqlite3 raises on text that
        # is not UTF-8 before the row can even be looked at.
        # Fetched in one call (see _first_id_since in .repository: cancel-safe).
        rows = list(
            await self.db.reader.execute_fetchall(
                "SELECT name, taken_at, metric_id, feedback_id, CAST(config AS BLOB), data "
                "FROM snapshots WHERE name = ?",
                (name,),
            )
        )
        if not rows:
            return None
        row = rows[0]
        try:
            return Snapshot(
                name,
                float(row[1]),
                int(row[2]),
                int(row[3]),
                bytes(row[4]).decode("utf-8"),
                bytes(row[5]),
            )
        except (TypeError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            log.warning("snapshot_unreadable", snapshot=name, error=repr(exc))
            return None

    async def delete(self, name: str) -> None:
        """Forget the snapshot called ``name`` (no-op when there is none)."""
        async with self.db.transaction() as conn:
            await conn.execute("DELETE FROM snapshots WHERE name = ?", (name,))


async def last_ids(db: Database) -> tuple[int, int]:
    """The highest (metric, feedback) row ids stored now."""
    ((metric, feedback),) = await db.reader.execute_fetchall(
        "SELECT (SELECT coalesce(max(id), 0) FROM metric_events), "
        "(SELECT coalesce(max(id), 0) FROM feedback_events)"
    )
    return int(metric), int(feedback)


# Rows as the monitor's rebuild reads them (see storage.alerts.raw_events), plus the id.
# Feedback on a whole episode comes once per call of the episode it is credited to.
_WATERMARK: Final = "LEFT JOIN batch_watermarks w ON w.ingested_at = {t}.ingested_at"
_TAIL: Final = (
    "SELECT m.ts, 0, m.prompt, m.variant, m.model, m.latency_ms, m.success, m.quality, "
    "m.tokens_in, m.tokens_out, m.cost_usd, NULL, m.ingested_at, w.watermark, NULL, m.id "
    f"FROM metric_events m {_WATERMARK.format(t='m')} WHERE m.id > :mid "
    "UNION ALL SELECT f.ts, 1, f.prompt, f.variant, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
    f"f.score, f.ingested_at, w.watermark, f.source, f.id FROM feedback_events f "
    f"{_WATERMARK.format(t='f')} WHERE f.id > :fid AND f.request_id IS NOT NULL "
    "AND {sources} "
    "UNION ALL SELECT f.ts, 1, m.prompt, m.variant, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
    f"f.score, f.ingested_at, w.watermark, NULL, f.id {EPISODE_CREDITS} "
    f"{_WATERMARK.format(t='f')} WHERE f.id > :fid AND f.request_id IS NULL "
    "ORDER BY 13, 2, 16"
)


async def tail_events(
    db: Database,
    metric_id: int,
    feedback_id: int,
    chunk: int = 5_000,
    sources: tuple[str, Mapping[str, str]] = PEOPLE,
) -> AsyncIterator[list[tuple[Any, ...]]]:
    """Event rows stored after ``(metric_id, feedback_id)``, in chunks, in the order
    ingestion handed them to listeners: ``(ts, is_feedback, prompt, variant, model,
    latency_ms, success, quality, tokens_in, tokens_out, cost_usd, score, ingested_at,
    watermark, source, id)`` (the watermark of the row's batch, ``None`` if it had none).
    Call feedback is that of ``sources`` (a condition on ``f.source`` with named
    parameters); episode feedback is people's. A primary-key range scan on each table;
    only the tail is sorted."""
    params = {"mid": metric_id, "fid": feedback_id, **sources[1]}
    cursor = await db.reader.execute(_TAIL.replace("{sources}", sources[0]), params)
    try:
        while rows := await cursor.fetchmany(chunk):
            yield [tuple(r) for r in rows]
    finally:
        await cursor.close()
