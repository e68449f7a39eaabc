"""`promptd demo` end to end: both scenarios reach the outcome they promise."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import REQUIRE_LIVE_TOOLS
from tests.integration.test_readme import block, commands
from tests.pg_cluster import find_binaries

pytestmark = pytest.mark.integration


def run_demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    """``promptd demo`` with ``args`` in a subprocess (shortened for CI); its JSON report."""
    report_path = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTD_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "promptd.daemon.cli",
            "demo",
            *args,
            "--time-scale",
            "0.3",
            "--max-seconds",
            "150",
            "--data-dir",
            str(tmp_path / "data"),
            "--report",
            str(report_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads(report_path.read_text())


def assert_story(report: Any, outcome: str) -> None:
    """The report's timeline tells the whole story, in order, and ends in ``outcome``."""
    assert report["outcome"] == outcome
    events = [e["event"] for e in report["timeline"]]
    for expected in (
        "degradation_started",
        "alert_fired",
        "optimization_started",
        "rollout_started",
        f"rollout_{'rollback' if outcome == 'rolled_back' else 'promote'}",
    ):
        assert expected in events, events
    assert events.index("degradation_started") < events.index("alert_fired")
    assert events.index("alert_fired") <= events.index("optimization_started")
    assert Path(report["database"]).is_file()
    assert report["routing"]["active_version"] == ("v2" if outcome == "promoted" else "v1")
    assert report["routing"]["weight"] == 0.0


@pytest.mark.parametrize(
    ("scenario", "outcome"), [("regress", "rolled_back"), ("improve", "promoted")]
)
def test_demo_scenario_reaches_its_outcome(
    tmp_path: Path, scenario: str, outcome: str, request: pytest.FixtureRequest
) -> None:
    """The demo runs the whole loop (traffic, degradation alert, optimization, rollout) and
    its JSON report records the scenario's outcome and the final stored count; the SQLite
    file is left behind, and (improve) ``promptd storage migrate`` copies it into
    PostgreSQL with every count equal, and refuses to copy it again."""
    result, report = run_demo(tmp_path, "--scenario", scenario)
    assert_story(report, outcome)
    assert "ALERT firing" in result.stdout
    assert "outcome" in result.stdout
    # The summary's count is final: everything the app delivered is stored (or
    # dead-lettered), not a count taken while the last batches were in flight.
    events = report["daemon_status"]["events"]
    assert report["sdk"]["delivered"] > 0
    app_stored = events["stored"] - events["stored_evaluations"]
    assert app_stored + events["dead_lettered"] == report["sdk"]["delivered"]
    # The demo's code check scored a sample of the calls, published as feedback.
    assert events["stored_evaluations"] > 0
    assert f"of {report['sdk']['delivered']} delivered" in result.stdout
    if scenario == "improve":
        # One demo store serves both checks (a demo run is the suite's costliest step).
        if find_binaries() is None and os.environ.get(REQUIRE_LIVE_TOOLS) != "1":
            pytest.skip("the demo passed; storage migrate not tested: no PostgreSQL binaries")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTD_")}
        check_migration(Path(report["database"]), request.getfixturevalue("pg_url"), env)


def test_demo_without_feedback_runs_on_evaluations(tmp_path: Path) -> None:
    """The README's ``promptd demo --feedback none``: the app sends no feedback at all;
    the code check's scores fire the alert, feed the optimizer and decide the rollout,
    which promotes the candidate."""
    [command] = [c for c in commands(block("sh", "--feedback none")) if "--feedback none" in c]
    args = shlex.split(command)
    assert args[:2] == [".venv/bin/promptd", "demo"], command
    result, report = run_demo(tmp_path, *args[2:])
    assert_story(report, "promoted")
    assert report["feedback"] == "none"
    assert report["ratings"] == 0
    assert report["signal"] == "eval:complete"
    events = report["daemon_status"]["events"]
    assert events["stored_feedback"] == events["stored_evaluations"] > 0  # none from people
    assert "evaluators only" in result.stdout
    assert "calls / evaluations" in result.stdout


def check_migration(database: Path, url: str, env: dict[str, str]) -> None:
    """``promptd storage migrate --to`` copies the store exactly, refuses a second copy."""
    command = [sys.executable, "-m", "promptd.daemon.cli", "storage", "migrate", "--to", url,
               "--from", str(database)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "counts match" in done.stdout
    listed = _sqlite(
        database,
        "SELECT name FROM sqlite_master "
        "WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name != 'leadership'",
    )
    tables = [name for (name,) in listed]
    target = asyncio.run(_counts(url, tables))
    for table in tables:
        assert target[table] == _sqlite(database, f"SELECT count(*) FROM {table}")[0][0], table
    assert target["metric_events"] > 1000
    # The moved store keeps its identity (the target's own row is replaced).
    (store_id,) = _sqlite(database, "SELECT store_id FROM store_identity")[0]
    assert asyncio.run(_store_id(url)) == store_id
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1
    assert "not empty" in again.stderr


def _sqlite(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


async def _store_id(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SELECT store_id FROM store_identity"))
    finally:
        await conn.close()


async def _counts(url: str, tables: list[str]) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t in tables}
    finally:
        await conn.close()
