"""The storage protocol: what every backend offers, and :meth:`Database.open` to pick one.

Two backends implement it: SQLite (:mod:`.sqlite`, the embedded default: one file, one
daemon) and PostgreSQL (:mod:`.postgres`, through asyncpg: the store several daemons
share, one of them leading). Code above this layer writes one SQL text per query in the
SQLite dialect with ``?`` or ``:name`` parameters; the PostgreSQL backend translates it
once per text (:mod:`.dialect` holds every difference in one place).

The backends do not import this module (nor each other): they implement the
:class:`Database` protocol, and :meth:`Database.open` picks one. The contract both keep:

* ``reader`` runs queries on committed data and never blocks the writer;
* :meth:`Database.transaction` is the only way to write: one writer in the process,
  commit at the end, rollback on any error; on a shared PostgreSQL store it also checks
  the leader's fencing token inside the transaction (:class:`FencedError` otherwise);
* each ingested batch and its partitions' offsets are written by
  :meth:`Database.store_events` in one transaction (see :mod:`.repository`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from promptd.storage.dialect import Dialect

# Importable from here, where callers have always found them.
from promptd.storage.errors import (
    FencedError,
    StorageError,
    UniqueViolation,
    is_unique_violation,
)
from promptd.storage.protocols import Connection, Cursor, Fence, FenceListener, Result

if TYPE_CHECKING:
    from promptd.storage.batch import BatchOutcome, BatchTime, TopicPartitionKey
    from promptd.storage.rows import FeedbackRow, MetricRow

__all__ = [
    "Connection",
    "Cursor",
    "Database",
    "Fence",
    "FenceListener",
    "FencedError",
    "Result",
    "StorageError",
    "UniqueViolation",
    "is_postgresql_url",
    "is_unique_violation",
]


class Database(Protocol):
    """One open store. :meth:`open` returns the backend for a path or a URL."""

    #: ``sqlite`` or ``postgresql``: the SQL dialect of the backend.
    dialect: Dialect
    #: Where the store is, for logs and messages (a PostgreSQL URL without its password).
    location: str

    @property
    def reader(self) -> Connection:
        """Queries on committed data (WAL reader, or a connection pool)."""
        ...

    @staticmethod
    async def open(target: Path | str, busy_timeout_ms: int = 5_000, **options: Any) -> Database:
        """Open (creating and migrating if needed) the store at ``target``: a SQLite file
        path, or a ``postgresql://`` URL (``options`` go to the PostgreSQL backend)."""
        if is_postgresql_url(str(target)):
            from promptd.storage.postgres import PostgresDatabase

            return await PostgresDatabase.connect(str(target), **options)
        from promptd.storage.sqlite import SqliteDatabase

        return await SqliteDatabase.connect(Path(target), busy_timeout_ms)

    def transaction(self) -> AbstractAsyncContextManager[Connection]:
        """A write transaction (the only way to write): commits at the end, rolls back on
        any error; one at a time in the process."""
        ...

    async def store_events(
        self,
        metrics: Sequence[MetricRow],
        feedback: Sequence[FeedbackRow],
        offsets: Mapping[TopicPartitionKey, int],
        dead_letters: Mapping[str, int],
        clock: BatchTime,
        extra: Mapping[str, int],
    ) -> BatchOutcome:
        """Insert a batch (duplicates by ``event_id`` skipped and counted), upsert its
        partitions' next offsets and watermarks, record the batch's window watermark and
        add the ingestion counters (stored, duplicates, ``dead_letters`` by reason, and
        ``extra``), all in one transaction; ``clock.ingested_at`` is the rows'
        ``ingested_at``."""
        ...

    async def close(self) -> None:
        """Close every connection."""
        ...

    def file_problem(self) -> str | None:
        """Why the store is no longer the one opened (SQLite: a deleted or replaced file);
        ``None`` when all is well."""
        ...

    async def checkpoint(self) -> tuple[int, int]:
        """Housekeeping the daemon runs every second (SQLite: a passive WAL checkpoint);
        returns (pending, done) units of work."""
        ...


def is_postgresql_url(target: str) -> bool:
    """True for ``postgresql://`` and ``postgres://`` URLs."""
    return target.startswith(("postgresql://", "postgres://"))
