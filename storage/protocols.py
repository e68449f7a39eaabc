"""What the storage layer's callers and backends hold on to: connections, cursors, and
the fence a shared store checks inside every write."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from types import TracebackType
from typing import Any, Protocol


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
