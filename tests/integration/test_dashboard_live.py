"""A real Prometheus scrapes a real demo run; every dashboard expression returns data.

The demo (`promptd demo --scenario regress --http-port P`) runs the whole loop: traffic,
the degradation alert, an optimization run, a rollout and its rollback. Prometheus
scrapes it every second with deploy/prometheus/rules.yml loaded, and afterwards every
PromQL expression of deploy/grafana/promptd.json must return data over the run, and every
alerting rule must evaluate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from promptd.daemon.broker import free_port
from tests.integration.test_deploy import (
    PROMETHEUS_DIR,
    _alerts,
    _dashboard_exprs,
    _grafana_to_promql,
    _rules,
    _tool,
)

pytestmark = pytest.mark.integration


def _query(port: int, path: str, **params: Any) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    return body


def test_dashboard_and_rules_against_a_live_demo(tmp_path: Path) -> None:
    """Every dashboard panel query returns data from a scraped demo run; every alert evaluates."""
    prometheus = _tool("prometheus")
    demo_port, prom_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {PROMETHEUS_DIR / 'rules.yml'}\n"
        "scrape_configs:\n  - job_name: promptd\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{demo_port}']\n"
    )
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTD_")}
    try:
        start = time.time()
        demo = subprocess.run(
            [
                sys.executable,
                "-m",
                "promptd.daemon.cli",
                "demo",
                "--scenario",
                "regress",
                "--time-scale",
                "0.3",
                "--http-port",
                str(demo_port),
                "--max-seconds",
                "150",
                "--data-dir",
                str(tmp_path / "data"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        end = time.time()
        assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
        time.sleep(2)  # the last scrape and rule evaluation
        empty = []
        for title, expr in _dashboard_exprs():
            promql = _grafana_to_promql(expr).replace("[1m]", "[15s]")
            body = _query(
                prom_port, "/api/v1/query_range", query=promql, start=start, end=end, step=1
            )
            assert body["status"] == "success", (title, promql, body)
            if not body["data"]["result"]:
                empty.append(f"{title}: {promql}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        for rule in _alerts():
            body = _query(prom_port, "/api/v1/query", query=rule["expr"], time=end)
            assert body["status"] == "success", (rule["alert"], body)
        rules = _query(prom_port, "/api/v1/rules")
        health = {r["name"]: r["health"] for g in rules["data"]["groups"] for r in g["rules"]}
        assert len(health) == len(_rules())
        assert set(health.values()) == {"ok"}, health
    finally:
        prom.terminate()
        prom.wait(timeout=10)
