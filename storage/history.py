"""The per-unit sums a rollout's pre-period history is built from (one query, standard SQL).

See :mod:`promptd.replacement.history` for what the sums become. The query scans the
primary key from the first row that can hold the window (there is no index on ``ts``),
keeps the calls of the rollout's prompts stamped in ``[since, until)`` and stored before
``until`` (so the result does not change with what is stored later), and joins each call
to the mean score of the call feedback on it (of the rollout's signals), stored before
``until`` too.
"""

from __future__ import annotations

from collections.abc import Sequence

from promptd.storage.database import Database
from promptd.storage.repository import EventRepository


def _query(prompts: int, sources: str) -> str:
    marks = ", ".join("?" * prompts)
    return (
        "SELECT coalesce(m.unit_id, m.episode_id), COUNT(*), SUM(m.success), "
        "SUM(m.latency_ms), COUNT(m.quality), SUM(m.quality), COUNT(m.cost_usd), "
        "SUM(m.cost_usd), COUNT(m.input_chars), SUM(m.input_chars), COUNT(f.score), "
        "SUM(f.score) "
        "FROM metric_events m LEFT JOIN ("
        "SELECT request_id, AVG(score) AS score FROM feedback_events "
        f"WHERE id >= ? AND ingested_at < ? AND request_id IS NOT NULL AND {sources} "
        f"AND prompt IN ({marks}) GROUP BY request_id"
        ") f ON f.request_id = m.request_id "
        "WHERE m.id >= ? AND m.ts >= ? AND m.ts < ? AND m.ingested_at < ? "
        f"AND m.prompt IN ({marks}) AND (m.unit_id IS NOT NULL OR m.episode_id IS NOT NULL) "
        "GROUP BY coalesce(m.unit_id, m.episode_id)"
    )


async def unit_sums(
    db: Database,
    prompts: Sequence[str],
    since: float,
    until: float,
    sources: tuple[str, Sequence[str]] = ("source IS NULL", ()),
) -> list[tuple[object, ...]]:
    """Per unit with calls of ``prompts`` in ``[since, until)``: ``(unit, calls, successes,
    latency total, quality count, quality total, cost count, cost total, input-size
    count, input-size total, feedback count, feedback total)`` (NULL totals as 0).
    ``sources``: the SQL condition (and its parameters) on the feedback's
    ``source`` column that selects the feedback counted (default: people's)."""
    events = EventRepository(db)
    metric_floor = await events.first_id_since("metric_events", since)
    feedback_floor = await events.first_id_since("feedback_events", since)
    condition, values = sources
    params = (
        feedback_floor,
        until,
        *values,
        *prompts,
        metric_floor,
        since,
        until,
        until,
        *prompts,
    )
    # One call: a cursor left open across awaits would hold the shared reader's read
    # transaction, and every other query on it (the API, the monitor, a resume's last
    # ids) would see the store as it was when the scan began. The table is one row per
    # unit and is built whole anyway.
    rows = await db.reader.execute_fetchall(_query(len(prompts), condition), params)
    return [tuple(0 if v is None else v for v in row) for row in rows]
