"""Moving a SQLite store into an empty PostgreSQL store (``promptd storage migrate``).

Both stores are first brought to the latest schema by their own migrations, so they hold
the same tables with the same columns. Every table is then copied with PostgreSQL's COPY,
in one transaction on the target, from one read transaction on the source (a consistent
view); row ids are kept (snapshots, batch ranges and decisions refer to them) and the
target's id sequences are moved past them. The row count of every table is compared
before the target commits: on any difference, or any error, the target stays empty.

A target that holds any row is refused: the tool never merges or overwrites. The one
exception is the identity row each store's migration makes (``store_identity``): a moved
store keeps its own, so the source's replaces the target's, unless a daemon already ran
on the target (it recorded its Kafka side there), which is refused like any other row.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

from promptd.storage.database import StorageError
from promptd.storage.postgres import PostgresDatabase
from promptd.storage.sqlite import SqliteDatabase

#: Tables referred to by others come first (foreign keys hold at every row).
_FIRST: Final = ("prompts", "prompt_versions", "rollouts", "rollout_decisions")
#: Kept per store: the schema's version and the election of its daemons.
_NOT_COPIED: Final = frozenset({"leadership", "schema_version"})
#: Made by every store's migration; the source's row replaces the target's.
_IDENTITY: Final = "store_identity"
#: The target's identity row counts as a row only once a daemon has used that store.
_IDENTITY_USED: Final = (
    f"SELECT count(*) FROM {_IDENTITY} WHERE group_id IS NOT NULL OR owners <> '[]'"
)
_CHUNK: Final = 5_000


@dataclass(frozen=True, slots=True)
class TableCopy:
    """One table copied: its name and row count (equal on both sides)."""

    table: str
    rows: int


async def _tables(source: SqliteDatabase) -> list[str]:
    async with source.reader.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ) as cur:
        names = {str(r[0]) for r in await cur.fetchall()} - _NOT_COPIED
    return [t for t in _FIRST if t in names] + sorted(names - set(_FIRST))


async def _columns(source: SqliteDatabase, table: str) -> list[str]:
    async with source.reader.execute(f"PRAGMA table_info({table})") as cur:
        return [str(r[1]) for r in await cur.fetchall()]


async def _rows(
    source: SqliteDatabase, table: str, columns: list[str]
) -> AsyncIterator[list[tuple[object, ...]]]:
    order = "ORDER BY id" if "id" in columns else ""
    async with source.reader.execute(f"SELECT {', '.join(columns)} FROM {table} {order}") as cur:
        while rows := list(await cur.fetchmany(_CHUNK)):
            yield [tuple(r) for r in rows]


async def refuse_non_empty(target: PostgresDatabase, tables: list[str]) -> None:
    """Raise :class:`StorageError` naming a table of ``target`` that holds rows."""
    for table in tables:
        count_rows = _IDENTITY_USED if table == _IDENTITY else f"SELECT count(*) FROM {table}"
        async with target.reader.execute(count_rows) as cur:
            count = int((await cur.fetchone())[0])
        if count:
            raise StorageError(
                f"the target store is not empty ({table} has {count} rows): "
                "promptd storage migrate only copies into an empty store"
            )


async def copy_store(
    source: SqliteDatabase,
    target: PostgresDatabase,
    progress: Callable[[TableCopy], None] = lambda _: None,
) -> list[TableCopy]:
    """Copy every table of ``source`` into the empty ``target``; the counts per table."""
    tables = await _tables(source)
    await refuse_non_empty(target, tables)
    copied: list[TableCopy] = []
    await source.reader.execute("BEGIN")  # one snapshot of the source for every table
    try:
        async with target.transaction() as conn:
            raw = conn.raw
            for table in tables:
                columns = await _columns(source, table)
                if table == _IDENTITY:
                    await raw.execute(f"DELETE FROM {_IDENTITY}")
                async for rows in _rows(source, table, columns):
                    await raw.copy_records_to_table(table, records=rows, columns=columns)
                sequence = None
                if "id" in columns:
                    sequence = await raw.fetchval("SELECT pg_get_serial_sequence($1, 'id')", table)
                if sequence is not None:  # a row id: new rows get ids above the copied
                    await raw.execute(
                        f"SELECT setval($1, coalesce(max(id), 0) + 1, false) FROM {table}",
                        sequence,
                    )
                copied.append(await _compare(source, raw, table))
                progress(copied[-1])
    finally:
        await source.reader.execute("COMMIT")
    return copied


async def _compare(source: SqliteDatabase, raw: Any, table: str) -> TableCopy:
    async with source.reader.execute(f"SELECT count(*) FROM {table}") as cur:
        row = await cur.fetchone()
    expected = int(row[0]) if row else 0
    got = int(await raw.fetchval(f"SELECT count(*) FROM {table}"))
    if got != expected:
        raise StorageError(
            f"{table}: {expected} rows in the source but {got} in the target; nothing was committed"
        )
    return TableCopy(table, got)
