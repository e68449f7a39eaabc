"""CLI: ``promptd storage migrate --to postgresql://…`` (a SQLite store into PostgreSQL)."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from promptd.daemon.cli.common import CommandError
from promptd.daemon.cli.ops import daemon_running
from promptd.daemon.settings import Settings
from promptd.storage.database import StorageError, is_postgresql_url


def register(sub: Any) -> dict[str, Any]:
    """Add ``storage migrate``."""
    storage = sub.add_parser("storage", help="move the store between backends")
    actions = storage.add_subparsers(dest="storage_command", required=True, metavar="ACTION")
    migrate = actions.add_parser(
        "migrate",
        help="copy the SQLite store into an empty PostgreSQL database (daemon stopped)",
    )
    migrate.add_argument("--to", required=True, help="postgresql://user:password@host/db")
    migrate.add_argument(
        "--from",
        dest="source",
        type=Path,
        help="the SQLite file (default: the configured one, storage.data_dir)",
    )
    return {"storage": migrate_command}


def migrate_command(args: argparse.Namespace, settings: Settings) -> int:
    """Copy the SQLite store into the PostgreSQL store at ``--to``; counts checked."""
    if not is_postgresql_url(args.to):
        raise CommandError(f"--to must be a postgresql:// URL, not {args.to!r}", 2)
    source: Path = args.source or settings.storage.database_path
    if not source.is_file():
        raise CommandError(f"no SQLite store at {source}")
    if args.source is None and daemon_running(settings):
        raise CommandError(
            "the daemon is running on this store: stop it first (events it stores during "
            "the copy would not be copied)"
        )
    try:
        copied = asyncio.run(_migrate(source, args.to))
    except (StorageError, sqlite3.Error, OSError) as exc:
        raise CommandError(str(exc)) from None
    total = sum(c.rows for c in copied)
    print(f"copied {total} rows in {len(copied)} tables; counts match. Now set storage.url.")
    return 0


async def _migrate(source: Path, url: str) -> list[Any]:
    import asyncpg

    from promptd.storage.copy import copy_store
    from promptd.storage.postgres import PostgresDatabase, redact
    from promptd.storage.sqlite import SqliteDatabase

    sqlite_db = await SqliteDatabase.connect(source)
    try:
        target = await PostgresDatabase.connect(url)
    except BaseException:
        await sqlite_db.close()
        raise
    try:
        print(f"copying {source} into {redact(url)}")
        return await copy_store(
            sqlite_db, target, lambda c: print(f"  {c.table:<24} {c.rows:>10} rows")
        )
    except asyncpg.PostgresError as exc:
        raise StorageError(f"the copy failed, nothing was committed: {exc}") from None
    finally:
        await target.close()
        await sqlite_db.close()
