"""Snapshots of the monitor's windows: a restart from one holds what an uninterrupted
monitor holds (counts, sums and histograms identical), and replays only the tail."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from promptd.evaluation.config import EvaluationSettings
from promptd.monitoring.config import MonitoringSettings
from promptd.monitoring.eventtime import (
    NO_WATERMARK,
    Admission,
    PartitionClock,
    stored_watermark,
)
from promptd.monitoring.export import MonitorExport
from promptd.monitoring.monitor import Monitor, rebuild_windows
from promptd.monitoring.signals import MonitorSignals
from promptd.monitoring.snapshot import NAME, decode, encode, restore
from promptd.monitoring.triggers import TriggerQueue
from promptd.monitoring.windows import SeriesKey, WindowConfig, WindowStats, WindowStore
from promptd.storage.alerts import AlertStore
from promptd.storage.database import Database
from promptd.storage.repository import BatchTime, EventRepository
from promptd.storage.rows import FeedbackView, MetricView
from promptd.storage.snapshots import SnapshotStore
from tests.conftest import wait_for

T0 = 1_800_000_000.0
WINDOWS = (60.0, 300.0, 3600.0, 86400.0)


def stream(
    seed: int, start: float, seconds: float, n: int, late_s: float = 40.0
) -> Iterator[MetricView | FeedbackView]:
    """``n`` events over ``seconds`` from ``start`` over 12 series; one in 20 arrives up to
    ``late_s`` late (past the 30 s lateness, some are too late to window)."""
    rng = random.Random(seed)
    for i in range(n):
        ts = start + seconds * i / n - (rng.random() * late_s if rng.random() < 0.05 else 0.0)
        prompt, variant = f"p{rng.randrange(3)}", f"v{rng.randrange(2)}"
        if rng.random() < 0.2:
            score = rng.random()
            yield FeedbackView(
                f"f{seed}-{i}", ts, prompt, variant, None, "r", score, "q", None, None, None
            )
            continue
        yield MetricView(
            f"m{seed}-{i}",
            ts,
            prompt,
            variant,
            rng.choice(["a", "b"]),
            "r",
            None,
            rng.lognormvariate(5, 1),
            rng.random() > 0.1,
            None,
            rng.random() if rng.random() < 0.5 else None,
            rng.randrange(100),
            rng.randrange(100),
            rng.random() / 100,
            None,
            None,
            None,
            None,
            None,
        )


def feed(store: WindowStore, events: Iterator[MetricView | FeedbackView]) -> None:
    """Window events one by one, each under the watermark of the events before it (one
    partition, 30 s lateness), expiring every 5 s of event time like the tick does."""
    next_expire = -1.0
    newest = NO_WATERMARK
    for e in events:
        store.admit(Admission.of(max(newest, e.ts), newest, 30.0, 300.0))
        newest = max(newest, e.ts)
        if isinstance(e, FeedbackView):
            store.record_feedback(e.ts, e.prompt, e.variant, e.score)
        else:
            store.record_metric(
                e.ts,
                e.prompt,
                e.variant,
                e.model,
                e.latency_ms,
                e.success,
                e.quality,
                e.tokens_in,
                e.tokens_out,
                e.cost_usd,
            )
        if e.ts >= next_expire:
            store.expire(e.ts)
            next_expire = e.ts + 5


def all_stats(store: WindowStore, now: float) -> list[WindowStats]:
    """Every statistic the store answers: each window, at every level."""
    out = []
    for window in WINDOWS:
        for key in store.series("model") + store.series("variant") + store.series("prompt"):
            out.append(
                store.stats(key.prompt, key.variant, key.model, window_seconds=window, now=now)
            )
    return out


def test_snapshot_round_trip_keeps_every_statistic_and_how_the_store_goes_on() -> None:
    """A decoded snapshot answers every query like the original, and keeps doing so as
    both take the same further events (folding, dense histograms, lateness)."""
    store = WindowStore()
    feed(store, stream(1, T0 - 30 * 3600, 30 * 3600, 40_000))
    copy = decode(store.config, encode(store))
    assert copy.bucket_count() == store.bucket_count()
    assert all_stats(copy, T0) == all_stats(store, T0)
    for target in (store, copy):
        feed(target, stream(2, T0, 7200, 5_000))
        target.expire(T0 + 7300)
    assert all_stats(copy, T0 + 7300) == all_stats(store, T0 + 7300)
    assert (copy.late_events, copy.future_events) == (store.late_events, store.future_events)
    assert copy.late_events > 0


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _monitor(db: Database, clock: _Clock, config: WindowConfig | None = None) -> Monitor:
    return Monitor(
        MonitoringSettings(),
        [],
        WindowStore(config),
        AlertStore(db),
        MonitorExport(CollectorRegistry()),
        TriggerQueue(),
        clock=clock,
        snapshots=SnapshotStore(db),
    )


class OnePartition:
    """Event time as ingestion keeps it, for batches that all come from one partition and
    are stored a millisecond apart after ``start``."""

    KEY = ("events", 0)

    def __init__(self, start: float = T0) -> None:
        self.clock = PartitionClock()
        self.at = start

    def batch_time(self, events: Sequence[Sequence[Any]]) -> BatchTime:
        """The facts stored with the next batch of ``events``."""
        self.at += 0.001
        watermark = self.clock.window_watermark([self.KEY])
        newest = {self.KEY: max(e[1] for e in events)} if events else {}
        marks = self.clock.advanced(newest, self.at)
        self.clock.apply(marks)
        return BatchTime(self.at, stored_watermark(watermark), marks)


async def _ingest(
    repo: EventRepository,
    monitor: Monitor,
    events: list[MetricView | FeedbackView],
    size: int = 500,
    partition: OnePartition | None = None,
) -> None:
    """Store ``events`` in batches of ``size`` and hand each outcome to the monitor, as
    ingestion does (metrics before feedback within a batch, one partition)."""
    partition = partition or OnePartition()
    for n, i in enumerate(range(0, len(events), size)):
        batch = events[i : i + size]
        metrics = [e for e in batch if isinstance(e, MetricView)]
        feedback = [e for e in batch if isinstance(e, FeedbackView)]
        # Every third batch repeats some events: duplicates are not new, not windowed.
        if n % 3 == 0 and metrics:
            metrics += metrics[:3]
        clock = partition.batch_time(batch)
        await monitor.on_batch(await repo.store_batch(metrics, feedback, {}, clock=clock))


@pytest.fixture
async def db(store_target: Path | str) -> Iterator[Database]:
    """A real SQLite file."""
    database = await Database.open(store_target)
    yield database
    await database.close()


async def test_restart_from_a_snapshot_equals_the_uninterrupted_monitor(db: Database) -> None:
    """Snapshot, more batches, restart: the restored windows (snapshot plus the tail
    replayed in ingestion order) are identical to the live ones, and cover the same rows;
    a full rebuild admits exactly the events the live monitor admitted (some were late)."""
    repo = EventRepository(db)
    clock = _Clock(T0)
    live = _monitor(db, clock)
    events = list(stream(3, T0 - 3 * 3600, 3 * 3600, 12_000, late_s=40))
    partition = OnePartition()
    await _ingest(repo, live, events[:9_000], size=10, partition=partition)
    assert await live.snapshot_once() > 0
    await _ingest(repo, live, events[9_000:], size=10, partition=partition)
    assert live.store.late_events > 0
    live.store.expire(T0)

    restored = await restore(live.store.config, db, T0)
    assert restored is not None
    store, covered = restored
    assert covered == live.covered
    assert all_stats(store, T0) == all_stats(live.store, T0)
    assert store.late_events == live.store.late_events

    # The full rebuild agrees on counts and means (its sums run in another order).
    rebuilt = WindowStore()
    await rebuild_windows(rebuilt, db, T0, horizon_s=86400)
    assert_same_windows(rebuilt, store, T0)


def assert_same_windows(a_store: WindowStore, b_store: WindowStore, now: float) -> None:
    """Every query answers the same counts, and means equal up to summation order."""
    a_all, b_all = all_stats(a_store, now), all_stats(b_store, now)
    assert sum(s.request_count for s in a_all) > 0
    for a, b in zip(a_all, b_all, strict=True):
        assert a.key == b.key
        assert (a.request_count, a.feedback_count, a.success_count, a.quality_count) == (
            b.request_count,
            b.feedback_count,
            b.success_count,
            b.quality_count,
        )
        for mean in ("latency_mean", "feedback_mean", "quality_mean", "cost_per_request"):
            x, y = getattr(a, mean), getattr(b, mean)
            assert x == y or x == pytest.approx(y, rel=1e-9)


async def test_a_clean_stop_leaves_nothing_to_replay(db: Database) -> None:
    """After a final snapshot the restore replays no event and matches the live windows."""
    repo = EventRepository(db)
    live = _monitor(db, _Clock(T0))
    await _ingest(repo, live, list(stream(4, T0 - 600, 600, 3_000)))
    await live.snapshot_once()
    assert await live.snapshot_once() == 0  # nothing new since: skipped
    store, covered = (await restore(live.store.config, db, T0)) or (None, None)
    assert store is not None
    assert covered == live.covered
    live.store.expire(T0)
    assert all_stats(store, T0) == all_stats(live.store, T0)


async def test_batches_arriving_during_a_snapshot_wait_and_stay_out_of_it(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the snapshot is encoded, new batches are held back and applied afterwards;
    the snapshot covers only what it holds, so the restart replays the late batch."""
    from promptd.monitoring import monitor as monitor_module

    release = threading.Event()
    real_take = monitor_module.take

    def slow_take(*args: Any) -> Any:
        assert release.wait(10)
        return real_take(*args)

    monkeypatch.setattr(monitor_module, "take", slow_take)
    repo = EventRepository(db)
    live = _monitor(db, _Clock(T0))
    events = list(stream(5, T0 - 600, 600, 2_000))
    await _ingest(repo, live, events[:1_500])
    before = live.covered
    saving = asyncio.create_task(live.snapshot_once())
    await wait_for(lambda: live._frozen, timeout=10, interval=0)
    await _ingest(repo, live, events[1_500:])
    assert live.covered == before  # held in the backlog
    release.set()
    await saving
    assert live.covered > before
    snap = await SnapshotStore(db).load(NAME)
    assert snap is not None
    assert (snap.metric_id, snap.feedback_id) == before
    store, _ = (await restore(live.store.config, db, T0)) or (None, None)
    assert store is not None
    live.store.expire(T0)
    assert all_stats(store, T0) == all_stats(live.store, T0)


async def test_unusable_snapshots_fall_back_to_the_rebuild(db: Database) -> None:
    """A snapshot of another window configuration or choice of monitor signals, older
    than the baseline, or ahead of the stored rows is ignored; a choice that leaves every
    prompt on people's feedback keeps the snapshots taken before signals existed."""
    repo = EventRepository(db)
    live = _monitor(db, _Clock(T0))
    await _ingest(repo, live, list(stream(6, T0 - 600, 600, 1_000)))
    await live.snapshot_once()
    config = live.store.config
    assert await restore(config, db, T0) is not None
    assert await restore(WindowConfig(lateness_seconds=5), db, T0) is None
    evaluators = [{"name": "judge", "type": "regex", "pattern": "x"}]
    people = {"evaluators": evaluators, "signals": [{"prompts": ["*"], "rollout": ["eval:judge"]}]}
    judged = {"evaluators": evaluators, "signals": [{"prompts": ["p*"], "monitor": ["eval:judge"]}]}
    for choice, usable in ((people, True), (judged, False)):
        signals = MonitorSignals(EvaluationSettings.model_validate(choice))
        assert (await restore(config, db, T0, signals) is not None) is usable
    assert await restore(config, db, T0 + config.baseline_seconds + 1) is None
    snap = await SnapshotStore(db).load(NAME)
    assert snap is not None
    async with db.transaction() as conn:
        await conn.execute("UPDATE snapshots SET metric_id = metric_id + 10")
    assert await restore(config, db, T0) is None


def test_series_key_order_survives_the_round_trip() -> None:
    """Series come back with the same keys, feedback-only leaves included."""
    store = WindowStore()
    store.record_feedback(T0, "p", "v", 0.5)
    store.record_metric(T0, "p", "v", "m", 10.0, True)
    copy = decode(store.config, encode(store))
    assert copy.series("model") == [SeriesKey("p", "v", "m")]
    assert copy.series("variant") == store.series("variant")
