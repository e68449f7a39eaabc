"""CLI: ``promptd check``, ``promptd backup PATH`` and ``promptd restore PATH``."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from promptd.daemon.cli.common import CommandError, base_url, read_runtime
from promptd.daemon.settings import Settings
from promptd.storage.schema import latest_version


def register(sub: Any) -> dict[str, Any]:
    """Add the operations subcommands."""
    check = sub.add_parser(
        "check", help="exit 0 when the daemon is healthy and ready (1 not, 2 unreachable)"
    )
    check.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="wait at most (default 5)"
    )
    backup = sub.add_parser("backup", help="consistent online backup of the SQLite file")
    backup.add_argument("path", type=Path, help="the backup file to write")
    restore = sub.add_parser("restore", help="replace the database with a backup (daemon stopped)")
    restore.add_argument("path", type=Path, help="the backup file to restore")
    return {"check": check_command, "backup": backup_command, "restore": restore_command}


def _probe(url: str, timeout: float) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def check_command(args: argparse.Namespace, settings: Settings) -> int:
    """Health for scripts and probes: 0 healthy and ready, 1 not, 2 unreachable."""
    url = base_url(settings)
    try:
        health, health_body = _probe(url + "/healthz", args.timeout)
        ready, ready_body = _probe(url + "/readyz", args.timeout)
    except (OSError, ValueError) as exc:
        print(f"unreachable: {url}: {exc}")
        return 2
    ok = health == 200 and ready == 200
    print(
        f"{'ok' if ok else 'not ok'}: health={health_body.get('status')} "
        f"({health_body.get('reason')}), readiness={ready_body.get('status')} "
        f"({ready_body.get('reason')})"
    )
    return 0 if ok else 1


def _sqlite_only(settings: Settings, command: str) -> None:
    if settings.storage.shared:
        raise CommandError(
            f"the store is PostgreSQL (storage.url): {command} it with pg_dump / pg_restore "
            "(see docs/operations.md, Backup and restore)"
        )


def backup_command(args: argparse.Namespace, settings: Settings) -> int:
    """Copy the live database with SQLite's online backup API (safe while it runs)."""
    _sqlite_only(settings, "back up")
    source = settings.storage.database_path
    if not source.exists():
        raise CommandError(f"no database at {source}")
    target: Path = args.path
    if target.exists():
        raise CommandError(f"{target} exists; refusing to overwrite a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    try:
        with sqlite3.connect(source, timeout=30) as src, sqlite3.connect(tmp) as dst:
            # Pages are copied in chunks; the daemon keeps writing in between and the
            # backup restarts from its snapshot as SQLite requires: a consistent copy.
            src.backup(dst, pages=1024)
        tmp.replace(target)
    except sqlite3.Error as exc:
        tmp.unlink(missing_ok=True)
        raise CommandError(f"backup failed: {exc}") from None
    print(f"backup written: {target} ({target.stat().st_size} bytes)")
    return 0


def daemon_running(settings: Settings) -> bool:
    """True when ``runtime.json`` names a live process (the daemon of this data dir)."""
    pid = read_runtime(settings).get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def restore_command(args: argparse.Namespace, settings: Settings) -> int:
    """Replace the database with a checked backup; refuses while the daemon runs."""
    _sqlite_only(settings, "restore")
    backup: Path = args.path
    if not backup.is_file():
        raise CommandError(f"no backup at {backup}")
    if daemon_running(settings):
        raise CommandError("the daemon is running: stop it first (restore replaces its database)")
    try:
        with sqlite3.connect(f"file:{backup}?mode=ro", uri=True) as conn:
            result = conn.execute("PRAGMA integrity_check").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as exc:
        raise CommandError(f"{backup} is not a usable SQLite database: {exc}") from None
    if result != "ok":
        raise CommandError(f"{backup} failed the integrity check: {result}")
    if version > latest_version():
        raise CommandError(f"{backup} has schema {version}, newer than this promptd")
    target = settings.storage.database_path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".restoring")
    with sqlite3.connect(backup) as src, sqlite3.connect(tmp) as dst:
        src.backup(dst)
    for suffix in ("-wal", "-shm"):
        Path(str(target) + suffix).unlink(missing_ok=True)
    tmp.replace(target)
    print(f"restored {target} from {backup} (schema {version}; newer migrations apply at start)")
    return 0
