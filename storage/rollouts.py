"""Rollout persistence: state, step boundaries and the decision log, written atomically.

A transition is stored (new state, its decisions, and any registry change such as the
promotion of the candidate) in one transaction *before* its effects leave the process
(routing published to Kafka, metrics), so a crash can never apply a transition twice or
lose one: on restart the rollout resumes at exactly the stored step, weight and salt.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from promptd.storage.database import Connection, Database

LIVE_STATUSES = ("running", "paused", "pending")


class Member(BaseModel):
    """One prompt of a pipeline rollout: its active version when the rollout started and
    its candidate (``None``: the step is unchanged and keeps serving its active version)."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    baseline: str
    candidate: str | None = None


class StoredRollout(BaseModel):
    """A rollout row as stored. A pipeline rollout also names its ``pipeline`` and lists
    every member prompt; ``prompt``, ``candidate`` and ``baseline`` are its first changed
    step's."""

    model_config = ConfigDict(frozen=True)

    id: str
    prompt: str
    candidate: str
    baseline: str
    status: str
    state: dict[str, Any]
    step_starts: list[float]
    created_at: float
    updated_at: float
    final: dict[str, Any] | None = None
    pipeline: str | None = None
    members: tuple[Member, ...] = ()

    @property
    def prompts(self) -> tuple[str, ...]:
        """Every prompt whose routing the rollout sets."""
        return tuple(m.prompt for m in self.members) if self.members else (self.prompt,)

    @property
    def changes(self) -> tuple[Member, ...]:
        """The prompts that get a candidate, with their versions."""
        if not self.members:
            return (Member(prompt=self.prompt, baseline=self.baseline, candidate=self.candidate),)
        return tuple(m for m in self.members if m.candidate is not None)


class Decision(BaseModel):
    """One entry of a rollout's audit log."""

    model_config = ConfigDict(frozen=True)

    ts: float
    kind: str
    reason: str
    details: dict[str, Any] | None = None
    step: int | None = None
    weight: float | None = None


_COLS = (
    "id, prompt, candidate, baseline, status, state, step_starts, created_at, updated_at, "
    "pipeline, members"
)
_READ_COLS = f"{_COLS}, final"


def _row(row: Sequence[Any]) -> StoredRollout:
    return StoredRollout(
        id=row[0],
        prompt=row[1],
        candidate=row[2],
        baseline=row[3],
        status=row[4],
        state=json.loads(row[5]),
        step_starts=json.loads(row[6]),
        created_at=row[7],
        updated_at=row[8],
        pipeline=row[9],
        members=tuple(Member.model_validate(m) for m in json.loads(row[10] or "[]")),
        final=json.loads(row[11]) if row[11] else None,
    )


class RolloutStore:
    """Reads and atomic writes of rollouts."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def live(self) -> list[StoredRollout]:
        """Rollouts that are running or paused (resumed at start)."""
        placeholders = ", ".join("?" for _ in LIVE_STATUSES)
        async with self.db.reader.execute(
            f"SELECT {_READ_COLS} FROM rollouts WHERE status IN ({placeholders}) "
            "ORDER BY created_at",
            LIVE_STATUSES,
        ) as cur:
            return [_row(r) for r in await cur.fetchall()]

    async def all(self, limit: int = 200) -> list[StoredRollout]:
        """The most recent rollouts, newest first."""
        async with self.db.reader.execute(
            f"SELECT {_READ_COLS} FROM rollouts ORDER BY created_at DESC LIMIT ?",
            (limit,),
        ) as cur:
            return [_row(r) for r in await cur.fetchall()]

    async def get(self, rollout_id: str) -> StoredRollout | None:
        """One rollout by id."""
        async with self.db.reader.execute(
            f"SELECT {_READ_COLS} FROM rollouts WHERE id = ?",
            (rollout_id,),
        ) as cur:
            row = await cur.fetchone()
        return _row(row) if row else None

    async def decisions(self, rollout_id: str, limit: int = 500) -> list[Decision]:
        """The audit log of a rollout, oldest first (the last ``limit`` entries)."""
        async with self.db.reader.execute(
            "SELECT ts, kind, reason, details, step, weight FROM ("
            " SELECT * FROM rollout_decisions WHERE rollout_id = ? ORDER BY id DESC LIMIT ?"
            ") AS recent ORDER BY id",
            (rollout_id, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [
            Decision(
                ts=r[0],
                kind=r[1],
                reason=r[2],
                details=json.loads(r[3]) if r[3] else None,
                step=r[4],
                weight=r[5],
            )
            for r in rows
        ]

    async def create(
        self,
        rollout_id: str,
        prompt: str,
        candidate: str,
        baseline: str,
        state: Mapping[str, Any],
        step_starts: Sequence[float],
        decisions: Sequence[Decision],
        pipeline: str | None = None,
        members: Sequence[Member] = (),
    ) -> None:
        """Insert a new rollout and mark its candidates ``in_rollout`` (one transaction).

        The partial unique index refuses a second live rollout of the same prompt even if
        two requests race; that surfaces as a UNIQUE violation (``is_unique_violation``).
        """
        now = time.time()
        async with self.db.transaction() as conn:
            await conn.execute(
                f"INSERT INTO rollouts ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rollout_id,
                    prompt,
                    candidate,
                    baseline,
                    str(state["status"]),
                    json.dumps(dict(state)),
                    json.dumps(list(step_starts)),
                    now,
                    now,
                    pipeline,
                    json.dumps([m.model_dump() for m in members]) if members else None,
                ),
            )
            changed = [m for m in members if m.candidate is not None] or [
                Member(prompt=prompt, baseline=baseline, candidate=candidate)
            ]
            await conn.executemany(
                "UPDATE prompt_versions SET status = 'in_rollout' WHERE prompt = ? AND version = ?",
                [(m.prompt, m.candidate) for m in changed],
            )
            await _insert_decisions(conn, rollout_id, decisions)

    async def transition(
        self,
        rollout: StoredRollout,
        state: Mapping[str, Any],
        step_starts: Sequence[float],
        decisions: Sequence[Decision],
        outcome: str | None = None,
        final: Mapping[str, Any] | None = None,
    ) -> None:
        """Persist a transition; ``outcome`` (``promoted``, ``rolled_back`` or
        ``no_improvement``) updates the registry for every changed prompt (all of a
        pipeline's at once), ``final`` is the ended rollout's snapshot."""
        now = time.time()
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE rollouts SET status = ?, state = ?, step_starts = ?, updated_at = ?, "
                "final = coalesce(?, final) WHERE id = ?",
                (
                    str(state["status"]),
                    json.dumps(dict(state)),
                    json.dumps(list(step_starts)),
                    now,
                    json.dumps(dict(final)) if final is not None else None,
                    rollout.id,
                ),
            )
            await _insert_decisions(conn, rollout.id, decisions)
            for change in rollout.changes if outcome else ():
                await _apply_outcome(conn, outcome or "", change, now)


async def _apply_outcome(conn: Connection, outcome: str, change: Member, now: float) -> None:
    """Within a transition's transaction: the registry change of one changed prompt."""
    if outcome == "promoted":
        await conn.execute(
            "UPDATE prompt_versions SET status = 'retired' "
            "WHERE prompt = ? AND version = ? AND status = 'active'",
            (change.prompt, change.baseline),
        )
        await conn.execute(
            "UPDATE prompt_versions SET status = 'active' WHERE prompt = ? AND version = ?",
            (change.prompt, change.candidate),
        )
        await conn.execute(
            "UPDATE prompts SET active_version = ?, updated_at = ? WHERE name = ?",
            (change.candidate, now, change.prompt),
        )
    elif outcome in ("rolled_back", "no_improvement"):
        # A candidate that lost is rolled_back; one that did not prove a win is retired
        # (it was never active, so it is no backup; history says which).
        status = "rolled_back" if outcome == "rolled_back" else "retired"
        await conn.execute(
            "UPDATE prompt_versions SET status = ? WHERE prompt = ? AND version = ?",
            (status, change.prompt, change.candidate),
        )


async def _insert_decisions(
    conn: Connection, rollout_id: str, decisions: Sequence[Decision]
) -> None:
    if decisions:
        await conn.executemany(
            "INSERT INTO rollout_decisions (rollout_id, ts, kind, reason, details, step, weight) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    rollout_id,
                    d.ts,
                    d.kind,
                    d.reason,
                    json.dumps(d.details) if d.details else None,
                    d.step,
                    d.weight,
                )
                for d in decisions
            ],
        )
