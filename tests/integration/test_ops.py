"""Operations commands: check, online backup while ingesting, restore."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from promptd.daemon.broker import free_port
from promptd.events import new_event_id
from tests.conftest import wait_for
from tests.kafka_helpers import produce

pytestmark = pytest.mark.integration

PROMPTD = [sys.executable, "-m", "promptd.daemon.cli"]


def _env(settings: Any, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTD_")}
    env["PROMPTD_DATA_DIR"] = str(settings.storage.data_dir)
    env["PROMPTD_HTTP_PORT"] = str(port)
    return env


async def _cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [*PROMPTD, *argv], env=env, capture_output=True, text=True, timeout=60
    )


async def test_check_backup_while_running_and_restore(
    make_settings, start_daemon, tmp_path: Path
) -> None:
    """`check` reports health by exit code; `backup` copies the live database consistently
    while events arrive; `restore` refuses a running daemon and restores a stopped one."""
    settings = make_settings()
    running = await start_daemon(settings)
    env = _env(settings, running.daemon.http_port)
    result = await _cli(env, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok")

    now = time.time()
    values = [
        json.dumps(
            {
                "event_id": new_event_id(),
                "type": "metric",
                "ts": now,
                "prompt": "p",
                "variant": "v1",
                "model": "m",
                "request_id": f"r{i}",
                "latency_ms": 1,
                "success": True,
            }
        ).encode()
        for i in range(3000)
    ]
    producing = asyncio.create_task(
        produce(settings.kafka.bootstrap_servers, settings.kafka.metrics_topic, values)
    )
    backup = tmp_path / "backups" / "promptd.db"
    result = await _cli(env, "backup", str(backup))
    assert result.returncode == 0, result.stderr
    await producing
    with sqlite3.connect(backup) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        in_backup = conn.execute("SELECT count(*) FROM metric_events").fetchone()[0]
        offsets = conn.execute(
            "SELECT coalesce(sum(next_offset), 0) FROM consumer_offsets"
        ).fetchone()[0]
    # Consistent: the offsets in the copy cover exactly the events in the copy.
    assert in_backup == offsets
    assert (await _cli(env, "backup", str(backup))).returncode == 1  # never overwrites

    await wait_for(lambda: _stored(running, 3000), timeout=30)
    # The running daemon recorded itself in runtime.json, which restore reads.
    assert (settings.storage.data_dir / "runtime.json").exists()
    refused = await _cli(env, "restore", str(backup))
    assert refused.returncode == 1
    assert "running" in refused.stderr
    await running.stop()
    assert not (settings.storage.data_dir / "runtime.json").exists()

    restored = await _cli(env, "restore", str(backup))
    assert restored.returncode == 0, restored.stderr
    with sqlite3.connect(settings.storage.database_path) as conn:
        assert conn.execute("SELECT count(*) FROM metric_events").fetchone()[0] == in_backup

    # The restored daemon resumes from the backup's offsets and catches up: nothing lost.
    again = await start_daemon(settings)
    await wait_for(lambda: _stored(again, 3000), timeout=30)
    await again.stop()  # also removes its runtime.json, which would name its port
    gone = _env(settings, free_port())
    result = await _cli(gone, "check", "--timeout", "1")
    assert result.returncode == 2


async def _stored(running: Any, n: int) -> bool:
    return (await running.daemon.repo.count_events())[0] == n


def test_restore_rejects_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    """Restoring from garbage fails with one line and leaves no database behind."""
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTD_")}
    env["PROMPTD_DATA_DIR"] = str(tmp_path / "data")
    result = subprocess.run(
        [*PROMPTD, "restore", str(junk)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "not a usable SQLite database" in result.stderr
    assert not (tmp_path / "data" / "promptd.db").exists()
