"""The store's identity and its integrity check, on real SQLite files."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from promptd.daemon.store_guard import _start_ticks, process_gone, this_process
from promptd.storage.database import Database
from promptd.storage.identity import (
    KEEP_OWNERS,
    Owner,
    load_identity,
    record_kafka,
    record_owner,
)
from promptd.storage.sqlite import SqliteDatabase, _quick_check
from tests.sqlite_damage import damage_first_leaf


async def test_every_new_database_gets_its_own_identity(tmp_path: Path) -> None:
    """A store id is made when the database is created; the Kafka side is recorded by the
    first daemon only; the newest member ids are kept, each once."""
    first = await Database.open(tmp_path / "a.db")
    second = await Database.open(tmp_path / "b.db")
    try:
        a, b = await load_identity(first), await load_identity(second)
        assert a.store_id != b.store_id
        assert len(a.store_id) == 32
        assert (a.group_id, a.topics, a.owners) == (None, (), ())
        recorded = await record_kafka(first, "k:9092", "promptd", ["m", "f"])
        assert (recorded.bootstrap_servers, recorded.group_id, recorded.topics) == (
            "k:9092",
            "promptd",
            ("m", "f"),
        )
        again = await record_kafka(first, "other:9092", "other", ["x"])
        assert (again.group_id, again.topics) == ("promptd", ("m", "f"))
        for n in range(KEEP_OWNERS + 3):
            await record_owner(first, Owner(f"member-{n}", "h", 100 + n, None))
        await record_owner(first, Owner(f"member-{KEEP_OWNERS}", "h", 7, 1234))
        owners = (await load_identity(first)).owners
        assert len(owners) == KEEP_OWNERS
        assert owners[-1] == Owner(f"member-{KEEP_OWNERS}", "h", 7, 1234)
        assert len({o.member_id for o in owners}) == KEEP_OWNERS
    finally:
        await first.close()
        await second.close()


async def test_a_postgresql_store_gets_its_identity_from_its_own_migration(pg_cluster) -> None:
    """On PostgreSQL, migration 15 makes the identity row with the server's functions: 32
    hex digits, a different id per store, the creation time in epoch seconds."""
    urls = [pg_cluster.create_store() for _ in range(2)]
    try:
        before = time.time()
        stores = [await Database.open(url) for url in urls]
        try:
            a, b = [await load_identity(db) for db in stores]
            recorded = await record_kafka(stores[0], "k:9092", "promptd", ["m"])
        finally:
            for db in stores:
                await db.close()
    finally:
        for url in urls:
            pg_cluster.drop_store(url)
    assert a.store_id != b.store_id
    assert all(len(i.store_id) == 32 and int(i.store_id, 16) >= 0 for i in (a, b))
    assert before - 5 < a.created_at < time.time() + 5
    assert (recorded.group_id, recorded.topics) == ("promptd", ("m",))


def _fill(path: Path, rows: int) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE filler (id INTEGER PRIMARY KEY, x BLOB)")
        conn.execute(
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < ?) "
            "INSERT INTO filler (x) SELECT randomblob(1000) FROM c",
            (rows,),
        )
        conn.commit()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (Linux)")
def test_a_dead_run_is_told_from_a_live_process() -> None:
    """An owner whose process ended (or whose pid now names a process started at another
    time) is gone; a live process is not, nor one on another host; a member id this
    process no longer uses is."""
    me = this_process("current")
    parent = os.getppid()
    live = Owner("other", me.host, parent, _start_ticks(parent))
    with subprocess.Popen([sys.executable, "-c", "pass"]) as child:
        dead = Owner("dead", me.host, child.pid, _start_ticks(child.pid))
    assert child.returncode == 0
    assert process_gone(dead) is True
    assert process_gone(live) is False
    assert process_gone(Owner("reused", me.host, parent, 1)) is True
    assert process_gone(Owner("elsewhere", "another-host", 1, None)) is None
    assert process_gone(Owner("replaced", me.host, me.pid, me.started)) is True


async def test_quick_check_finds_a_damaged_page_and_keeps_to_its_time_bound(
    tmp_path: Path,
) -> None:
    """A healthy file checks complete and clean, a damaged page is reported; a check
    that is cut short (out of time, or the file locked by another process for longer
    than the bound) stops within the bound, incomplete, and never reports damage."""
    path = tmp_path / "c.db"
    db = await SqliteDatabase.connect(path)
    await db.close()
    _fill(path, 60_000)  # ~60 MB: a check of some tens of milliseconds
    db = await SqliteDatabase.connect(path)
    try:
        healthy = await db.quick_check(30.0)
        assert (healthy.problems, healthy.complete) == ((), True)
        cut = await db.quick_check(0.001)
        assert cut.problems == ()
    finally:
        await db.close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as holder:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("DELETE FROM filler WHERE id = 1")
        locked = _quick_check(path, 0.3)
        holder.execute("ROLLBACK")
    assert (locked.problems, locked.complete) == ((), False)
    assert locked.stopped == "database is locked"
    assert 0.2 < locked.duration_s < 2.0
    damage_first_leaf(path, "filler")
    db = await SqliteDatabase.connect(path)
    try:
        damaged = await db.quick_check(30.0)
        assert damaged.problems
        assert damaged.complete
    finally:
        await db.close()
