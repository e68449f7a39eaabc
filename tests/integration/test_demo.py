"""`promptd demo` end to end: both scenarios reach the outcome they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("scenario", "outcome"), [("regress", "rolled_back"), ("improve", "promoted")]
)
def test_demo_scenario_reaches_its_outcome(tmp_path: Path, scenario: str, outcome: str) -> None:
    """The demo runs the whole loop (traffic, degradation alert, optimization, rollout) and
    its JSON report records the scenario's outcome and the final stored count; the SQLite
    file is left behind."""
    report_path = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTD_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "promptd.daemon.cli",
            "demo",
            "--scenario",
            scenario,
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
    report = json.loads(report_path.read_text())
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
