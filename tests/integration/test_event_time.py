"""Event time through the real daemon and broker: the windows after outages, partitions that
lag behind, clocks that run ahead, and a full rebuild from storage that equals them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from promptd.daemon.broker import EmbeddedBroker
from promptd.events import new_event_id
from promptd.monitoring.config import MonitoringSettings
from promptd.monitoring.monitor import Monitor, rebuild_windows
from promptd.monitoring.windows import WindowStore
from promptd.storage.database import Database
from tests.conftest import wait_for
from tests.integration.test_process import PROMPTD, _get, _wait_ready, _wait_runtime, broker_env

pytestmark = pytest.mark.integration

PROMPTS = ("alpha", "beta")
# Short lateness so that a few seconds of downtime are "longer than lateness_s".
LATENESS_S = 1.0


def metric(ts: float, prompt: str = "alpha", variant: str = "v1") -> dict[str, Any]:
    """A metric event stamped ``ts``."""
    return {
        "event_id": new_event_id(),
        "type": "metric",
        "ts": ts,
        "prompt": prompt,
        "variant": variant,
        "model": "m",
        "request_id": new_event_id(),
        "latency_ms": 40.0,
        "success": True,
        "quality": 0.5,
    }


def feedback(ts: float, prompt: str = "alpha", variant: str = "v1") -> dict[str, Any]:
    """A feedback event stamped ``ts``."""
    return {
        "event_id": new_event_id(),
        "type": "feedback",
        "ts": ts,
        "prompt": prompt,
        "variant": variant,
        "request_id": new_event_id(),
        "score": 0.75,
    }


async def send(
    bootstrap: str, topic: str, partition: int, events: Sequence[dict[str, Any]]
) -> None:
    """Publish ``events`` in order to one partition of ``topic`` (acks=all)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, json.dumps(e).encode(), partition=partition) for e in events
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def monitor_of(running: Any) -> Monitor:
    """The running daemon's monitor."""
    monitor: Monitor = running.daemon.components["monitor"]
    return monitor


def stored(running: Any) -> tuple[int, int] | None:
    """Rows in (metric_events, feedback_events) of the daemon's file, once every stored
    batch has also reached the monitor (``None`` while a write or its listeners are in
    flight: the windows are compared right after)."""
    with sqlite3.connect(running.daemon.settings.storage.database_path) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM metric_events), (SELECT count(*) FROM feedback_events)"
        ).fetchone()
    if running.daemon.ingestor is not None and running.daemon.ingestor.writing:
        return None
    return int(row[0]), int(row[1])


_FIELDS = ("request_count", "success_count", "feedback_count", "quality_count")
_MEANS = ("latency_mean", "feedback_mean", "quality_mean")


def windows(store: WindowStore, now: float) -> dict[tuple[str, str, float], tuple[Any, ...]]:
    """Counts and means of every variant of every prompt in every window length at ``now``."""
    out: dict[tuple[str, str, float], tuple[Any, ...]] = {}
    for key in store.series("variant"):
        for seconds in store.config.windows:
            stats = store.stats(key.prompt, key.variant, window_seconds=seconds, now=now)
            counts = tuple(getattr(stats, f) for f in _FIELDS)
            means = tuple(
                None if getattr(stats, f) is None else round(getattr(stats, f), 9) for f in _MEANS
            )
            out[(key.prompt, key.variant or "", seconds)] = counts + means
    return out


async def full_rebuild(running: Any, now: float) -> WindowStore:
    """The windows a start without a snapshot rebuilds from the daemon's storage."""
    monitor = monitor_of(running)
    store = WindowStore(monitor.store.config)
    await rebuild_windows(store, running.daemon.db, now, monitor.settings.rebuild_horizon_s)
    return store


def live_windows(running: Any, now: float) -> dict[tuple[str, str, float], tuple[Any, ...]]:
    """The live windows at ``now`` (after the maintenance a monitor round does)."""
    store = monitor_of(running).store
    store.expire(now)
    return windows(store, now)


def settings_for(make_settings: Any, **monitoring: Any) -> Any:
    """Daemon settings with a short lateness and no rule noise."""
    return make_settings(
        monitoring={"lateness_s": LATENESS_S, "evaluation_interval_s": 0.2, **monitoring}
    )


async def test_catch_up_after_an_outage_longer_than_lateness_fills_the_windows(
    make_settings, start_daemon
) -> None:
    """Events published while the daemon was down for longer than ``lateness_s`` are all
    windowed when it comes back (whatever order it reads the partitions in), and the live
    windows equal a full rebuild from storage."""
    settings = settings_for(make_settings)
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers
    first = await start_daemon(settings)
    start = time.time()
    await send(bootstrap, kafka.metrics_topic, 0, [metric(start - 1 + i / 100) for i in range(100)])
    await wait_for(lambda: stored(first) == (100, 0), timeout=30)
    await first.stop()

    # The outage: events keep coming for ~2.5 lateness periods, on every partition.
    outage_start = time.time()
    sent = [0, 0]
    while time.time() - outage_start < 2.5 * LATENESS_S:
        now = time.time()
        for partition in range(3):
            prompt = PROMPTS[partition % 2]
            await send(bootstrap, kafka.metrics_topic, partition, [metric(now, prompt)] * 1)
            await send(bootstrap, kafka.feedback_topic, partition, [feedback(now, prompt)])
            sent[0] += 1
            sent[1] += 1
        await asyncio.sleep(0.05)

    second = await start_daemon(settings)
    await wait_for(lambda: stored(second) == (100 + sent[0], sent[1]), timeout=30)
    now = time.time()
    live = live_windows(second, now)
    longest = max(monitor_of(second).store.config.windows)
    windowed = sum(v[0] for k, v in live.items() if k[2] == longest)
    fed = sum(v[2] for k, v in live.items() if k[2] == longest)
    assert (windowed, fed) == (100 + sent[0], sent[1])
    assert live == windows(await full_rebuild(second, now), now)


async def test_an_event_stamped_minutes_ahead_does_not_hide_real_time_traffic(
    make_settings, start_daemon
) -> None:
    """One call stamped 240 s ahead (inside ``max_future_s``) is windowed at the moment it
    was stored, and the real-time calls after it are all windowed, live as on rebuild."""
    settings = settings_for(make_settings, lateness_s=30.0)
    kafka = settings.kafka
    running = await start_daemon(settings)
    now = time.time()
    await send(kafka.bootstrap_servers, kafka.metrics_topic, 0, [metric(now + 240)])
    await wait_for(lambda: stored(running) == (1, 0), timeout=30)
    later = [metric(time.time() + i / 1000) for i in range(100)]
    await send(kafka.bootstrap_servers, kafka.metrics_topic, 0, later)
    await wait_for(lambda: stored(running) == (101, 0), timeout=30)
    now = time.time()
    live = live_windows(running, now)
    assert live[("alpha", "v1", 300.0)][0] == 101
    assert live[("alpha", "v1", 60.0)][0] == 101
    assert live == windows(await full_rebuild(running, now), now)


async def test_a_partition_behind_the_others_is_windowed_and_a_rebuild_agrees(
    make_settings, start_daemon
) -> None:
    """Calls from a partition 45 s behind the others are windowed (they are in order in
    their own partition); calls 45 s out of order *within* one partition are late, live
    and in a full rebuild alike."""
    settings = settings_for(make_settings, lateness_s=30.0)
    kafka = settings.kafka
    bootstrap = kafka.bootstrap_servers
    running = await start_daemon(settings)
    now = time.time()
    await send(bootstrap, kafka.metrics_topic, 0, [metric(now + i / 1000) for i in range(100)])
    await wait_for(lambda: stored(running) == (100, 0), timeout=30)
    behind = [metric(now - 45 + i / 1000, "beta") for i in range(50)]
    await send(bootstrap, kafka.metrics_topic, 1, behind)
    await wait_for(lambda: stored(running) == (150, 0), timeout=30)
    out_of_order = [metric(now - 45 + i / 1000) for i in range(20)]
    await send(bootstrap, kafka.metrics_topic, 0, out_of_order)
    await wait_for(lambda: stored(running) == (170, 0), timeout=30)
    now = time.time()
    live = live_windows(running, now)
    assert live[("alpha", "v1", 300.0)][0] == 100
    assert live[("beta", "v1", 300.0)][0] == 50
    assert monitor_of(running).store.late_events == 20
    assert live == windows(await full_rebuild(running, now), now)


class LateFeedbackTraffic:
    """Calls stamped when sent, on three partitions, and their feedback published up to
    ``delay_s`` later but stamped with the call's time (in time order per partition only
    roughly: up to ``delay_s`` out of order), from a thread, until stopped."""

    def __init__(self, bootstrap: str, metrics: str, feedback: str, delay_s: float) -> None:
        self.topics = (metrics, feedback)
        self.bootstrap = bootstrap
        self.delay_s = delay_s
        self.sent = [0, 0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> LateFeedbackTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _run(self) -> None:
        rng = random.Random(7)
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        pending: list[tuple[float, dict[str, Any], int]] = []
        try:
            while not self._stop.is_set() or pending:
                now = time.time()
                if not self._stop.is_set():
                    for partition in range(3):
                        prompt, variant = PROMPTS[partition % 2], f"v{rng.randrange(2)}"
                        call = metric(now, prompt, variant)
                        await producer.send(
                            self.topics[0], json.dumps(call).encode(), partition=partition
                        )
                        self.sent[0] += 1
                        note = feedback(now, prompt, variant) | {"request_id": call["request_id"]}
                        pending.append((now + rng.uniform(0, self.delay_s), note, partition))
                due = [p for p in pending if p[0] <= now]
                pending = [p for p in pending if p[0] > now]
                for _, note, partition in sorted(due, key=lambda p: p[0]):
                    await producer.send(
                        self.topics[1], json.dumps(note).encode(), partition=partition
                    )
                    self.sent[1] += 1
                await asyncio.sleep(0.02)
            await producer.flush()
        finally:
            await producer.stop()


def _daemon_windows(url: str, prompt: str) -> list[tuple[float, dict[str, Any]]]:
    """The daemon's live windows of ``prompt`` (every tier's length): (its now, stats)."""
    out = []
    for seconds in (60, 300, 3600, 86400):
        status, body = _get(f"{url}/v1/prompts/{prompt}/stats?window={seconds}s")
        assert status == 200, body
        out.append((float(body["now"]), body))
    return out


async def _replayed(path: Path, prompt: str, now: float, seconds: float) -> dict[str, Any]:
    """A full replay from the file at ``now`` (what a start without a snapshot builds)."""
    db = await Database.open(path)
    try:
        store = WindowStore(MonitoringSettings(lateness_s=LATE_S).window_config())
        await rebuild_windows(store, db, now, 3600)
        total = store.stats(prompt, window_seconds=seconds, now=now)
        variants = {
            key.variant: store.stats(prompt, key.variant, window_seconds=seconds, now=now)
            for key in store.series("variant")
            if key.prompt == prompt
        }
    finally:
        await db.close()
    return {"total": total, "variants": variants}


LATE_S = 1.5


def test_sigkills_with_late_feedback_leave_the_windows_equal_to_a_full_replay(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    """Feedback published up to 1 s after its call (stamped with the call's time), the
    daemon SIGKILLed twice and restarted after more than ``lateness_s`` each time: every
    call and every piece of feedback is windowed, and the live windows equal a full
    replay from storage."""
    env = broker_env(
        tmp_path,
        broker.bootstrap_servers,
        "late",
        PROMPTD_KAFKA__SESSION_TIMEOUT_MS="1000",
        PROMPTD_KAFKA__HEARTBEAT_INTERVAL_MS="300",
        PROMPTD_MONITORING__LATENESS_S=str(LATE_S),
        PROMPTD_MONITORING__SNAPSHOT_INTERVAL_S="0.5",
    )
    runtime = tmp_path / "data" / "runtime.json"
    db = tmp_path / "data" / "promptd.db"
    run = [*PROMPTD, "run"]
    topics = env["PROMPTD_KAFKA__METRICS_TOPIC"], env["PROMPTD_KAFKA__FEEDBACK_TOPIC"]
    traffic = LateFeedbackTraffic(broker.bootstrap_servers, *topics, 1.0)
    proc = subprocess.Popen(run, env=env, stderr=subprocess.DEVNULL, text=True)
    try:
        _wait_ready(_wait_runtime(tmp_path, proc)["http_port"])
        with traffic:
            for _ in range(2):
                time.sleep(1.0)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                time.sleep(LATE_S + 1)  # the backlog grows older than lateness_s
                runtime.unlink(missing_ok=True)
                proc = subprocess.Popen(run, env=env, stderr=subprocess.DEVNULL, text=True)
                _wait_ready(_wait_runtime(tmp_path, proc)["http_port"])
            time.sleep(1.0)
        sent = tuple(traffic.sent)
        deadline = time.monotonic() + 30
        while _stored_counts(db) != sent and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _stored_counts(db) == sent
        url = f"http://127.0.0.1:{json.loads(runtime.read_text())['http_port']}"
        # The monitor windows a batch right after storing it.
        time.sleep(0.5)
        for prompt in PROMPTS:
            for now, live in _daemon_windows(url, prompt):
                seconds = live["window_seconds"]
                replay = asyncio.run(_replayed(db, prompt, now, seconds))
                counts = ("request_count", "feedback_count", "success_count")
                assert tuple(live["total"][c] for c in counts) == tuple(
                    getattr(replay["total"], c) for c in counts
                ), (prompt, seconds)
                for variant, stats in live["variants"].items():
                    assert stats["request_count"] == replay["variants"][variant].request_count
                    assert stats["feedback_count"] == replay["variants"][variant].feedback_count
            day = _daemon_windows(url, prompt)[-1][1]["total"]
            assert day["request_count"] > 0
        total_day = sum(_daemon_windows(url, p)[-1][1]["total"]["request_count"] for p in PROMPTS)
        total_fb = sum(_daemon_windows(url, p)[-1][1]["total"]["feedback_count"] for p in PROMPTS)
        assert (total_day, total_fb) == sent
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def _stored_counts(path: Path) -> tuple[int, int]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM metric_events), (SELECT count(*) FROM feedback_events)"
        ).fetchone()
    return int(row[0]), int(row[1])
