"""The SQLite backend: one file, one writer connection, one reader connection.

WAL mode lets the reader see committed data while the writer works, so HTTP queries
never block ingestion. All writes go through :meth:`Database.transaction`, which holds
an asyncio lock (one writer in the process) and opens ``BEGIN IMMEDIATE`` so a second
process fails fast on the busy timeout instead of deadlocking mid-transaction.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar, cast

import aiosqlite
import structlog

from promptd.storage.batch import BatchOutcome, BatchTime, TopicPartitionKey
from promptd.storage.dialect import Dialect
from promptd.storage.errors import StorageError
from promptd.storage.rows import FeedbackRow, MetricRow
from promptd.storage.schema import MIGRATIONS, latest_version

log = structlog.get_logger("promptd.storage")

T = TypeVar("T")

# 100k pages (~400 MB of WAL): only a safety net behind the periodic passive checkpoint.
WRITER_AUTOCHECKPOINT_PAGES = 100_000


class SqliteDatabase:
    """Owner of the connections to one SQLite file (a
    :class:`~promptd.storage.database.Database`)."""

    dialect: Dialect = "sqlite"
    reader: aiosqlite.Connection

    def __init__(
        self,
        path: Path,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        checkpointer: aiosqlite.Connection,
    ):
        self.path = path
        self.location = str(path)
        self.writer = writer
        self.reader = reader
        self._checkpointer = checkpointer
        self._write_lock = asyncio.Lock()
        self._identity = _identity(path)

    def file_problem(self) -> str | None:
        """Why the file at ``path`` is no longer the one opened, or ``None``.

        SQLite keeps writing into an open file that was deleted or replaced (a restore
        while running, a data directory removed): those writes vanish with the process.
        The daemon checks this periodically and before every batch, and stops ingesting.
        """
        try:
            now = _identity(self.path)
        except FileNotFoundError:
            return f"the database file {str(self.path)!r} was deleted"
        except OSError as exc:
            return f"the database file {str(self.path)!r} cannot be checked: {exc}"
        if now != self._identity:
            return f"the database file {str(self.path)!r} was replaced by another file"
        return None

    @staticmethod
    async def open(
        target: Path | str, busy_timeout_ms: int = 5_000, **options: Any
    ) -> SqliteDatabase:
        """The SQLite file at ``target`` (``Database.open`` picks the backend by target)."""
        return await SqliteDatabase.connect(Path(target), busy_timeout_ms)

    @classmethod
    async def connect(cls, path: Path, busy_timeout_ms: int = 5_000) -> Self:
        """Open (creating if needed) and migrate the database at ``path``."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = await _connect(path, busy_timeout_ms)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the database {str(path)!r}: {exc}") from exc
        try:
            await writer.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across process crashes in WAL mode; only an OS crash or
            # power loss can drop the last transactions, which Kafka then replays.
            await writer.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints (and their fsyncs) run on their own connection and thread, see
            # checkpoint(); the writer only checkpoints itself if that falls far behind.
            await writer.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}")
            await _migrate(writer, path)
            reader = await _connect(path, busy_timeout_ms)
            checkpointer = await _connect(path, busy_timeout_ms)
        except BaseException:
            await writer.close()
            raise
        return cls(path, writer, reader, checkpointer)

    async def checkpoint(self) -> tuple[int, int]:
        """A passive WAL checkpoint off the writer's thread; returns (WAL pages, copied).

        Passive: it never blocks the writer or readers and copies what it can. Run it
        every second or so (the daemon does); a checkpoint's fsyncs then no longer
        stall ingestion on the writer's thread.
        """
        async with self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)") as cur:
            row = await cur.fetchone()
        return (int(row[1]), int(row[2])) if row else (0, 0)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` on the writer; rolls back on any error."""
        async with self._write_lock:
            try:
                await self.writer.execute("BEGIN IMMEDIATE")
            except asyncio.CancelledError:
                # The BEGIN is queued on the writer's thread and runs anyway: roll it back
                # there (after it, in order), or the next transaction could not begin.
                await self.writer.rollback()
                raise
            try:
                yield self.writer
            except BaseException:
                await self.writer.rollback()
                raise
            await self.writer.commit()

    async def store_events(
        self,
        metrics: Sequence[MetricRow],
        feedback: Sequence[FeedbackRow],
        offsets: Mapping[TopicPartitionKey, int],
        dead_letters: Mapping[str, int],
        clock: BatchTime,
        extra: Mapping[str, int],
    ) -> BatchOutcome:
        """The batch in one transaction on the writer's thread (:mod:`.sqlite_batch`)."""
        from promptd.storage.sqlite_batch import store_sync

        return await self.run_in_transaction(
            lambda conn: store_sync(conn, metrics, feedback, offsets, dead_letters, clock, extra)
        )

    async def run_in_transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the writer's own thread inside ``BEGIN IMMEDIATE``/``COMMIT``.

        One thread hop for a whole batch instead of one per statement: the event loop keeps
        decoding the next batch while this one is written, and Python work such as
        building rows leaves the loop's thread. Rolls back if ``fn`` raises.
        """

        def job(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
            return result

        async with self._write_lock:
            # aiosqlite runs every call as a function on its connection thread; this is
            # that mechanism (stable across the pinned aiosqlite range) for a whole job.
            run = cast(Callable[..., Awaitable[T]], self.writer._execute)
            return await run(job, self.writer._conn)

    async def quick_check(self, budget_s: float) -> IntegrityCheck:
        """``PRAGMA quick_check`` on its own read-only connection, in a worker thread,
        interrupted after ``budget_s`` seconds.

        quick_check reads every page and verifies the b-tree structure of every table and
        index (not that indexes match their tables: that is ``PRAGMA integrity_check``,
        O(N log N), for offline use). Measured at about 1 s per GB on the development
        machine.
        """
        return await asyncio.to_thread(_quick_check, self.path, budget_s)

    async def close(self) -> None:
        """Close both connections (the WAL is checkpointed by SQLite on last close)."""
        await self._checkpointer.close()
        await self.reader.close()
        await self.writer.close()


@dataclass(frozen=True, slots=True)
class IntegrityCheck:
    """What :meth:`SqliteDatabase.quick_check` found. ``problems`` is damage; a check
    that could not finish (out of time, or the file locked by another process) is not
    ``complete`` and says why in ``stopped``."""

    problems: tuple[str, ...]
    complete: bool
    duration_s: float
    stopped: str | None = None


#: Most problems quick_check lists.
_MAX_PROBLEMS = 10


def _quick_check(path: Path, budget_s: float) -> IntegrityCheck:
    started = time.perf_counter()
    # The busy timeout bounds a wait for a lock; the timer interrupts a long check.
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=budget_s)
    timer = threading.Timer(budget_s, conn.interrupt)
    timer.start()
    problems: list[str] = []
    stopped = None
    try:
        rows = conn.execute(f"PRAGMA quick_check({_MAX_PROBLEMS})").fetchall()
        for (text,) in rows:
            problems += [line for line in str(text).splitlines() if line and line != "ok"]
    except sqlite3.OperationalError as exc:  # interrupted, locked: not a finding
        stopped = str(exc)
    except sqlite3.DatabaseError as exc:  # e.g. "database disk image is malformed"
        problems.append(str(exc))
    finally:
        timer.cancel()
        conn.close()
    # The header line names the schema ("*** in database main ***"), not a problem.
    problems = [p for p in problems if not p.startswith("*** in database")]
    duration = time.perf_counter() - started
    return IntegrityCheck(tuple(problems), stopped is None, duration, stopped)


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


async def _connect(path: Path, busy_timeout_ms: int) -> aiosqlite.Connection:
    # isolation_level=None: we issue BEGIN ourselves, so sqlite3 must not open
    # implicit transactions behind our back.
    conn = await aiosqlite.connect(path, isolation_level=None)
    await conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    await conn.execute("PRAGMA foreign_keys=ON")
    return conn


async def _migrate(conn: aiosqlite.Connection, path: Path) -> None:
    async with conn.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    current = int(row[0]) if row else 0
    if current > latest_version():
        raise StorageError(
            f"database {str(path)!r} has schema version {current}, newer than this "
            f"promptd ({latest_version()}); upgrade promptd or restore an older backup"
        )
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        await conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(migration.sql):
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version={migration.version}")
        except BaseException:
            await conn.rollback()
            raise
        await conn.commit()
        log.info("schema_migrated", version=migration.version, migration=migration.name)


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (``executescript`` would COMMIT first)."""
    out, buf = [], []
    for line in script.splitlines():
        stripped = line.strip()
        if stripped.startswith("--") or not stripped:
            continue
        buf.append(line)
        if sqlite3.complete_statement("\n".join(buf)):
            out.append("\n".join(buf))
            buf = []
    if buf:
        out.append("\n".join(buf))
    return out
