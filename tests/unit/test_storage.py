"""Storage on both backends: migrations, idempotent batches with offsets, counters,
retention (tests that take ``store_target`` run on SQLite and on PostgreSQL)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from promptd.events import FeedbackEvent, MetricEvent, new_event_id
from promptd.storage.database import Database, StorageError
from promptd.storage.repository import EventRepository
from promptd.storage.rows import METRIC_COLUMNS, MetricView, feedback_row, metric_row
from promptd.storage.schema import latest_version
from promptd.storage.sqlite_batch import ROWS_PER_STATEMENT


def _metric(ts: float | None = None, event_id: str | None = None) -> MetricEvent:
    return MetricEvent(
        event_id=event_id or new_event_id(),
        ts=ts if ts is not None else time.time(),
        prompt="p",
        variant="v1",
        model="m",
        request_id=new_event_id(),
        latency_ms=10.0,
        success=True,
    )


def _feedback(ts: float | None = None) -> FeedbackEvent:
    return FeedbackEvent(
        event_id=new_event_id(),
        ts=ts if ts is not None else time.time(),
        prompt="p",
        variant="v1",
        request_id="r",
        score=0.5,
    )


async def test_open_migrates_and_uses_wal(tmp_path: Path) -> None:
    """A new file is created in WAL mode at the latest schema version."""
    db = await Database.open(tmp_path / "sub" / "x.db")
    await db.close()
    with sqlite3.connect(tmp_path / "sub" / "x.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == latest_version()


async def test_newer_database_is_refused(store_target: Path | str) -> None:
    """A database written by a newer promptd is refused with a clear error."""
    db = await Database.open(store_target)
    async with db.transaction() as conn:
        await conn.execute(
            _text(
                db,
                f"PRAGMA user_version={latest_version() + 1}",
                f"UPDATE schema_version SET version = {latest_version() + 1}",
            )
        )
    await db.close()
    with pytest.raises(StorageError, match="newer than this"):
        await Database.open(store_target)


async def test_postgresql_schema_is_migrated_once_by_concurrent_starts(pg_url: str) -> None:
    """Daemons starting together on an empty PostgreSQL database take turns: the schema
    is migrated once, to the latest version, and both open it."""
    import asyncio

    first, second = await asyncio.gather(Database.open(pg_url), Database.open(pg_url))
    async with first.reader.execute("SELECT version FROM schema_version") as cur:
        assert await cur.fetchall() == [(latest_version(),)]
    await first.close()
    await second.close()


async def test_batch_is_idempotent_and_records_offsets(store_target: Path | str) -> None:
    """Re-storing a batch stores nothing new, counts duplicates, and keeps the latest offsets."""
    db = await Database.open(store_target)
    repo = EventRepository(db)
    metrics = [_metric() for _ in range(10)]
    first = await repo.store_batch(metrics, [_feedback()], {("m", 0): 10, ("f", 1): 1})
    assert (first.metrics_stored, first.feedback_stored, first.duplicates) == (10, 1, 0)
    again = await repo.store_batch([*metrics, metrics[0]], [], {("m", 0): 21}, {"invalid": 2})
    assert (again.stored, again.duplicates) == (0, 11)
    assert again.metrics == ()
    assert await repo.load_offsets() == {("m", 0): 21, ("f", 1): 1}
    assert await repo.load_offsets([("f", 1)]) == {("f", 1): 1}
    counters = await repo.counters()
    assert counters == {
        "stored.metric": 10,
        "stored.feedback": 1,
        "duplicates": 11,
        "dead_lettered": 2,
        "dead_lettered.invalid": 2,
    }
    await db.close()


async def test_partial_duplicates_report_only_new_events(store_target: Path | str) -> None:
    """With some duplicates in a batch, the outcome lists exactly the newly stored events."""
    db = await Database.open(store_target)
    repo = EventRepository(db)
    old = [_metric() for _ in range(3)]
    await repo.store_batch(old, [], {})
    new = [_metric() for _ in range(2)]
    outcome = await repo.store_batch([old[0], new[0], new[0], old[2], new[1]], [], {})
    assert [e.event_id for e in outcome.metrics] == [new[0].event_id, new[1].event_id]
    assert outcome.duplicates == 3
    await db.close()


async def test_failed_batch_rolls_back_events_and_offsets(store_target: Path | str) -> None:
    """If the transaction fails, neither the events nor the offsets are stored."""
    import asyncpg

    db = await Database.open(store_target)
    repo = EventRepository(db)
    async with db.transaction() as conn:
        await conn.execute(
            _text(
                db,
                "CREATE TRIGGER boom BEFORE INSERT ON feedback_events "
                "BEGIN SELECT RAISE(ABORT, 'x'); END",
                "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'x'; END $$; "
                "CREATE TRIGGER boom BEFORE INSERT ON feedback_events "
                "FOR EACH ROW EXECUTE FUNCTION boom()",
            )
        )
    with pytest.raises((sqlite3.IntegrityError, asyncpg.RaiseError)):
        await repo.store_batch([_metric()], [_feedback()], {("m", 0): 5})
    assert await repo.count_events() == (0, 0)
    assert await repo.load_offsets() == {}
    await db.close()


async def test_retention_deletes_only_old_events(store_target: Path | str) -> None:
    """Events older than the cutoff are deleted in chunks; newer ones stay."""
    db = await Database.open(store_target)
    repo = EventRepository(db)
    now = time.time()
    old = [_metric(now - 100_000) for _ in range(25)]
    fresh = [_metric(now) for _ in range(5)]
    await repo.store_batch(old, [_feedback(now - 100_000)], {})
    await repo.store_batch(fresh, [], {})
    # A batch that straddles the cutoff stays whole until its newest event ages out.
    await repo.store_batch([_metric(now - 100_000), _metric(now)], [], {})
    # The old feedback is its table's newest row: it stays, so that ids never repeat.
    assert await repo.purge_older_than(now - 50_000, chunk=7) == 25
    assert await repo.count_events() == (7, 1)
    floor = await repo.first_id_since("metric_events", now - 50_000)
    async with db.reader.execute("SELECT min(id) FROM metric_events") as cur:
        assert (await cur.fetchone())[0] == floor
    assert await repo.first_id_since("metric_events", now + 10) == 33
    await db.close()


async def test_rows_are_stored_exactly_across_statement_boundaries(
    store_target: Path | str,
) -> None:
    """A batch longer than one multi-row statement, mixing captured and plain rows, with
    repeats inside a statement and across statements: every new row is stored once, with
    every column as given; listeners get them in the order they were stored (row ids; on
    SQLite the plain rows, then the captured ones), as replays from storage read them;
    repeats count as duplicates."""
    db = await Database.open(store_target)
    try:
        repo = EventRepository(db)
        now = time.time()
        rows = [
            MetricView(*metric_row(_metric(now + i))) for i in range(3 * ROWS_PER_STATEMENT + 7)
        ]
        rows[5] = rows[5]._replace(input='{"q":"é"}', attributes='{"k":"v"}')
        rows[200] = rows[200]._replace(output='"answer"', quality=0.25, tokens_in=7)
        offered = [*rows[:10], rows[3], *rows[10:], rows[0], rows[200]]
        outcome = await repo.store_batch(offered, [feedback_row(_feedback())] * 2, {})
        assert (outcome.metrics_stored, outcome.feedback_stored) == (len(rows), 1)
        assert outcome.duplicates == 4
        captured = [rows[5], rows[200]]
        if db.dialect == "sqlite":  # one statement shape after the other
            assert list(outcome.metric_rows) == [r for r in rows if r not in captured] + captured
        else:  # one statement, in the order offered
            assert list(outcome.metric_rows) == rows
        assert outcome.metrics[outcome.metric_rows.index(rows[5])].input == rows[5].input
        columns = ", ".join(METRIC_COLUMNS)
        async with db.reader.execute(f"SELECT {columns} FROM metric_events ORDER BY id") as cur:
            stored = [(*r[:8], bool(r[8]), *r[9:]) for r in await cur.fetchall()]
        assert stored == list(outcome.metric_rows)
    finally:
        await db.close()


async def test_row_ids_never_repeat_after_retention_empties_a_table(
    store_target: Path | str,
) -> None:
    """Retention keeps each table's newest row, so new rows get ids above every old one."""
    db = await Database.open(store_target)
    repo = EventRepository(db)
    now = time.time()
    first = await repo.store_batch([_metric(now - 100_000) for _ in range(5)], [], {})
    assert first.last_metric_id == 5
    assert await repo.purge_older_than(now) == 4
    again = await repo.store_batch([_metric(now)], [], {})
    assert again.last_metric_id == 6
    assert again.metrics[0].ts == now
    await db.close()


async def test_passive_checkpoint_copies_the_wal(tmp_path: Path) -> None:
    """The checkpointer copies every WAL page back while nobody reads an old snapshot."""
    db = await Database.open(tmp_path / "x.db")
    await EventRepository(db).store_batch([_metric() for _ in range(500)], [], {})
    pages, copied = await db.checkpoint()
    assert pages > 0
    assert copied == pages
    await db.close()


async def test_pg_dump_and_pg_restore_round_trip_a_store(
    pg_cluster: Any, pg_url: str, tmp_path: Path
) -> None:
    """The documented backup (pg_dump -Fc) restored into an empty database (pg_restore
    --no-owner) opens at the same schema with the same rows, and new rows get new ids."""
    db = await Database.open(pg_url)
    repo = EventRepository(db)
    await repo.store_batch([_metric() for _ in range(30)], [_feedback()], {("m", 0): 31})
    await db.close()
    dump = tmp_path / "promptd.dump"
    schema = pg_url.rsplit("search_path=", 1)[1]
    tools = pg_cluster.binaries
    await _tool(tools / "pg_dump", "--format=custom", f"--schema={schema}", f"--file={dump}",
                pg_url.split("?")[0])  # fmt: skip
    name = f"restored_{schema}"
    pg_cluster.psql(f'CREATE DATABASE "{name}"')
    try:
        target = pg_cluster.url(name)
        await _tool(tools / "pg_restore", "--no-owner", f"--dbname={target}", str(dump))
        restored = await Database.open(f"{target}?search_path={schema}")
        again = EventRepository(restored)
        assert await again.count_events() == (30, 1)
        assert await again.load_offsets() == {("m", 0): 31}
        outcome = await again.store_batch([_metric()], [], {})
        assert outcome.last_metric_id == 31
        await restored.close()
    finally:
        pg_cluster.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _tool(path: Path, *args: str) -> None:
    import asyncio
    import subprocess

    run = subprocess.run
    await asyncio.to_thread(run, [str(path), *args], check=True, capture_output=True, timeout=60)


async def test_a_transaction_cancelled_while_it_begins_leaves_none_open(tmp_path: Path) -> None:
    """A task cancelled while its BEGIN waits on the writer's thread (the optimizer's calls
    are cancelled when a sibling spends the budget): the BEGIN still runs there, and is
    rolled back, so the next transaction starts and commits."""
    import asyncio

    db = await Database.open(tmp_path / "cancel.db")
    try:

        async def write() -> None:
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO kv (k) VALUES ('cancelled')")

        await db.writer.execute("CREATE TABLE kv (k TEXT)")
        await db.writer.commit()
        task = asyncio.create_task(write())
        await asyncio.sleep(0)  # the task now waits for its BEGIN
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO kv (k) VALUES ('next')")
        async with db.reader.execute("SELECT k FROM kv") as cur:
            assert [r[0] for r in await cur.fetchall()] == ["next"]
    finally:
        await db.close()


def _text(db: Database, sqlite: str, postgresql: str) -> str:
    """The statement for ``db``'s backend (schema surgery the shared SQL does not do)."""
    return postgresql if db.dialect == "postgresql" else sqlite
