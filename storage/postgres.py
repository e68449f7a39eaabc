"""The PostgreSQL backend (asyncpg): the store several daemons share.

The same SQL as the SQLite backend runs here, translated once per text by
:mod:`.dialect`. A connection pool serves the reader (each query takes a connection for
its duration; ``fetchmany`` streams through a server-side cursor) and the writer: one
write transaction at a time in the process, as on SQLite, so the code above keeps the
same guarantees (row ids in commit order, a read-then-write transaction sees no other
writer of this process).

On a shared store the writes are fenced (:class:`~promptd.storage.database.Fence`): every
write transaction first locks the leadership row in share mode and checks that this
daemon's ``(holder, generation)`` is the current one and its lease has not run out by
the database's clock. A standby, or a leader that was paused past its lease, gets
:class:`~promptd.storage.database.FencedError` and writes nothing; the share lock makes a
takeover wait for a write that passed the check, so the two never interleave. Sessions
that sit inside a transaction longer than ``idle_in_transaction_timeout_s`` are ended by
the server, so a paused leader cannot hold that lock (or any other) past its lease.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Generator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import urlsplit, urlunsplit

import structlog

from promptd.storage.batch import BatchOutcome, BatchTime, TopicPartitionKey
from promptd.storage.dialect import Dialect, Translated, to_postgresql
from promptd.storage.errors import FencedError, StorageError, UniqueViolation
from promptd.storage.protocols import Fence
from promptd.storage.rows import FeedbackRow, MetricRow
from promptd.storage.schema import MIGRATIONS, latest_version

log = structlog.get_logger("promptd.storage")

#: ``pg_advisory_xact_lock`` key of schema migrations (daemons starting together take
#: turns; the second finds the schema migrated).
MIGRATION_LOCK: Final = 0x70726F6D  # "prom"

_FENCE: Final = (
    "SELECT generation FROM leadership WHERE name = 'leader' AND holder = $1 "
    "AND generation = $2 AND expires_at > extract(epoch FROM clock_timestamp()) FOR SHARE"
)


def redact(url: str) -> str:
    """``url`` without its password (for logs and status)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}{host}"))


def _translate_error(exc: BaseException) -> BaseException:
    import asyncpg

    if isinstance(exc, asyncpg.UniqueViolationError):
        # Worded as SQLite words it, so a caller's message reads the same on both.
        return UniqueViolation(f"UNIQUE constraint failed: {exc.constraint_name}: {exc}")
    return exc


class PgCursor:
    """The rows of one statement, fetched on demand.

    Row-returning statements run at the first fetch: ``fetchone``/``fetchall`` in one
    round trip, ``fetchmany`` through a server-side cursor (on the reader, inside its own
    read-only transaction on a connection held until :meth:`close`).
    """

    def __init__(self, owner: _Executor, query: Translated, args: list[Any]) -> None:
        self._owner = owner
        self._query = query
        self._args = args
        self._rows: list[Any] | None = None
        self._stream: Any = None
        self._release: Any = None
        self.rowcount = -1

    async def _run(self) -> None:
        status = await self._owner.run(self._query.sql, self._args)
        self.rowcount = _rowcount(status)

    async def fetchone(self) -> Any:
        """The next row, or ``None``."""
        if self._stream is not None:
            return await self._stream.fetchrow()
        rows = await self._buffered()
        return rows.pop(0) if rows else None

    async def fetchall(self) -> list[Any]:
        """Every remaining row."""
        if self._stream is not None:
            out: list[Any] = []
            while batch := await self._stream.fetch(1000):
                out.extend(batch)
            return out
        rows = await self._buffered()
        self._rows = []
        return rows

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        """Up to ``size`` rows (empty at the end), streamed from the server."""
        if self._rows is not None:
            out, self._rows = self._rows[: size or 1], self._rows[size or 1 :]
            return out
        if self._stream is None:
            self._stream, self._release = await self._owner.stream(self._query.sql, self._args)
        rows: list[Any] = await self._stream.fetch(size or 1)
        return rows

    async def _buffered(self) -> list[Any]:
        if self._rows is None:
            self._rows = list(await self._owner.fetch(self._query.sql, self._args))
        return self._rows

    async def close(self) -> None:
        """End a stream (its transaction and connection) if one is open."""
        release, self._release, self._stream = self._release, None, None
        if release is not None:
            await release()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while rows := await self.fetchmany(500):
            for row in rows:
                yield row


class PgResult:
    """What ``execute`` returns: await it, or ``async with`` it (closing the cursor)."""

    def __init__(self, owner: _Executor, sql: str, parameters: Any) -> None:
        self._owner = owner
        self._query = to_postgresql(sql)
        self._args = self._query.bind(parameters)
        self._cursor: PgCursor | None = None

    async def _open(self) -> PgCursor:
        cursor = PgCursor(self._owner, self._query, self._args)
        if not self._query.returns_rows:
            await cursor._run()
        self._cursor = cursor
        return cursor

    def __await__(self) -> Generator[Any, None, PgCursor]:
        return self._open().__await__()

    async def __aenter__(self) -> PgCursor:
        return await self._open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._cursor is not None:
            await self._cursor.close()


def _rowcount(status: str) -> int:
    """Rows changed, from a command tag (``INSERT 0 5``, ``UPDATE 3``, ``DELETE 0``)."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else -1


class _Executor:
    """Runs statements on one connection (a transaction) or on the pool (the reader)."""

    def __init__(self, conn: Any = None, pool: Any = None) -> None:
        self._conn = conn
        self._pool = pool

    async def run(self, sql: str, args: Sequence[Any]) -> str:
        try:
            if self._conn is not None:
                status: str = await self._conn.execute(sql, *args)
            else:
                status = await self._pool.execute(sql, *args)
        except Exception as exc:
            raise _translate_error(exc) from exc
        return status

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Any]:
        try:
            if self._conn is not None:
                rows: list[Any] = await self._conn.fetch(sql, *args)
            else:
                rows = await self._pool.fetch(sql, *args)
        except Exception as exc:
            raise _translate_error(exc) from exc
        return rows

    async def many(self, query: Translated, args: list[Sequence[Any]]) -> int:
        """Run ``query`` once per argument tuple, pipelined; the rows it changed (a
        statement without RETURNING gets ``RETURNING 1``, so each changed row answers)."""
        sql = query.sql if query.returns_rows else f"{query.sql} RETURNING 1"
        try:
            if self._conn is not None:
                rows = await self._conn.fetchmany(sql, args)
            else:
                rows = await self._pool.fetchmany(sql, args)
        except Exception as exc:
            raise _translate_error(exc) from exc
        return len(rows)

    async def stream(self, sql: str, args: Sequence[Any]) -> tuple[Any, Any]:
        """A server-side cursor, and the coroutine function that ends it."""
        if self._conn is not None:  # already inside a transaction
            cursor = await self._conn.cursor(sql, *args)

            async def nothing() -> None:
                return None

            return cursor, nothing
        conn = await self._pool.acquire()
        tx = conn.transaction(readonly=True)
        await tx.start()

        async def release() -> None:
            try:
                await tx.rollback()
            finally:
                await self._pool.release(conn)

        try:
            cursor = await conn.cursor(sql, *args)
        except BaseException:
            await release()
            raise
        return cursor, release


class PgConnection:
    """A connection as the modules use it: ``execute`` and ``executemany`` of SQLite-dialect
    SQL (the reader over the pool, or one transaction's connection)."""

    def __init__(self, conn: Any = None, pool: Any = None) -> None:
        self._executor = _Executor(conn, pool)
        #: The asyncpg connection of a transaction (``None`` for the reader).
        self.raw = conn

    def execute(self, sql: str, parameters: Any = None) -> PgResult:
        """Run one statement (see :class:`PgResult`)."""
        return PgResult(self._executor, sql, parameters)

    async def execute_fetchall(self, sql: str, parameters: Any = None) -> list[Any]:
        """Every row of one query (aiosqlite's shortcut of the same name)."""
        async with self.execute(sql, parameters) as cur:
            return await cur.fetchall()

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> PgCursor:
        """Run one statement per parameter tuple (pipelined); the cursor's ``rowcount``
        is the rows changed in all, as sqlite3 counts them."""
        query = to_postgresql(sql)
        cursor = PgCursor(self._executor, query, [])
        cursor.rowcount = await self._executor.many(
            query, [query.bind(list(p)) for p in parameters]
        )
        return cursor


class PostgresDatabase:
    """A connection pool on one PostgreSQL database, migrated at connect (a
    :class:`~promptd.storage.database.Database`)."""

    dialect: Dialect = "postgresql"

    def __init__(self, url: str, pool: Any) -> None:
        self.url = url
        self.location = redact(url)
        self.pool = pool
        self.reader = PgConnection(pool=pool)
        self._write_lock = asyncio.Lock()
        #: The leadership checked inside every write transaction (``None``: unfenced, as
        #: for a single daemon or a tool such as ``promptd storage migrate``).
        self.fence: Fence | None = None

    @staticmethod
    async def open(
        target: Path | str, busy_timeout_ms: int = 5_000, **options: Any
    ) -> PostgresDatabase:
        """The store at the URL ``target`` (``Database.open`` picks the backend by target;
        ``busy_timeout_ms`` is SQLite's)."""
        return await PostgresDatabase.connect(str(target), **options)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        pool_size: int = 10,
        connect_timeout_s: float = 10.0,
        idle_in_transaction_timeout_s: float = 5.0,
        migrate: bool = True,
    ) -> Self:
        """Connect a pool to ``url`` and apply the pending migrations."""
        import asyncpg

        settings = {
            "application_name": "promptd",
            # A paused or wedged process cannot hold locks inside a transaction longer.
            "idle_in_transaction_session_timeout": str(int(idle_in_transaction_timeout_s * 1000)),
        }
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=pool_size,
                timeout=connect_timeout_s,
                server_settings=settings,
                init=_init_connection,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise StorageError(f"cannot connect to {redact(url)}: {exc}") from exc
        db = cls(url, pool)
        try:
            if migrate:
                await _migrate(pool, db.location)
        except BaseException:
            await pool.close()
            raise
        return db

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PgConnection]:
        """A write transaction (fenced when :attr:`fence` is set); one at a time."""
        async with self._write_lock, self.pool.acquire() as conn, conn.transaction():
            await self._check_fence(conn)
            yield PgConnection(conn)

    async def _check_fence(self, conn: Any) -> None:
        fence = self.fence
        if fence is None:
            return
        token = fence.token()
        if token is None:
            reason = "this daemon does not hold the leadership"
            fence.fenced(reason)
            raise FencedError(f"write refused: {reason}")
        if await conn.fetchval(_FENCE, *token) is None:
            reason = f"the leadership of generation {token[1]} has ended (lease lost)"
            fence.fenced(reason)
            raise FencedError(f"write refused: {reason}")

    async def store_events(
        self,
        metrics: Sequence[MetricRow],
        feedback: Sequence[FeedbackRow],
        offsets: Mapping[TopicPartitionKey, int],
        dead_letters: Mapping[str, int],
        clock: BatchTime,
        extra: Mapping[str, int],
    ) -> BatchOutcome:
        """The batch in one fenced transaction (:mod:`.pg_batch`)."""
        from promptd.storage.pg_batch import store

        async with self.transaction() as conn:
            return await store(conn.raw, metrics, feedback, offsets, dead_letters, clock, extra)

    async def check_schema(self) -> None:
        """Raise :class:`StorageError` when another daemon migrated the store past this
        code since it opened it (a newer promptd in a rolling upgrade): this one must
        not lead it."""
        async with self.pool.acquire() as conn:
            current = await _schema_version(conn)
        if current > latest_version():
            raise StorageError(
                f"database {self.location} has schema version {current}, newer than this "
                f"promptd ({latest_version()}): a newer promptd migrated it; upgrade this one"
            )

    def file_problem(self) -> str | None:
        """Nothing to watch: the server keeps its files."""
        return None

    async def checkpoint(self) -> tuple[int, int]:
        """Nothing to do: the server checkpoints itself."""
        return (0, 0)

    async def close(self) -> None:
        """Close the pool (waits for connections in use to be released)."""
        try:
            await asyncio.wait_for(self.pool.close(), 10)
        except TimeoutError:
            self.pool.terminate()


async def _init_connection(conn: Any) -> None:
    # numeric (sums of BIGINTs) as float, as SQLite returns them: no Decimal reaches JSON.
    await conn.set_type_codec(
        "numeric", encoder=str, decoder=float, schema="pg_catalog", format="text"
    )


async def _migrate(pool: Any, location: str) -> None:
    """Apply pending migrations, one transaction each, under an advisory lock."""
    async with pool.acquire() as conn:
        for migration in MIGRATIONS:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                await _create_version_table(conn)
                current = await _schema_version(conn)
                if current > latest_version():
                    raise StorageError(
                        f"database {location} has schema version {current}, newer than "
                        f"this promptd ({latest_version()}); upgrade promptd or restore an "
                        "older backup"
                    )
                if migration.version <= current:
                    continue
                await conn.execute(migration.script("postgresql"))
                await conn.execute("UPDATE schema_version SET version = $1", migration.version)
            log.info("schema_migrated", version=migration.version, migration=migration.name)


async def _create_version_table(conn: Any) -> None:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);"
        "INSERT INTO schema_version (version) SELECT 0 "
        "WHERE NOT EXISTS (SELECT 1 FROM schema_version)"
    )


async def _schema_version(conn: Any) -> int:
    return int(await conn.fetchval("SELECT version FROM schema_version"))
