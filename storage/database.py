"""The storage protocol: what every backend offers, and :meth:`Database.open` to pick one.

Two backends implement it: SQLite (:mod:`.sqlite`, the embedded default: one file, one
daemon) and PostgreSQL (:mod:`.postgres`, through asyncpg: the store several daemons
share, one of them leading). Code above this layer writes one SQL text per query in the
SQLite dialect with ``?`` or ``:name`` parameters; the PostgreSQL backend translates it
once per text (:mod:`.dialect` holds every difference in one place).

The contract both keep:

* ``reader`` runs queries on committed data and never blocks the writer;
* :meth:`Database.transaction` is the only way to write: one writer in the process,
  commit at the end, rollback on any error; on a shared PostgreSQL store it also checks
  the leader's fencing token inside the transaction (:class:`FencedError` otherwise);
* each ingested batch and its partitions' offsets are written by
  :meth:`Database.store_events` in one transaction (see :mod:`.repository`).
"""

from __future__ import annotations

import abc
import sqlite3
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from promptd.storage.dialect import Dialect

if TYPE_CHECKING:
    from promptd.storage.repository import BatchOutcome, TopicPartitionKey
    from promptd.storage.rows import FeedbackRow, MetricRow


class StorageError(RuntimeError):
    """The database cannot be used (newer schema, unwritable file, unreachable server…)."""


class FencedError(StorageError):
    """A write was refused because this daemon no longer holds the leadership (its
    fencing token is not the current one, or its lease ran out)."""


class UniqueViolation(StorageError):
    """An insert or update broke a UNIQUE constraint (both backends raise this)."""


class Cursor(Protocol):
    """What a query returns (aiosqlite's cursor, or the PostgreSQL backend's)."""

    @property
    def rowcount(self) -> int:
        """Rows changed by an INSERT, UPDATE or DELETE."""
        ...

    async def fetchone(self) -> Any:
        """The next row, or ``None``."""
        ...

    async def fetchall(self) -> Iterable[Any]:
        """Every remaining row."""
        ...

    async def fetchmany(self, size: int | None = None) -> Iterable[Any]:
        """Up to ``size`` rows (empty at the end)."""
        ...

    async def close(self) -> None:
        """Release the cursor."""
        ...


class Result(Protocol):
    """``execute``'s result: awaited, or used with ``async with`` (closes the cursor)."""

    def __await__(self) -> Generator[Any, None, Cursor]: ...

    async def __aenter__(self) -> Cursor: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Any: ...


class Connection(Protocol):
    """A connection as the SQL of the modules uses it (the reader, or a transaction)."""

    def execute(self, sql: str, parameters: Any = None) -> Result:
        """Run one statement; ``?`` parameters from a sequence, ``:name`` from a mapping."""
        ...

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> Any:
        """Run one statement once per parameter tuple."""
        ...

    async def execute_fetchall(self, sql: str, parameters: Any = None) -> Iterable[Any]:
        """Every row of one query."""
        ...


class Database(abc.ABC):
    """One open store. :meth:`open` returns the backend for a path or a URL."""

    #: ``sqlite`` or ``postgresql``: the SQL dialect of the backend.
    dialect: Dialect
    #: Where the store is, for logs and messages (a PostgreSQL URL without its password).
    location: str
    #: Queries on committed data (WAL reader, or a connection pool).
    reader: Connection

    @staticmethod
    async def open(target: Path | str, busy_timeout_ms: int = 5_000, **options: Any) -> Database:
        """Open (creating and migrating if needed) the store at ``target``: a SQLite file
        path, or a ``postgresql://`` URL (``options`` go to the PostgreSQL backend)."""
        if is_postgresql_url(str(target)):
            from promptd.storage.postgres import PostgresDatabase

            return await PostgresDatabase.connect(str(target), **options)
        from promptd.storage.sqlite import SqliteDatabase

        return await SqliteDatabase.connect(Path(target), busy_timeout_ms)

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Connection]:
        """A write transaction (the only way to write): commits at the end, rolls back on
        any error; one at a time in the process."""

    @abc.abstractmethod
    async def store_events(
        self,
        metrics: Sequence[MetricRow],
        feedback: Sequence[FeedbackRow],
        offsets: Mapping[TopicPartitionKey, int],
        dead_letters: Mapping[str, int],
        now: float,
        extra: Mapping[str, int],
    ) -> BatchOutcome:
        """Insert a batch (duplicates by ``event_id`` skipped and counted), upsert its
        partitions' next offsets and add the ingestion counters (stored, duplicates,
        ``dead_letters`` by reason, and ``extra``), all in one transaction; ``now`` is
        the rows' ``ingested_at``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection."""

    def file_problem(self) -> str | None:
        """Why the store is no longer the one opened (SQLite: a deleted or replaced file);
        ``None`` when all is well."""
        return None

    async def checkpoint(self) -> tuple[int, int]:
        """Housekeeping the daemon runs every second (SQLite: a passive WAL checkpoint);
        returns (pending, done) units of work."""
        return (0, 0)

    def sql(self, sqlite: str, postgresql: str) -> str:
        """The text for this backend, where one text cannot serve both (rare: see
        :mod:`.dialect` first)."""
        return postgresql if self.dialect == "postgresql" else sqlite


def is_unique_violation(exc: BaseException) -> bool:
    """True when ``exc`` says a UNIQUE constraint refused a write, on either backend."""
    if isinstance(exc, UniqueViolation):
        return True
    return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc)


def is_postgresql_url(target: str) -> bool:
    """True for ``postgresql://`` and ``postgres://`` URLs."""
    return target.startswith(("postgresql://", "postgres://"))


#: Called with the reason when a write was refused by the fencing check.
FenceListener = Callable[[str], None]


class Fence(Protocol):
    """The leadership a shared store checks inside every write transaction."""

    def token(self) -> tuple[str, int] | None:
        """``(holder, generation)`` while this daemon may write; ``None`` otherwise."""
        ...

    def fenced(self, reason: str) -> None:
        """A write was refused: the holder has lost the leadership."""
        ...
