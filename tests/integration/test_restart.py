"""Restarts from a snapshot of the monitor's windows, through the real broker and file."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest
import structlog

from promptd.events import new_event_id
from promptd.monitoring.monitor import Monitor
from promptd.monitoring.snapshot import NAME
from promptd.storage.snapshots import SnapshotStore
from tests.conftest import wait_for
from tests.kafka_helpers import produce

pytestmark = pytest.mark.integration


def _metric(i: int, now: float) -> bytes:
    body = {
        "event_id": new_event_id(),
        "type": "metric",
        "ts": now - 10 + i * 0.001,
        "prompt": "summarization",
        "variant": f"v{i % 2}",
        "model": "m",
        "request_id": f"req-{i}",
        "latency_ms": 50.0 + i % 400,
        "success": i % 7 != 0,
        "quality": (i % 10) / 10,
    }
    return json.dumps(body).encode()


def _feedback(i: int, now: float) -> bytes:
    body = {
        "event_id": new_event_id(),
        "type": "feedback",
        "ts": now - 9 + i * 0.001,
        "prompt": "summarization",
        "variant": f"v{i % 2}",
        "request_id": f"req-{i}",
        "score": (i % 5) / 4,
    }
    return json.dumps(body).encode()


def _monitor(running: Any) -> Monitor:
    monitor: Monitor = running.daemon.components["monitor"]
    return monitor


def _hour(monitor: Monitor) -> dict[str, Any]:
    """The prompt's 1 h statistics without what depends on the clock (rates)."""
    stats = monitor.prompt_stats("summarization", 3600)
    keep = ("request_count", "success_count", "latency_mean", "latency_p95", "feedback_count")
    keep += ("feedback_mean", "quality_mean")
    return {
        name: {k: v for k, v in part.items() if k in keep}
        for name, part in (("total", stats["total"]), *stats["variants"].items())
    }


async def _windowed(running: Any, metrics: int, feedback: int) -> bool:
    total = _monitor(running).prompt_stats("summarization", 3600)["total"]
    return bool(total["request_count"] == metrics and total["feedback_count"] == feedback)


@pytest.fixture(autouse=True)
def _info_logs() -> None:
    """``windows_restored`` is an info event: let it through to capture_logs."""
    from promptd.daemon.logs import configure_logging

    configure_logging("info", "json")


def _restored(logs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [e for e in logs if e["event"] == "windows_restored"]
    assert len(found) == 1, [e["event"] for e in logs]
    return found[0]


async def test_clean_restart_loads_the_snapshot_and_replays_nothing(
    make_settings, start_daemon
) -> None:
    """A stopped daemon leaves a snapshot; the next start restores the same windows from it
    without replaying a single event."""
    settings = make_settings()
    kafka = settings.kafka
    first = await start_daemon(settings)
    # Recent events: the windows take events up to 30 s behind the clock (lateness).
    now = time.time()
    await produce(
        kafka.bootstrap_servers, kafka.metrics_topic, [_metric(i, now) for i in range(2000)]
    )
    await produce(
        kafka.bootstrap_servers, kafka.feedback_topic, [_feedback(i, now) for i in range(300)]
    )
    await wait_for(lambda: _windowed(first, 2000, 300), timeout=30)
    before = _hour(_monitor(first))
    await first.stop()

    with structlog.testing.capture_logs() as logs:
        second = await start_daemon(settings)
    restored = _restored(logs)
    assert restored["tail_events"] == 0
    assert _hour(_monitor(second)) == before
    await second.stop()


async def test_crash_replays_only_the_events_stored_after_the_last_snapshot(
    make_settings, backend, start_daemon
) -> None:
    """After a hard stop the start loads the last periodic snapshot and replays exactly the
    events stored after it; the windows then hold every event once (both backends)."""
    settings = make_settings(monitoring={"snapshot_interval_s": 0.2}, storage=backend)
    kafka = settings.kafka
    first = await start_daemon(settings)
    now = time.time()
    await produce(
        kafka.bootstrap_servers, kafka.metrics_topic, [_metric(i, now) for i in range(1000)]
    )
    await wait_for(lambda: _windowed(first, 1000, 0), timeout=30)
    store = SnapshotStore(first.daemon.db)
    monitor = _monitor(first)

    async def snapshot_covers_all() -> bool:
        snap = await store.load(NAME)
        return snap is not None and (snap.metric_id, snap.feedback_id) == monitor.covered

    await wait_for(snapshot_covers_all, timeout=10)
    monitor.snapshots = None  # no more snapshots: what follows is the tail
    tail = [_metric(1000 + i, now) for i in range(500)] + [_feedback(i, now) for i in range(200)]
    await produce(kafka.bootstrap_servers, kafka.metrics_topic, tail[:500])
    await produce(kafka.bootstrap_servers, kafka.feedback_topic, tail[500:])
    await wait_for(lambda: _windowed(first, 1500, 200), timeout=30)
    before = _hour(monitor)
    await first.kill()

    with structlog.testing.capture_logs() as logs:
        second = await start_daemon(settings)
    assert _restored(logs)["tail_events"] == 700
    assert _hour(_monitor(second)) == before
    await second.stop()


async def live_rollout(
    http: aiohttp.ClientSession, url: str, settings: Any, users: int, seed: int
) -> str:
    """A conservative rollout of ``summarize`` v2 with one call and one thumbs feedback
    from each of ``users`` users (equal arms); returns its id."""
    from tests.integration.test_rollouts import _call, _routing, _setup_prompt, _traffic

    await _setup_prompt(http, url)
    body = {"prompt": "summarize", "candidate_version": "v2", "profile": "conservative"}
    status, started = await _call(http, "POST", f"{url}/v1/rollouts", body)
    assert status == 201
    await _traffic(settings, await _routing(http, url), range(users), 0.7, 0.7, seed=seed)
    return str(started["id"])


async def test_live_rollout_resumes_from_its_snapshot_after_a_clean_stop(
    make_settings, start_daemon
) -> None:
    """A stopped daemon leaves a snapshot of each live rollout: the next start resumes it
    without replaying its events, and its arms and feedback joins are as they were."""
    from tests.integration.test_rollouts import TOKEN, _call

    settings = make_settings(http={"admin_token": TOKEN}, rollout={"tick_interval_s": 0.1})
    first = await start_daemon(settings)
    async with aiohttp.ClientSession() as http:
        rid = await live_rollout(http, first.url, settings, 600, seed=1)

        async def fed() -> Any:
            _, view = await _call(http, "GET", f"{first.url}/v1/rollouts/{rid}", auth=False)
            arms = view["arms"]
            done = arms["baseline"]["requests"] + arms["candidate"]["requests"] == 600
            return view if done and view["feedback"]["joined"] == 600 else None

        before = await wait_for(fed, timeout=30)
    await first.stop()

    with structlog.testing.capture_logs() as logs:
        second = await start_daemon(settings)
    resumed = [e for e in logs if e["event"] == "rollout_resumed"]
    assert [(e["rollout_id"], e["replayed_calls"]) for e in resumed] == [(rid, 0)]
    async with aiohttp.ClientSession() as http:
        _, after = await _call(http, "GET", f"{second.url}/v1/rollouts/{rid}", auth=False)
    assert after["arms"] == before["arms"]
    assert after["feedback"] == before["feedback"]
    await second.stop()


def _call(i: int, now: float) -> bytes:
    """A call with its captured answer: complete (ends with a full stop) on 2 calls in 3."""
    body = json.loads(_metric(i, now))
    body["output"] = f"answer {i}" + ("." if i % 3 else "")
    return json.dumps(body).encode()


async def test_windows_of_an_evaluator_signal_survive_a_crash_and_a_rebuild(
    make_settings, start_daemon
) -> None:
    """A prompt whose monitor counts people's feedback and a code check's results: after
    a hard stop, the windows restored from the last snapshot plus its tail, and the
    windows rebuilt from storage without a snapshot, equal the live ones."""
    check = {"name": "complete", "type": "regex", "pattern": r"\.$", "sample_rate": 1.0}
    # Another prompt's monitor reads a second check: the replays read its results too
    # (one SQL condition for every prompt) and must leave them out of this prompt's windows.
    short = {"name": "short", "type": "length", "max_chars": 5, "sample_rate": 1.0}
    evaluation = {
        "evaluators": [check, short],
        "signals": [
            {"prompts": ["summarization"], "monitor": ["human", "eval:complete"]},
            {"prompts": ["other"], "monitor": ["eval:short"]},
        ],
        "outbox_interval_s": 0.1,
    }
    settings = make_settings(monitoring={"snapshot_interval_s": 0.2}, evaluation=evaluation)
    kafka = settings.kafka
    first = await start_daemon(settings)
    monitor = _monitor(first)
    now = time.time()
    await produce(kafka.bootstrap_servers, kafka.metrics_topic, [_call(i, now) for i in range(300)])
    await wait_for(lambda: _windowed(first, 300, 300), timeout=30)
    store = SnapshotStore(first.daemon.db)

    async def snapshot_covers_all() -> bool:
        snap = await store.load(NAME)
        return snap is not None and (snap.metric_id, snap.feedback_id) == monitor.covered

    await wait_for(snapshot_covers_all, timeout=10)
    monitor.snapshots = None  # no more snapshots: what follows is the tail
    tail = [_call(300 + i, now) for i in range(200)]
    await produce(kafka.bootstrap_servers, kafka.metrics_topic, tail)
    await produce(
        kafka.bootstrap_servers, kafka.feedback_topic, [_feedback(i, now) for i in range(100)]
    )
    # Every call scored by the check (its results are feedback too) and people's 100.
    await wait_for(lambda: _windowed(first, 500, 600), timeout=30)
    await wait_for(lambda: _stored_results(first, 1000), timeout=30)
    before = _hour(monitor)
    # People's 100 scores (mean 0.5) and the check's 500 (333 complete answers).
    assert before["total"]["feedback_mean"] == pytest.approx((50 + 333) / 600)
    await first.kill()

    with structlog.testing.capture_logs() as logs:
        second = await start_daemon(settings)
    assert _restored(logs)["tail_events"] == 500  # the short check's 200 left out
    assert _hour(_monitor(second)) == before
    await second.stop()
    no_snapshot = settings.monitoring.model_copy(update={"snapshot_interval_s": 0})
    rebuilt = await start_daemon(settings.model_copy(update={"monitoring": no_snapshot}))
    assert _hour(_monitor(rebuilt)) == before
    await rebuilt.stop()


async def _stored_results(running: Any, n: int) -> bool:
    async with running.daemon.db.reader.execute(
        "SELECT count(*) FROM feedback_events WHERE source IS NOT NULL"
    ) as cur:
        row = await cur.fetchone()
    return bool(row[0] >= n)
