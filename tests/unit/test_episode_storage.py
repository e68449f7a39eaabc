"""Episodes in storage: the migration, the rows of calls and feedback in episodes, the
lookup of an episode's calls, on a real SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from promptd.events import FeedbackEvent, MetricEvent
from promptd.storage.database import Database
from promptd.storage.repository import EventRepository
from promptd.storage.rows import FEEDBACK_COLUMNS, METRIC_COLUMNS, feedback_row, metric_row
from promptd.storage.schema import MIGRATIONS, latest_version
from promptd.storage.sqlite import _statements

T0 = 1_795_000_000.0


def metric(i: int, **extra: Any) -> MetricEvent:
    """A call ``r{i}``."""
    body = {
        "event_id": f"m{i}",
        "ts": T0 + i,
        "prompt": "p",
        "variant": "v1",
        "model": "m",
        "request_id": f"r{i}",
        "latency_ms": 10.0,
        "success": True,
    }
    return MetricEvent.model_validate(body | extra)


def feedback(i: int, **extra: Any) -> FeedbackEvent:
    """Feedback ``f{i}`` (on call ``r{i}`` unless ``extra`` says otherwise)."""
    body = {"event_id": f"f{i}", "ts": T0 + i, "score": 0.5}
    body |= {"prompt": "p", "variant": "v1", "request_id": f"r{i}"}
    return FeedbackEvent.model_validate(body | extra)


async def test_migration_keeps_feedback_rows_and_ids(tmp_path: Path) -> None:
    """A version-9 database keeps every feedback row with its id when the episodes
    migration rebuilds the table; new ids continue after the old ones."""
    path = tmp_path / "v9.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:9]:
        for statement in _statements(migration.sql):
            conn.execute(statement)
    conn.execute("PRAGMA user_version=9")
    conn.executemany(
        "INSERT INTO feedback_events (id, event_id, ts, prompt, variant, model, request_id, "
        "score, kind, comment, correction, ingested_at) VALUES (?, ?, ?, 'p', 'v1', NULL, ?, "
        "0.5, 'q', 'c', NULL, ?)",
        [(i * 10, f"old{i}", T0 + i, f"r{i}", T0 + i) for i in range(1, 4)],
    )
    conn.close()
    db = await Database.open(path)
    try:
        async with db.reader.execute(
            "SELECT id, event_id, request_id, comment, episode_id FROM feedback_events ORDER BY id"
        ) as cur:
            rows = [tuple(r) for r in await cur.fetchall()]
        assert rows == [(i * 10, f"old{i}", f"r{i}", "c", None) for i in range(1, 4)]
        outcome = await EventRepository(db).store_batch([], [feedback(9, episode_id="e")], {})
        assert outcome.last_feedback_id == 31
        async with db.reader.execute("PRAGMA user_version") as cur:
            assert (await cur.fetchone()) == (latest_version(),)
        async with db.reader.execute("PRAGMA index_list(feedback_events)") as cur:
            names = {r[1] for r in await cur.fetchall()}
        assert {"feedback_events_request", "feedback_events_episode"} <= names
    finally:
        await db.close()


async def test_calls_and_feedback_in_episodes_are_stored_exactly(store_target: Path | str) -> None:
    """Calls with and without an episode and with and without captures (the three
    statement shapes), and feedback on a call, on an episode and on both, read back as
    the rows they were."""
    db = await Database.open(store_target)
    try:
        calls = [
            metric(0),
            metric(1, episode_id="ep-a"),
            metric(2, episode_id="ep-a", input={"q": "x"}, output="y"),
            metric(3, input={"q": "z"}),
            metric(4, episode_id="ep-b", attributes={"k": "v"}),
            metric(5, episode_id="ep-b"),
        ]
        notes = [
            feedback(1),
            feedback(2, request_id=None, prompt=None, variant=None, episode_id="ep-a"),
            feedback(3, episode_id="ep-b"),
            feedback(4, request_id=None, prompt="p", variant=None, episode_id="ep-b"),
        ]
        outcome = await EventRepository(db).store_batch(calls, notes, {})
        assert (outcome.metrics_stored, outcome.feedback_stored) == (6, 4)
        async with db.reader.execute(
            # Each statement shape inserts its rows together: read back in event order.
            f"SELECT {', '.join(METRIC_COLUMNS)} FROM metric_events ORDER BY event_id"
        ) as cur:
            stored = [tuple(r) for r in await cur.fetchall()]
        assert stored == [_sqlite(metric_row(c)) for c in calls]
        async with db.reader.execute(
            f"SELECT {', '.join(FEEDBACK_COLUMNS)} FROM feedback_events ORDER BY id"
        ) as cur:
            stored_fb = [tuple(r) for r in await cur.fetchall()]
        assert stored_fb == [feedback_row(f) for f in notes]
        assert outcome.feedback_rows == tuple(feedback_row(f) for f in notes)
    finally:
        await db.close()


def _sqlite(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row as SQLite gives it back (booleans are integers)."""
    return tuple(int(v) if isinstance(v, bool) else v for v in row)


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ("NULL, NULL, NULL, NULL", "neither a request nor an episode"),
        ("NULL, NULL, 'r', NULL", "a call without its prompt"),
        ("'p', NULL, 'r', 'e'", "a call without its variant"),
    ],
)
async def test_the_table_refuses_feedback_without_a_target(
    store_target: Path | str, values: str, why: str
) -> None:
    """The schema itself refuses feedback rows the contract forbids (``why``)."""
    import asyncpg

    db = await Database.open(store_target)
    try:
        with pytest.raises(
            (sqlite3.IntegrityError, asyncpg.CheckViolationError), match=r"(?i)CHECK"
        ):
            async with db.transaction() as conn:
                await conn.execute(
                    "INSERT INTO feedback_events (event_id, ts, prompt, variant, request_id, "
                    f"episode_id, score, kind, ingested_at) VALUES ('x', 1, {values}, 0.5, "
                    "'q', 1)"
                )
    finally:
        await db.close()


async def test_episode_calls_are_those_stored_by_then(store_target: Path | str) -> None:
    """The calls of an episode are looked up in storage order, only those stored at or
    before the given time, across lookups of many episodes at once."""
    db = await Database.open(store_target)
    repo = EventRepository(db)
    try:
        first = await repo.store_batch(
            [metric(i, episode_id=f"ep-{i % 600}", prompt=f"p{i % 2}") for i in range(1200)],
            [],
            {},
        )
        cut = first.ingested_at
        late = await repo.store_batch([metric(5000, episode_id="ep-1", variant="late")], [], {})
        assert late.ingested_at > cut
        found = await repo.episode_calls({f"ep-{i}" for i in range(600)} | {"nope"}, cut)
        assert len(found) == 600
        assert found["ep-1"] == [("p1", "v1"), ("p1", "v1")]
        assert found["ep-0"] == [("p0", "v1"), ("p0", "v1")]
        later = await repo.episode_calls({"ep-1"}, late.ingested_at)
        assert later["ep-1"] == [("p1", "v1"), ("p1", "v1"), ("p", "late")]
    finally:
        await db.close()
