"""The optimizer's tables: runs, paid model calls (the cache), and strategy outcomes.

Reads use the reader connection; writes go through :meth:`Database.transaction`, one
short transaction each. A call's answer is committed before the evaluator sees it, so a
crash loses at most the calls in flight.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Final

from promptd.optimization.llm import Completion, Message, Spend
from promptd.optimization.outcomes import Outcome, RunStatus
from promptd.optimization.selection import Evidence
from promptd.storage.database import Database

RUN_COLUMNS: Final = (
    "id",
    "prompt",
    "trigger_kind",
    "trigger_reason",
    "strategies",
    "status",
    "outcome",
    "parent_version",
    "started_at",
    "finished_at",
    "cost_usd",
    "llm_calls",
    "tokens",
    "candidates",
    "discarded",
    "deployed_version",
    "rollout_id",
    "error",
    "seed",
    "snapshot",
    "selection",
    "phase",
    "progress",
    "gate",
    "elapsed_s",
    "resumes",
    "target",
)
_SPEND: Final = frozenset({"llm_calls", "tokens", "cost_usd"})
_JSON_COLUMNS: Final = (
    "strategies",
    "candidates",
    "discarded",
    "snapshot",
    "selection",
    "progress",
    "gate",
    "target",
)


class OptimizationStore:
    """SQL of the optimizer, over the daemon's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- the call cache --------------------------------------------------------------

    async def get_call(self, key: str) -> Completion | None:
        """The stored answer for ``key``."""
        row = await self._one(
            "SELECT response, tokens_in, tokens_out, cost_usd, attempts "
            "FROM optimization_llm_calls WHERE key = ?",
            (key,),
        )
        if row is None:
            return None
        return Completion(row[0], int(row[1]), int(row[2]), float(row[3]), int(row[4]))

    async def note_spend(self, run_id: str, spent: Spend) -> None:
        """Record a run's spend in its row; never lowers it (calls run concurrently)."""
        async with self.db.transaction() as conn:
            await _note_spend(conn, run_id, spent)

    async def put_call(
        self,
        key: str,
        run_id: str,
        purpose: str,
        model: str,
        messages: list[Message],
        c: Completion,
        spent: Spend | None = None,
    ) -> None:
        """Store an answer; the first writer of a key wins (both paid the same call).
        With ``spent``, the run's spend after the call, in the same transaction."""
        async with self.db.transaction() as conn:
            if spent is not None:
                await _note_spend(conn, run_id, spent)
            await conn.execute(
                "INSERT INTO optimization_llm_calls (key, run_id, purpose, model, request, "
                "response, attempts, tokens_in, tokens_out, cost_usd, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                (
                    key,
                    run_id,
                    purpose,
                    model,
                    json.dumps(messages, ensure_ascii=False),
                    c.text,
                    c.attempts,
                    c.tokens_in,
                    c.tokens_out,
                    c.cost_usd,
                    time.time(),
                ),
            )

    async def spend(self, run_id: str) -> Spend:
        """What ``run_id`` paid for so far (restores a resumed run's budget): its stored
        answers, or its row's figures when larger (calls lost in flight, and answers of
        its calls that another run stored first)."""
        stored = await self._one(
            "SELECT coalesce(sum(attempts), 0), coalesce(sum(tokens_in + tokens_out), 0), "
            "coalesce(sum(cost_usd), 0) FROM optimization_llm_calls WHERE run_id = ?",
            (run_id,),
        )
        noted = await self._one(
            "SELECT llm_calls, tokens, cost_usd FROM optimization_runs WHERE id = ?", (run_id,)
        ) or (0, 0, 0.0)
        assert stored is not None
        return Spend(
            max(int(stored[0]), int(noted[0] or 0)),
            max(int(stored[1]), int(noted[1] or 0)),
            max(float(stored[2]), float(noted[2] or 0.0)),
        )

    async def purge_calls(self, older_than: float, keep_runs: Sequence[str]) -> int:
        """Forget answers older than ``older_than``, except those of running runs."""
        marks = ",".join("?" for _ in keep_runs) or "''"
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                f"DELETE FROM optimization_llm_calls WHERE created_at < ? "
                f"AND run_id NOT IN ({marks})",
                (older_than, *keep_runs),
            )
            return int(cur.rowcount)

    # -- runs ------------------------------------------------------------------------

    async def create_run(self, row: dict[str, Any], last_started_at: float) -> None:
        """Insert a running run and note the start in the policy table."""
        cols = [c for c in RUN_COLUMNS if c in row]
        values = [_encode(c, row[c]) for c in cols]
        async with self.db.transaction() as conn:
            await conn.execute(
                f"INSERT INTO optimization_runs ({', '.join(cols)}) "
                f"VALUES ({', '.join('?' for _ in cols)})",
                values,
            )
            await conn.execute(
                "INSERT INTO optimization_policy (prompt, last_started_at, updated_at) "
                "VALUES (?, ?, ?) ON CONFLICT (prompt) DO UPDATE SET "
                "last_started_at = excluded.last_started_at, updated_at = excluded.updated_at",
                (row["prompt"], last_started_at, last_started_at),
            )

    async def update_run(self, run_id: str, **fields: Any) -> None:
        """Set some columns of a run (checkpoints, progress); the spend columns never
        go down (a checkpoint may race the spend noted before a call)."""
        cols = list(fields)
        sets = ", ".join(f"{c} = max({c}, ?)" if c in _SPEND else f"{c} = ?" for c in cols)
        async with self.db.transaction() as conn:
            await conn.execute(
                f"UPDATE optimization_runs SET {sets} WHERE id = ?",
                (*(_encode(c, fields[c]) for c in cols), run_id),
            )

    async def finish_run(self, run_id: str, prompt: str, now: float, **fields: Any) -> None:
        """Final columns of a run and the policy's ``last_finished_at``, in one transaction."""
        cols = list(fields)
        sets = ", ".join(f"{c} = ?" for c in cols)
        async with self.db.transaction() as conn:
            await conn.execute(
                f"UPDATE optimization_runs SET {sets}, finished_at = ? WHERE id = ?",
                (*(_encode(c, fields[c]) for c in cols), now, run_id),
            )
            await conn.execute(
                "UPDATE optimization_policy SET last_finished_at = ?, updated_at = ? "
                "WHERE prompt = ?",
                (now, now, prompt),
            )

    async def running(self) -> list[dict[str, Any]]:
        """Runs a stopped daemon left running (to resume)."""
        return await self._select("WHERE status = ? ORDER BY started_at", (str(RunStatus.RUNNING),))

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        """One run, or ``None``."""
        rows = await self._select("WHERE id = ?", (run_id,))
        return rows[0] if rows else None

    async def list_runs(self, prompt: str | None, limit: int) -> list[dict[str, Any]]:
        """Runs, newest first."""
        if prompt is None:
            return await self._select("ORDER BY started_at DESC LIMIT ?", (limit,))
        return await self._select(
            "WHERE prompt = ? ORDER BY started_at DESC LIMIT ?", (prompt, limit)
        )

    async def awaiting_online(self) -> list[dict[str, Any]]:
        """Deployed runs whose rollout's result the bandit has not learned yet."""
        return await self._select(
            "WHERE outcome = ? AND rollout_id IS NOT NULL AND NOT EXISTS ("
            "SELECT 1 FROM optimization_outcomes o WHERE o.run_id = optimization_runs.id "
            "AND o.kind = 'online')",
            (str(Outcome.DEPLOYED),),
        )

    async def policy_rows(self) -> list[tuple[str, float | None, float | None]]:
        """The trigger policy's memory per prompt."""
        async with self.db.reader.execute(
            "SELECT prompt, last_started_at, last_finished_at FROM optimization_policy"
        ) as cur:
            rows = await cur.fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    async def _one(self, sql: str, params: Sequence[Any]) -> Sequence[Any] | None:
        async with self.db.reader.execute(sql, tuple(params)) as cur:
            row = await cur.fetchone()
        return None if row is None else tuple(row)

    async def _select(self, tail: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        sql = f"SELECT {', '.join(RUN_COLUMNS)} FROM optimization_runs {tail}"
        async with self.db.reader.execute(sql, tuple(params)) as cur:
            rows = await cur.fetchall()
        return [_decode(r) for r in rows]

    # -- the bandit's evidence -------------------------------------------------------

    async def record_outcome(
        self,
        run_id: str,
        prompt: str,
        strategy: str,
        kind: str,
        successes: float,
        failures: float,
        detail: str,
    ) -> None:
        """One run's pseudo-counts (idempotent per run, strategy and kind)."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO optimization_outcomes (run_id, prompt, strategy, kind, successes, "
                "failures, detail, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, strategy, kind) DO NOTHING",
                (run_id, prompt, strategy, kind, successes, failures, detail, time.time()),
            )

    async def outcomes(self) -> list[Evidence]:
        """All recorded outcomes, summed per run."""
        async with self.db.reader.execute(
            "SELECT prompt, strategy, sum(successes), sum(failures) "
            "FROM optimization_outcomes GROUP BY run_id, prompt, strategy"
        ) as cur:
            rows = await cur.fetchall()
        return [Evidence(r[0], r[1], float(r[2]), float(r[3])) for r in rows]


async def _note_spend(conn: Any, run_id: str, spent: Spend) -> None:
    await conn.execute(
        "UPDATE optimization_runs SET llm_calls = max(llm_calls, ?), tokens = max(tokens, ?), "
        "cost_usd = max(cost_usd, ?) WHERE id = ?",
        (spent.calls, spent.tokens, spent.cost_usd, run_id),
    )


def _encode(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS and value is not None:
        return json.dumps(value, ensure_ascii=False, default=str)
    return value


def _decode(row: Sequence[Any]) -> dict[str, Any]:
    out = dict(zip(RUN_COLUMNS, row, strict=True))
    for key in _JSON_COLUMNS:
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return out
