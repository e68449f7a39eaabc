"""The real ``promptd`` process: graceful SIGTERM, embedded broker, CLI publishing, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from promptd.daemon.broker import EmbeddedBroker, free_port

pytestmark = pytest.mark.integration

PROMPTD = [sys.executable, "-m", "promptd.daemon.cli"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTD_")}
    # Port 0 for the HTTP API and the embedded broker: tests run side by side.
    env.update(
        {
            "PROMPTD_DATA_DIR": str(tmp_path / "data"),
            "PROMPTD_HTTP_PORT": "0",
            "PROMPTD_KAFKA__EMBEDDED_PORT": "0",
        }
    )
    env.update(extra)
    return env


def broker_env(tmp_path: Path, bootstrap: str, prefix: str, **extra: str) -> dict[str, str]:
    """:func:`_env` on a running broker, with topics and group of their own."""
    tag = f"{prefix}{str(time.monotonic_ns())[-8:]}"
    return _env(
        tmp_path,
        PROMPTD_KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        PROMPTD_KAFKA__METRICS_TOPIC=f"m-{tag}",
        PROMPTD_KAFKA__FEEDBACK_TOPIC=f"f-{tag}",
        PROMPTD_KAFKA__GROUP_ID=f"g-{tag}",
        **extra,
    )


def _wait_runtime(
    tmp_path: Path, proc: subprocess.Popen[str], timeout: float = 20
) -> dict[str, Any]:
    path = tmp_path / "data" / "runtime.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"promptd exited early: {proc.stderr.read() if proc.stderr else ''}"
            )
        if path.exists():
            return dict(json.loads(path.read_text()))
        time.sleep(0.05)
    raise AssertionError("promptd did not write its runtime file")


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _wait_ready(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("daemon never became ready")


def test_embedded_broker_cli_publish_and_graceful_sigterm(tmp_path: Path) -> None:
    """`promptd run` without Kafka starts the embedded broker, stores CLI-published events,
    says so in its log, and exits 0 within 10 s of SIGTERM."""
    env = _env(tmp_path)
    proc = subprocess.Popen(
        [*PROMPTD, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        runtime = _wait_runtime(tmp_path, proc)
        _wait_ready(runtime["http_port"])
        published = subprocess.run(
            [*PROMPTD, "metrics", "v1", "gpt-4o", "812", "--prompt", "summarization"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        request_id = json.loads(published.stdout)["request_id"]
        subprocess.run(
            [
                *PROMPTD,
                "feedback",
                "v1",
                "gpt-4o",
                "0.5",
                "thumbs",
                "--prompt",
                "summarization",
                "--request-id",
                request_id,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = _get(f"http://127.0.0.1:{runtime['http_port']}/v1/status")[1]
            if status["events"]["stored"] == 2:
                break
            time.sleep(0.1)
        assert status["events"]["stored"] == 2
        shown = subprocess.run(
            [*PROMPTD, "status"], env=env, capture_output=True, text=True, timeout=30, check=True
        )
        assert "events stored" in shown.stdout
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert "embedded_broker_started" in events
    assert "memory-only" in stderr
    assert events[-1] == "daemon_stopped"
    assert not (tmp_path / "data" / "runtime.json").exists()


def test_sigkill_mid_ingestion_then_restart_stores_everything_once(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    """A `promptd run` killed with SIGKILL mid-ingestion resumes from SQLite: each event once."""
    import asyncio

    from promptd.events import new_event_id
    from tests.kafka_helpers import produce

    tag = new_event_id()[-8:]
    env = _env(
        tmp_path,
        PROMPTD_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
        PROMPTD_KAFKA__METRICS_TOPIC=f"km-{tag}",
        PROMPTD_KAFKA__FEEDBACK_TOPIC=f"kf-{tag}",
        PROMPTD_KAFKA__GROUP_ID=f"kg-{tag}",
        PROMPTD_KAFKA__MAX_BATCH_RECORDS="100",
        PROMPTD_KAFKA__SESSION_TIMEOUT_MS="1000",
        PROMPTD_KAFKA__HEARTBEAT_INTERVAL_MS="300",
    )
    now = time.time()
    values = [
        json.dumps(
            {
                "event_id": new_event_id(),
                "type": "metric",
                "ts": now - 100 + i * 0.01,
                "prompt": "p",
                "variant": "v1",
                "model": "m",
                "request_id": f"r{i}",
                "latency_ms": 5,
                "success": True,
            }
        ).encode()
        for i in range(8000)
    ]
    asyncio.run(produce(broker.bootstrap_servers, f"km-{tag}", values))
    db = tmp_path / "data" / "promptd.db"

    def stored() -> int:
        import sqlite3

        if not db.exists():
            return 0
        with sqlite3.connect(db) as conn:
            try:
                return int(conn.execute("SELECT count(*) FROM metric_events").fetchone()[0])
            except sqlite3.OperationalError:
                return 0

    first = subprocess.Popen([*PROMPTD, "run"], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while stored() < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert stored() >= 300

    second = subprocess.Popen([*PROMPTD, "run"], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 40
        while stored() < 8000 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stored() == 8000
        time.sleep(0.5)
        assert stored() == 8000
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=15)
    assert second.returncode == 0


def test_unreachable_broker_is_not_ready_and_does_not_crash(tmp_path: Path) -> None:
    """With Kafka unreachable the daemon stays up, /healthz 200, /readyz 503, and exits cleanly."""
    dead = f"127.0.0.1:{free_port()}"
    env = _env(
        tmp_path,
        PROMPTD_KAFKA_BOOTSTRAP_SERVERS=dead,
        PROMPTD_KAFKA__REQUEST_TIMEOUT_MS="1000",
        PROMPTD_KAFKA__RETRY_BACKOFF_MAX_S="0.5",
    )
    proc = subprocess.Popen(
        [*PROMPTD, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        runtime = _wait_runtime(tmp_path, proc)
        time.sleep(2.5)
        assert proc.poll() is None
        port = runtime["http_port"]
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        code, body = _get(f"http://127.0.0.1:{port}/readyz")
        assert code == 503
        assert body["status"] == "not_ready"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert "kafka_unavailable" in stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["feedback", "v1", "m", "1.5", "--prompt", "p"], "score"),
        (["metrics", "v1", "m", "-3", "--prompt", "p"], "latency_ms"),
        (["status"], "daemon not reachable"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    """Bad input or an absent daemon gives one clear line and a non-zero exit, no traceback."""
    env = _env(
        tmp_path,
        PROMPTD_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
        PROMPTD_HTTP_PORT=str(free_port()),
    )
    result = subprocess.run([*PROMPTD, *argv], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_invalid_setting_fails_at_start_naming_it(tmp_path: Path) -> None:
    """An invalid environment setting stops `promptd run` at once with the setting's name."""
    env = _env(tmp_path, PROMPTD_KAFKA__TOPIC_PARTITIONS="-1")
    result = subprocess.run([*PROMPTD, "run"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "PROMPTD_KAFKA__TOPIC_PARTITIONS" in result.stderr
