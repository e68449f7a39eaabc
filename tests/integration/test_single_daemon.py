"""One daemon per store and per consumer group; the embedded broker dies with its daemon."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from promptd.daemon.app import Daemon, DaemonRefusedError
from promptd.daemon.broker import EmbeddedBroker
from promptd.daemon.settings import Settings
from tests.conftest import wait_for
from tests.integration.test_broker_resets import _has, metric_values
from tests.integration.test_process import PROMPTD, _env, _get, _wait_ready, _wait_runtime
from tests.kafka_helpers import produce

pytestmark = pytest.mark.integration


def _status(port: int) -> dict[str, object]:
    return dict(_get(f"http://127.0.0.1:{port}/v1/status")[1])


def _wait_stored(port: int, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    stored = None
    while time.monotonic() < deadline:
        stored = _status(port)["events"]["stored"]  # type: ignore[index]
        assert stored <= n, f"stored {stored} > {n}"
        if stored == n:
            return
        time.sleep(0.1)
    raise AssertionError(f"stored {stored} of {n} events")


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    return stderr or ""


def test_second_daemon_on_a_data_dir_exits_naming_the_holder(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    """A second `promptd run` on a data dir in use exits 1 with one line naming the first
    daemon's pid, host and start time, and leaves the first daemon's runtime.json alone."""
    tag = str(time.monotonic_ns())[-8:]
    env = _env(
        tmp_path,
        PROMPTD_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
        PROMPTD_KAFKA__METRICS_TOPIC=f"lm-{tag}",
        PROMPTD_KAFKA__FEEDBACK_TOPIC=f"lf-{tag}",
        PROMPTD_KAFKA__GROUP_ID=f"lg-{tag}",
    )
    first = subprocess.Popen(
        [*PROMPTD, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        runtime = _wait_runtime(tmp_path, first)
        second = subprocess.run(
            [*PROMPTD, "run"], env=env, capture_output=True, text=True, timeout=30
        )
        assert second.returncode == 1
        assert "Traceback" not in second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"pid {first.pid} on host {socket.gethostname()} since " in lines[0]
        assert "in use" in lines[0]
        runtime_file = tmp_path / "data" / "runtime.json"
        assert json.loads(runtime_file.read_text()) == runtime
        assert _get(f"http://127.0.0.1:{runtime['http_port']}/readyz")[0] in (200, 503)
    finally:
        _stop(first)
    assert first.returncode == 0
    assert not (tmp_path / "data" / "runtime.json").exists()


async def test_a_daemon_that_finds_another_member_in_its_group_refuses_to_run(
    make_settings, start_daemon, tmp_path: Path
) -> None:
    """A second daemon in the same consumer group (another data dir) refuses to run and says
    why; the first keeps every partition, and stores every event published meanwhile."""
    settings = make_settings()
    first = await start_daemon(settings)
    bootstrap, topic = settings.kafka.bootstrap_servers, settings.kafka.metrics_topic
    await produce(bootstrap, topic, metric_values(30, "a"))
    other = Settings(
        kafka=settings.kafka.model_dump(),
        storage={"data_dir": tmp_path / "other"},
        http={"port": 0},
    )
    second = Daemon(other)
    with pytest.raises(DaemonRefusedError) as refused:
        await asyncio.wait_for(second.run(asyncio.Event()), 30)
    message = str(refused.value)
    assert f"consumer group {settings.kafka.group_id!r} is shared" in message
    assert "One daemon per consumer group" in message
    with sqlite3.connect(other.storage.database_path) as conn:  # it consumed nothing
        assert conn.execute("SELECT count(*) FROM metric_events").fetchone()[0] == 0
    await produce(bootstrap, topic, metric_values(30, "b"))
    await wait_for(lambda: _has(first, 60), timeout=30)
    # The second daemon's join and leave are two rebalances the first may still be in.
    every = len(settings.kafka.event_topics) * settings.kafka.topic_partitions
    state = first.daemon.ingestor.state
    await wait_for(lambda: first.daemon.readiness()[0] and len(state.assigned) == every, timeout=20)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (Linux)")
def test_sigkilled_daemon_takes_its_embedded_broker_along_and_restarts_clean(
    tmp_path: Path,
) -> None:
    """SIGKILL of `promptd run` also kills its embedded broker; the next start on the same
    data dir replaces the stale runtime.json and stores every event published to it."""
    env = _env(tmp_path)
    first = subprocess.Popen([*PROMPTD, "run"], env=env, stderr=subprocess.DEVNULL, text=True)
    try:
        runtime = _wait_runtime(tmp_path, first)
        _wait_ready(runtime["http_port"])
        brokers = _children(first.pid)
        assert len(brokers) == 1, brokers
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(brokers[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(brokers[0]), "the embedded broker outlived its daemon"
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        for pid in _children(first.pid):
            os.kill(pid, signal.SIGKILL)
    runtime_file = tmp_path / "data" / "runtime.json"
    assert json.loads(runtime_file.read_text())["pid"] == first.pid  # stale, left by SIGKILL

    second = subprocess.Popen(
        [*PROMPTD, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            record = json.loads(runtime_file.read_text()) if runtime_file.exists() else {}
            if record.get("pid") == second.pid:
                break
            assert second.poll() is None, second.stderr.read() if second.stderr else ""
            time.sleep(0.05)
        assert record.get("pid") == second.pid
        _wait_ready(record["http_port"])
    finally:
        _stop(second)
    assert second.returncode == 0
    assert not runtime_file.exists()


def test_embedded_broker_across_a_daemon_restart_stores_every_new_event(tmp_path: Path) -> None:
    """`promptd run` with the embedded broker, restarted on the same data dir: every event
    published after the restart is stored, although the new broker's log starts at 0."""
    env = _env(tmp_path)
    for round_, count in enumerate((40, 12)):
        proc = subprocess.Popen(
            [*PROMPTD, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            runtime = _wait_runtime(tmp_path, proc)
            _wait_ready(runtime["http_port"])
            asyncio.run(
                produce(runtime["bootstrap_servers"], "promptd.metrics", metric_values(count, "r"))
            )
            _wait_stored(runtime["http_port"], 40 + (12 if round_ else 0))
        finally:
            stderr = _stop(proc)
        assert proc.returncode == 0, stderr
