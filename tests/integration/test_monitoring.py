"""Monitoring end to end: real broker, SQLite, Alertmanager and Prometheus processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from promptd.events import new_event_id
from tests.conftest import live_tool, wait_for
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.integration

PROMPT = "summarization"

# Short windows and intervals so that the whole lifecycle takes seconds.
FAST_TIERS = [
    {"bucket_seconds": 1, "retention_seconds": 6},
    {"bucket_seconds": 6, "retention_seconds": 120},
]
RULES: list[dict[str, Any]] = [
    {
        "name": "latency_high",
        "metric": "latency_p95",
        "comparison": "greater_than",
        "threshold": 1000,
        "window": "5s",
        "min_samples": 5,
        "for": 0,
        "group_by": "variant",
        "severity": "page",
    },
    {
        "name": "success_low",
        "metric": "success_rate",
        "comparison": "less_than",
        "threshold": 0.8,
        "window": "5s",
        "min_samples": 5,
        "for": 0,
        "group_by": "variant",
    },
    {
        "name": "feedback_drop",
        "kind": "relative",
        "metric": "feedback_mean",
        "drop": 0.15,
        "window": "5s",
        "baseline_window": "2m",
        "min_samples": 5,
        "for": 0,
    },
]


def _monitoring(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "tiers": FAST_TIERS,
        "lateness_s": 2,
        "evaluation_interval_s": 0.2,
        "rules": RULES,
        "default_degradation_rule": False,
        "export_windows_s": [5],
    }
    cfg.update(over)
    return cfg


def _traffic(n: int, *, healthy: bool, age: float = 0.0) -> tuple[list[bytes], list[bytes]]:
    now = time.time() - age
    metrics, feedback = [], []
    for i in range(n):
        rid = new_event_id()
        metrics.append(
            json.dumps(
                {
                    "event_id": new_event_id(),
                    "type": "metric",
                    "ts": now,
                    "prompt": PROMPT,
                    "variant": "v1",
                    "model": "gpt-4o-mini",
                    "request_id": rid,
                    "latency_ms": 200.0 + i if healthy else 3000.0 + i,
                    "success": healthy or i % 4 == 0,
                    "cost_usd": 0.001,
                }
            ).encode()
        )
        feedback.append(
            json.dumps(
                {
                    "event_id": new_event_id(),
                    "type": "feedback",
                    "ts": now,
                    "prompt": PROMPT,
                    "variant": "v1",
                    "request_id": rid,
                    "score": 0.9 if healthy else 0.2,
                    "kind": "thumbs",
                }
            ).encode()
        )
    return metrics, feedback


async def _send(settings: Any, n: int, *, healthy: bool, age: float = 0.0) -> None:
    metrics, feedback = _traffic(n, healthy=healthy, age=age)
    bootstrap = settings.kafka.bootstrap_servers
    await produce(bootstrap, settings.kafka.metrics_topic, metrics)
    await produce(bootstrap, settings.kafka.feedback_topic, feedback)


async def _get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _process(args: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()


async def _wait_http(url: str, limit_s: float = 15.0) -> None:
    async with aiohttp.ClientSession() as session:

        async def up() -> bool:
            try:
                async with session.get(url) as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(up, limit_s, interval=0.1)


@pytest.fixture
async def alertmanager(tmp_path: Path) -> AsyncIterator[str]:
    """A real Alertmanager on a free loopback port; yields its base URL."""
    port = _free_port()
    config = tmp_path / "alertmanager.yml"
    config.write_text(
        "route:\n  receiver: blackhole\n  group_wait: 1s\nreceivers:\n  - name: blackhole\n"
    )
    args = [
        live_tool("prometheus-alertmanager"),
        f"--config.file={config}",
        f"--storage.path={tmp_path / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]
    with _process(args):
        url = f"http://127.0.0.1:{port}"
        await _wait_http(url + "/-/ready")
        yield url


def _firing(active: list[dict[str, Any]]) -> set[str]:
    return {a["rule"] for a in active if a["state"] == "firing"}


async def test_degradation_fires_and_resolves_on_every_sink(
    alertmanager: str, make_settings: Callable[..., Any], start_daemon: Callable[..., Any]
) -> None:
    """Degraded traffic fires alerts on Kafka, /v1/alerts and Alertmanager; recovery resolves."""
    # A lateness of 60 s lets the healthy history arrive 20 s old, in the baseline but out of
    # the 5 s window, so the test does not wait for the window to turn over.
    monitoring = _monitoring(alertmanager={"url": alertmanager}, lateness_s=60)
    settings = make_settings(monitoring=monitoring)
    running = await start_daemon(settings)
    async with aiohttp.ClientSession() as session:
        # Healthy traffic builds the feedback baseline; nothing fires.
        for _ in range(3):
            await _send(settings, 20, healthy=True, age=20)

        async def windowed() -> bool:
            url = f"{running.url}/v1/prompts/{PROMPT}/stats?window=1m"
            stats = await _get(session, url)
            return bool(stats["variants"]) and stats["variants"]["v1"]["request_count"] == 60

        await wait_for(windowed, timeout=10)
        assert not _firing((await _get(session, f"{running.url}/v1/alerts"))["active"])

        await _send(settings, 20, healthy=False)

        async def fired() -> bool:
            body = await _get(session, f"{running.url}/v1/alerts")
            return _firing(body["active"]) == {"latency_high", "success_low", "feedback_drop"}

        await wait_for(fired, timeout=15)

        async def in_alertmanager() -> set[str]:
            alerts = await _get(session, f"{alertmanager}/api/v2/alerts")
            return {a["labels"]["alertname"] for a in alerts if a["status"]["state"] == "active"}

        assert await wait_for(
            lambda: _has(in_alertmanager, {"latency_high", "success_low", "feedback_drop"}), 15
        )
        # The optimizer consumes the trigger queue, so count what the monitor put on it;
        # 60 feedback events also passed the volume threshold (50).
        registry = running.daemon.registry
        for kind in ("degradation", "feedback_volume"):
            put = registry.get_sample_value(
                "promptd_monitor_optimization_triggers_total", {"kind": kind}
            )
            assert put == 1, kind

        # Recovery: healthy traffic until the degraded events leave the 5 s window.
        deadline = time.monotonic() + 25
        while _firing((await _get(session, f"{running.url}/v1/alerts"))["active"]):
            assert time.monotonic() < deadline, "alerts did not resolve"
            await _send(settings, 10, healthy=True)
            await asyncio.sleep(0.5)
        recent = (await _get(session, f"{running.url}/v1/alerts?limit=50"))["recent"]
        assert {"firing", "resolved"} <= {r["state"] for r in recent}

    records = await read_all(settings.kafka.bootstrap_servers, settings.kafka.alerts_topic, 6)
    payloads = [json.loads(r.value) for r in records]
    by_state = {(p["rule"], p["state"]) for p in payloads}
    for rule in ("latency_high", "success_low", "feedback_drop"):
        assert (rule, "firing") in by_state
        assert (rule, "resolved") in by_state
    sample = next(p for p in payloads if p["rule"] == "latency_high")
    assert sample["labels"]["prompt"] == PROMPT
    assert sample["threshold"] == 1000
    assert {"value", "started_at", "resolved_at"} <= sample.keys()


async def _has(query: Callable[[], Any], wanted: set[str]) -> bool:
    return wanted <= await query()


async def test_firing_alert_survives_restart_without_duplicate(
    make_settings: Callable[..., Any], backend: dict[str, Any], start_daemon: Callable[..., Any]
) -> None:
    """A firing alert stays firing across a restart and is not notified a second time (on
    both storage backends)."""
    rule = {**RULES[0], "window": "60s"}
    settings = make_settings(monitoring=_monitoring(rules=[rule]), storage=backend)
    first = await start_daemon(settings)
    await _send(settings, 20, healthy=False)
    async with aiohttp.ClientSession() as session:

        async def firing() -> list[dict[str, Any]]:
            active = (await _get(session, f"{first.url}/v1/alerts"))["active"]
            return [a for a in active if a["state"] == "firing"]

        before = (await wait_for(firing, timeout=15))[0]
        await first.stop()

        restarted_at = time.time()
        second = await start_daemon(settings)
        monitor = second.daemon.components["monitor"]
        # Evaluate for a second (about five rounds) on the restored state.
        await wait_for(
            lambda: monitor.last_round is not None and monitor.last_round.now > restarted_at + 1,
            timeout=10,
        )
        active = (await _get(session, f"{second.url}/v1/alerts"))["active"]
        assert [(a["fingerprint"], a["state"], a["fired_at"]) for a in active] == [
            (before["fingerprint"], "firing", before["fired_at"])
        ]
    records = await read_all(settings.kafka.bootstrap_servers, settings.kafka.alerts_topic, 2, 3)
    assert [json.loads(r.value)["state"] for r in records] == ["firing"]


async def test_prometheus_scrapes_and_promtool_accepts_metrics(
    make_settings: Callable[..., Any], start_daemon: Callable[..., Any], tmp_path: Path
) -> None:
    """A real Prometheus scrapes /metrics (up == 1) and promtool check metrics passes."""
    promtool, prometheus = live_tool("promtool"), live_tool("prometheus")
    settings = make_settings(monitoring=_monitoring())
    running = await start_daemon(settings)
    await _send(settings, 20, healthy=True)
    async with aiohttp.ClientSession() as session:

        async def exported() -> str | None:
            async with session.get(f"{running.url}/metrics") as response:
                text = await response.text()
            return text if "promptd_window_success_ratio{" in text else None

        text = await wait_for(exported, timeout=10)
        assert 'promptd_llm_requests_total{model="gpt-4o-mini",outcome="success"' in text
        assert "promptd_llm_request_duration_seconds_bucket{" in text
        assert "promptd_feedback_score_count{" in text
        check = await asyncio.to_thread(
            subprocess.run,
            [promtool, "check", "metrics"],
            input=text.encode(),
            capture_output=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()

        port = _free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: promptd\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{running.daemon.http_port}']\n"
        )
        args = [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        with _process(args):
            base = f"http://127.0.0.1:{port}"
            await _wait_http(base + "/-/ready", limit_s=20)

            async def scraped() -> bool:
                body = await _get(session, f"{base}/api/v1/query?query=up")
                result = body["data"]["result"]
                return any(r["value"][1] == "1" for r in result)

            await wait_for(scraped, timeout=20, interval=0.25)
            body = await _get(session, f"{base}/api/v1/query?query=promptd_llm_requests_total")
            assert body["data"]["result"], "Prometheus has no promptd_llm_requests_total"
