"""The evaluation engine's SQL: results (the outbox), the cursor, and the reads it needs.

Standard SQL with ``?`` parameters and ``ON CONFLICT ... DO NOTHING``/``DO UPDATE``, all
here, so that a second storage backend ports one module. Tables: ``evaluation_results``
and ``evaluation_cursor`` (migration 13, ``storage/schema.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from promptd.storage.database import Database

from .calls import Call, Verdict

CURSOR_NAME: Final = "engine"
#: ``(prompt, variant, evaluator, feedback event_id, human score, evaluator score, call_ts)``.
PairRow = tuple[str, str, str, str, float, float, float]
#: Most ids per ``IN (...)`` lookup (well below SQLite's variable limit).
_CHUNK: Final = 400


@dataclass(frozen=True, slots=True)
class Result:
    """One stored evaluation result, as the outbox publishes it."""

    event_id: str
    request_id: str
    evaluator: str
    prompt: str
    variant: str
    model: str | None
    call_ts: float
    kind: str
    score: float
    detail: str | None


_INSERT: Final = (
    "INSERT INTO evaluation_results (request_id, evaluator, event_id, prompt, variant, model, "
    "call_ts, kind, status, score, detail, cost_usd, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (request_id, evaluator) DO NOTHING"
)
_CALL_COLUMNS: Final = "id, ts, prompt, variant, model, request_id, input, output"


class EvaluationStore:
    """Reads and writes of the engine (writes on the writer, reads on the reader)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- cursor ---------------------------------------------------------------------

    async def load_cursor(self) -> int | None:
        """The saved cursor (``None`` before the first save)."""
        async with self.db.reader.execute(
            "SELECT call_id FROM evaluation_cursor WHERE name = ?", (CURSOR_NAME,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else int(row[0])

    async def save_cursor(self, call_id: int, now: float) -> None:
        """Save the cursor (it only moves forward)."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO evaluation_cursor (name, call_id, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET call_id = excluded.call_id, "
                "updated_at = excluded.updated_at "
                "WHERE excluded.call_id > evaluation_cursor.call_id",
                (CURSOR_NAME, call_id, now),
            )

    async def last_call_id(self) -> int:
        """The highest stored call id."""
        async with self.db.reader.execute("SELECT coalesce(max(id), 0) FROM metric_events") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def calls_between(self, after: int, upto: int, limit: int) -> list[tuple[int, Call]]:
        """Stored calls with ``after < id <= upto`` and their ids, in id order, at most
        ``limit``."""
        async with self.db.reader.execute(
            f"SELECT {_CALL_COLUMNS} FROM metric_events WHERE id > ? AND id <= ? "
            "ORDER BY id LIMIT ?",
            (after, upto, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [(int(row[0]), _call(row)) for row in rows]

    # -- results --------------------------------------------------------------------

    async def decided(self, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which ``(request_id, evaluator)`` already have a stored result."""
        out: set[tuple[str, str]] = set()
        ids = sorted({rid for rid, _ in keys})
        for start in range(0, len(ids), _CHUNK):
            part = ids[start : start + _CHUNK]
            async with self.db.reader.execute(
                "SELECT request_id, evaluator FROM evaluation_results "
                f"WHERE request_id IN ({', '.join('?' * len(part))})",
                part,
            ) as cur:
                out.update((str(r), str(e)) for r, e in await cur.fetchall())
        return out & set(keys)

    async def save(
        self, decided: Iterable[tuple[Call, Sequence[tuple[Verdict, str]]]], now: float
    ) -> int:
        """Store the verdicts (with their event ids) of calls, all in one transaction;
        returns how many were new (a verdict already stored is kept as it was)."""
        rows = [
            (
                call.request_id,
                v.evaluator,
                event_id,
                call.prompt,
                call.variant,
                call.model,
                call.ts,
                v.kind,
                v.status,
                v.score,
                v.detail,
                v.cost_usd,
                now,
            )
            for call, verdicts in decided
            for v, event_id in verdicts
        ]
        if not rows:
            return 0
        async with self.db.transaction() as conn:
            cur = await conn.executemany(_INSERT, rows)
            return int(cur.rowcount)

    async def unpublished(self, limit: int) -> list[Result]:
        """Scored results the broker has not acknowledged yet, oldest first."""
        async with self.db.reader.execute(
            "SELECT event_id, request_id, evaluator, prompt, variant, model, call_ts, kind, "
            "score, detail FROM evaluation_results "
            "WHERE published_at IS NULL AND status = 'scored' ORDER BY created_at LIMIT ?",
            (limit,),
        ) as cur:
            rows = await cur.fetchall()
        return [
            Result(
                str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), r[5], float(r[6]),
                str(r[7]), float(r[8]), r[9],
            )
            for r in rows
        ]  # fmt: skip

    async def mark_published(self, event_ids: Sequence[str], now: float) -> None:
        """The broker acknowledged these results."""
        async with self.db.transaction() as conn:
            await conn.executemany(
                "UPDATE evaluation_results SET published_at = ? WHERE event_id = ?",
                [(now, e) for e in event_ids],
            )

    async def spent_since(self, since: float) -> dict[str, float]:
        """Dollars spent per evaluator on results stored since ``since``."""
        async with self.db.reader.execute(
            "SELECT evaluator, coalesce(sum(cost_usd), 0) FROM evaluation_results "
            "WHERE created_at >= ? GROUP BY evaluator",
            (since,),
        ) as cur:
            return {str(e): float(c) for e, c in await cur.fetchall()}

    async def totals(self, since: float, day_start: float) -> dict[str, dict[str, Any]]:
        """Per evaluator, over results stored since ``since`` (an index range, not the
        whole table): count by status and mean score; dollars since ``day_start``
        (which must not be before ``since``); results not yet acknowledged."""
        async with self.db.reader.execute(
            "SELECT evaluator, count(CASE WHEN status = 'scored' THEN 1 END), "
            "count(CASE WHEN status = 'invalid' THEN 1 END), avg(score), "
            "coalesce(sum(CASE WHEN created_at >= ? THEN cost_usd ELSE 0 END), 0), "
            "max(created_at) FROM evaluation_results WHERE created_at >= ? GROUP BY evaluator",
            (day_start, since),
        ) as cur:
            rows = await cur.fetchall()
        out: dict[str, dict[str, Any]] = {
            str(r[0]): {
                "scored": int(r[1] or 0),
                "invalid": int(r[2] or 0),
                "mean_score": None if r[3] is None else round(float(r[3]), 6),
                "cost_usd_today": float(r[4]),
                "last_result_at": r[5],
                "unpublished": 0,
            }
            for r in rows
        }
        async with self.db.reader.execute(
            "SELECT evaluator, count(*) FROM evaluation_results "
            "WHERE published_at IS NULL AND status = 'scored' GROUP BY evaluator"
        ) as cur:
            for name, n in await cur.fetchall():
                out.setdefault(str(name), {"scored": 0, "invalid": 0})["unpublished"] = int(n)
        return out

    async def purge_older_than(self, cutoff: float, chunk: int = 5000) -> int:
        """Delete results stored before ``cutoff`` that need nothing more (published, or
        invalid), in short transactions; returns how many."""
        total = 0
        while True:
            async with self.db.transaction() as conn:
                cur = await conn.execute(
                    "DELETE FROM evaluation_results WHERE event_id IN (SELECT event_id FROM "
                    "evaluation_results WHERE created_at < ? AND "
                    "(published_at IS NOT NULL OR status = 'invalid') LIMIT ?)",
                    (cutoff, chunk),
                )
                deleted = int(cur.rowcount)
            total += deleted
            if deleted < chunk:
                return total

    async def recent(self, evaluator: str, limit: int) -> list[dict[str, Any]]:
        """The evaluator's newest results."""
        async with self.db.reader.execute(
            "SELECT request_id, prompt, variant, status, score, detail, cost_usd, call_ts, "
            "created_at, published_at FROM evaluation_results WHERE evaluator = ? "
            "ORDER BY created_at DESC LIMIT ?",
            (evaluator, limit),
        ) as cur:
            rows = await cur.fetchall()
        names = ("request_id", "prompt", "variant", "status", "score", "detail", "cost_usd",
                 "call_ts", "created_at", "published_at")  # fmt: skip
        return [dict(zip(names, row, strict=True)) for row in rows]

    # -- what judges and calibration read ---------------------------------------------

    async def correction(self, request_id: str) -> str | None:
        """The latest correction people gave the call (JSON text)."""
        async with self.db.reader.execute(
            "SELECT correction FROM feedback_events WHERE request_id = ? AND source IS NULL "
            "AND correction IS NOT NULL ORDER BY ts DESC, id DESC LIMIT 1",
            (request_id,),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def human_scores(self, request_ids: Sequence[str]) -> list[tuple[str, str, float, float]]:
        """People's feedback on these calls: ``(request_id, event_id, score, ts)``."""
        out: list[tuple[str, str, float, float]] = []
        ids = sorted(set(request_ids))
        for start in range(0, len(ids), _CHUNK):
            part = ids[start : start + _CHUNK]
            async with self.db.reader.execute(
                "SELECT request_id, event_id, score, ts FROM feedback_events "
                f"WHERE request_id IN ({', '.join('?' * len(part))}) AND source IS NULL",
                part,
            ) as cur:
                out.extend(
                    (str(r), str(e), float(s), float(t)) for r, e, s, t in await cur.fetchall()
                )
        return out

    async def last_feedback_id(self) -> int:
        """The highest stored feedback row id."""
        async with self.db.reader.execute(
            "SELECT coalesce(max(id), 0) FROM feedback_events"
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def pairs_since(self, since: float) -> list[PairRow]:
        """Every (human feedback, evaluator result) pair with results stored since
        ``since`` (what calibration starts from after a restart)."""
        return await self._pairs("r.created_at >= ?", (since,))

    async def pairs_after(self, after_id: int, upto_id: int) -> list[PairRow]:
        """The pairs of people's feedback rows with ``after_id < id <= upto_id`` (stored
        since the previous look) and the results stored for their calls."""
        return await self._pairs("f.id > ? AND f.id <= ?", (after_id, upto_id))

    async def _pairs(self, where: str, params: tuple[Any, ...]) -> list[PairRow]:
        async with self.db.reader.execute(
            "SELECT r.prompt, r.variant, r.evaluator, f.event_id, f.score, r.score, r.call_ts "
            "FROM feedback_events f JOIN evaluation_results r ON r.request_id = f.request_id "
            f"WHERE {where} AND r.status = 'scored' AND f.source IS NULL "
            "AND f.request_id IS NOT NULL ORDER BY r.call_ts",
            params,
        ) as cur:
            rows = await cur.fetchall()
        return [
            (str(p), str(v), str(e), str(fid), float(h), float(j), float(t))
            for p, v, e, fid, h, j, t in rows
        ]


def _call(row: Any) -> Call:
    _id, ts, prompt, variant, model, request_id, input_json, output_json = row
    return Call.stored(
        str(request_id), str(prompt), str(variant), str(model), float(ts), input_json, output_json
    )
