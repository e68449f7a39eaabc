"""Persistence of alert lifecycle states and their history (schema v3 tables).

``alert_states`` holds one row per alert that is not inactive (fingerprint, rule, status);
the full :class:`~promptd.monitoring.rules.AlertState` of each change is the JSON ``payload``
of an ``alert_history`` row, together with the notification sent for it, if any. A restart
reads the latest history row of every fingerprint in ``alert_states``: that is why the purge
never deletes the latest row of a fingerprint. (Schema v3 has no payload column on
``alert_states``; a later migration may add one and make the restore a single read.)

Every write of one evaluation round is one transaction, committed *before* the round's
notifications are handed to sinks: after a crash an alert may be notified once less, never
twice (the lifecycle then resends after ``repeat_interval``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from promptd.storage.database import Database
from promptd.storage.repository import EPISODE_CREDITS, PEOPLE, EventRepository


@dataclass(frozen=True, slots=True)
class AlertChange:
    """One alert whose state changed in a round: ``alert`` is the AlertState as a dict
    (``None`` when it became inactive), ``notification`` what was sent for it, if anything."""

    fingerprint: str
    rule: str
    status: str
    ts: float
    alert: Mapping[str, Any] | None
    notification: Mapping[str, Any] | None = None


class AlertStore:
    """Reads and transactional writes of alert states and history."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def save(self, changes: Sequence[AlertChange]) -> None:
        """Apply one round's changes in one transaction."""
        if not changes:
            return
        async with self._db.transaction() as conn:
            for change in changes:
                if change.alert is None:
                    await conn.execute(
                        "DELETE FROM alert_states WHERE fingerprint = ?", (change.fingerprint,)
                    )
                else:
                    await conn.execute(
                        "INSERT INTO alert_states (fingerprint, rule, state, updated_at) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT(fingerprint) DO UPDATE SET "
                        "rule = excluded.rule, state = excluded.state, "
                        "updated_at = excluded.updated_at",
                        (change.fingerprint, change.rule, change.status, change.ts),
                    )
                payload = {"alert": change.alert, "notification": change.notification}
                await conn.execute(
                    "INSERT INTO alert_history (fingerprint, rule, state, ts, payload) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (
                        change.fingerprint,
                        change.rule,
                        change.status,
                        change.ts,
                        json.dumps(payload, sort_keys=True),
                    ),
                )

    async def load_current(self) -> list[dict[str, Any]]:
        """The latest stored AlertState (as a dict) of every alert in ``alert_states``."""
        cursor = await self._db.reader.execute(
            "SELECT h.payload FROM alert_states s JOIN alert_history h ON h.id = ("
            "  SELECT MAX(id) FROM alert_history WHERE fingerprint = s.fingerprint)"
        )
        rows = await cursor.fetchall()
        await cursor.close()
        out: list[dict[str, Any]] = []
        for (payload,) in rows:
            alert = json.loads(payload).get("alert")
            if alert is not None:
                out.append(alert)
        return out

    async def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest history rows, newest first: ts, status and what was stored."""
        cursor = await self._db.reader.execute(
            "SELECT fingerprint, rule, state, ts, payload FROM alert_history "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        rows = await cursor.fetchall()
        await cursor.close()
        out = []
        for fp, rule, state, ts, payload in rows:
            data = json.loads(payload)
            out.append(
                {
                    "fingerprint": fp,
                    "rule": rule,
                    "state": state,
                    "ts": ts,
                    "alert": data.get("alert"),
                    "notification": data.get("notification"),
                }
            )
        return out

    async def purge_history(self, cutoff_ts: float) -> int:
        """Delete history older than ``cutoff_ts``, except the latest row of every alert that
        is still in ``alert_states`` (its restore point)."""
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                "DELETE FROM alert_history WHERE ts < ? AND id NOT IN ("
                "  SELECT MAX(h.id) FROM alert_history h JOIN alert_states s "
                "  ON s.fingerprint = h.fingerprint GROUP BY h.fingerprint)",
                (cutoff_ts,),
            )
            deleted = cursor.rowcount
            await cursor.close()
        return max(deleted, 0)


# ---- window rebuild at start ------------------------------------------------------------
#
# Kept here with the other monitor SQL. There is no index on ts: every query scans the
# primary key from the first id that can hold the range (EventRepository.first_id_since).

# Every query applies the admission rule of monitoring/eventtime.py to each row with its
# batch's facts: a row stamped more than :fut after its ingested_at is not windowed, one
# stamped after it counts at its ingested_at (``_AT``), one more than :late behind its
# batch's window watermark (batch_watermarks, by ingested_at) is late. The raw replays
# return the facts and let the windows apply the rule; the aggregates apply it here.
_AT = "min({t}.ts, {t}.ingested_at)"
_WATERMARK = "LEFT JOIN batch_watermarks w ON w.ingested_at = {t}.ingested_at"
_ADMITTED = (
    "{t}.ts <= {t}.ingested_at + :fut AND (w.watermark IS NULL OR "
    + _AT
    + " >= w.watermark - :late)"
)


def _rule(sql: str, table: str) -> str:
    return sql.format(at=_AT.format(t=table), admitted=_ADMITTED.format(t=table))


_AGG_METRICS = _rule(
    "SELECT CAST({at} / :w AS INTEGER) AS b, m.prompt, m.variant, m.model, COUNT(*), "
    "SUM(m.success), SUM(m.latency_ms), COUNT(m.quality), TOTAL(m.quality), "
    "COUNT(coalesce(m.tokens_in, m.tokens_out)), TOTAL(m.tokens_in), "
    "TOTAL(m.tokens_out), COUNT(m.cost_usd), TOTAL(m.cost_usd) "
    f"FROM metric_events m {_WATERMARK.format(t='m')} "
    "WHERE m.id >= :mid AND {at} >= :lo AND {at} < :hi AND {admitted} "
    "GROUP BY b, m.prompt, m.variant, m.model",
    "m",
)
# Call feedback of the sources asked for ({sources}), per source: the monitor picks the
# sources each prompt counts.
_AGG_FEEDBACK = _rule(
    "SELECT CAST({at} / :w AS INTEGER) AS b, f.prompt, f.variant, f.source, COUNT(*), "
    f"TOTAL(f.score) FROM feedback_events f {_WATERMARK.format(t='f')} "
    "WHERE f.id >= :fid AND {at} >= :lo AND {at} < :hi AND {admitted} "
    "AND f.request_id IS NOT NULL AND {{sources}} GROUP BY b, f.prompt, f.variant, f.source",
    "f",
)
# Feedback on a whole episode is credited to every call of the episode stored with it or
# before it (EPISODE_CREDITS, as the live monitor does); sums of the two add up.
_AGG_EPISODE_FEEDBACK = _rule(
    "SELECT CAST({at} / :w AS INTEGER) AS b, m.prompt, m.variant, NULL, COUNT(*), "
    "TOTAL(f.score) "
    f"{EPISODE_CREDITS} {_WATERMARK.format(t='f')} "
    "WHERE f.id >= :fid AND {at} >= :lo AND {at} < :hi AND {admitted} "
    "AND f.request_id IS NULL GROUP BY b, m.prompt, m.variant",
    "f",
)
_RAW_EVENTS = (
    "SELECT m.ts, 0, m.prompt, m.variant, m.model, m.latency_ms, m.success, m.quality, "
    "m.tokens_in, m.tokens_out, m.cost_usd, NULL, m.ingested_at, w.watermark, NULL "
    f"FROM metric_events m {_WATERMARK.format(t='m')} "
    f"WHERE m.id >= :mid AND {_AT.format(t='m')} >= :lo "
    "UNION ALL SELECT f.ts, 1, f.prompt, f.variant, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
    f"f.score, f.ingested_at, w.watermark, f.source FROM feedback_events f "
    f"{_WATERMARK.format(t='f')} "
    f"WHERE f.id >= :fid AND {_AT.format(t='f')} >= :lo AND f.request_id IS NOT NULL "
    "AND {sources} "
    "UNION ALL SELECT f.ts, 1, m.prompt, m.variant, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
    f"f.score, f.ingested_at, w.watermark, NULL {EPISODE_CREDITS} {_WATERMARK.format(t='f')} "
    f"WHERE f.id >= :fid AND {_AT.format(t='f')} >= :lo AND f.request_id IS NULL ORDER BY 1"
)


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Counts and sums of one series over one bucket of ``bucket_seconds`` from ``start``."""

    start: float
    prompt: str
    variant: str
    model: str | None
    values: dict[str, Any]
    #: The ``source`` of feedback aggregates (``None``: people's; always for calls).
    source: str | None = None


async def _first_ids(db: Database, lo: float) -> dict[str, int]:
    repo = EventRepository(db)
    return {
        "mid": await repo.first_id_since("metric_events", lo),
        "fid": await repo.first_id_since("feedback_events", lo),
    }


async def history_aggregates(
    db: Database,
    lo: float,
    hi: float,
    bucket_seconds: float,
    lateness_s: float,
    max_future_s: float,
    sources: tuple[str, Mapping[str, str]] = PEOPLE,
) -> list[Aggregate]:
    """Per-bucket aggregates of the metric and feedback events the windows admit (the rule
    of monitoring/eventtime.py, with ``lateness_s`` and ``max_future_s``) at times
    ``lo <= t < hi``, in bucket order (what a window rebuild feeds for history older than
    the replay horizon). Call feedback is that of ``sources`` (a condition on
    ``f.source``), aggregated per source; episode feedback is people's."""
    params: dict[str, Any] = {"w": bucket_seconds, "lo": lo, "hi": hi, **sources[1]}
    params |= {"late": lateness_s, "fut": max_future_s, **await _first_ids(db, lo)}
    out: list[Aggregate] = []
    cursor = await db.reader.execute(_AGG_METRICS, params)
    for (
        b,
        prompt,
        variant,
        model,
        n,
        ok,
        lat,
        qn,
        qs,
        tokn,
        tin,
        tout,
        cn,
        cs,
    ) in await cursor.fetchall():
        values = {
            "n": n,
            "ok": ok,
            "lat_sum": lat,
            "q_n": qn,
            "q_sum": qs,
            "tok_n": tokn,
            "tin": int(tin),
            "tout": int(tout),
            "c_n": cn,
            "c_sum": cs,
        }
        out.append(Aggregate(b * bucket_seconds, prompt, variant, model, values))
    await cursor.close()
    for sql in (_AGG_FEEDBACK.replace("{sources}", sources[0]), _AGG_EPISODE_FEEDBACK):
        cursor = await db.reader.execute(sql, params)
        for b, prompt, variant, source, n, total in await cursor.fetchall():
            values = {"fb_n": n, "fb_sum": total}
            out.append(Aggregate(b * bucket_seconds, prompt, variant, None, values, source))
        await cursor.close()
    out.sort(key=lambda a: a.start)
    return out


async def raw_events(
    db: Database,
    lo: float,
    *,
    chunk: int = 5_000,
    sources: tuple[str, Mapping[str, str]] = PEOPLE,
) -> AsyncIterator[list[tuple[Any, ...]]]:
    """Metric and feedback rows windowed at ``lo`` or later if admitted (``min(ts,
    ingested_at) >= lo``), in ts order, in chunks: ``(ts, is_feedback, prompt, variant,
    model, latency_ms, success, quality, tokens_in, tokens_out, cost_usd, score,
    ingested_at, watermark, source)``; ingested_at and watermark are the facts of the
    row's batch that the admission rule needs. Call feedback is that of ``sources`` (a
    condition on ``f.source``); episode feedback is people's."""
    params = {"lo": lo, **await _first_ids(db, lo), **sources[1]}
    cursor = await db.reader.execute(_RAW_EVENTS.replace("{sources}", sources[0]), params)
    try:
        while rows := await cursor.fetchmany(chunk):
            yield [tuple(r) for r in rows]
    finally:
        await cursor.close()
