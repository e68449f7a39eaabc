"""Event time through the real daemon and broker: the windows after outages, partitions that
lag behind, clocks that run ahead, and a full rebuild from storage that equals them."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from promptd.events import new_event_id
from promptd.monitoring.monitor import Monitor, rebuild_windows
from promptd.monitoring.windows import WindowStore
from tests.conftest import wait_for

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


def stored(running: Any) -> tuple[int, int]:
    """Rows in (metric_events, feedback_events) of the daemon's file."""
    with sqlite3.connect(running.daemon.settings.storage.database_path) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM metric_events), (SELECT count(*) FROM feedback_events)"
        ).fetchone()
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
