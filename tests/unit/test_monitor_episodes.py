"""The monitor credits feedback on a whole episode to every call of the episode, live and
when its windows are rebuilt from storage."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from promptd.monitoring.config import MonitoringSettings
from promptd.monitoring.export import MonitorExport
from promptd.monitoring.monitor import Monitor, rebuild_windows
from promptd.monitoring.snapshot import restore
from promptd.monitoring.triggers import TriggerQueue
from promptd.monitoring.windows import WindowStore
from promptd.storage.alerts import AlertStore
from promptd.storage.database import Database
from promptd.storage.repository import EventRepository
from promptd.storage.rows import FeedbackRow, FeedbackView, MetricRow, MetricView
from promptd.storage.snapshots import SnapshotStore
from tests.unit.test_monitor_shell import FakePersistence, Outcome
from tests.unit.test_monitor_snapshot import OnePartition, _Clock, all_stats

T0 = 1_795_000_000.0


def call(i: int, ts: float, prompt: str, variant: str, episode: str | None) -> MetricRow:
    """A stored call row."""
    return MetricView(
        f"m{i}", ts, prompt, variant, "m", f"r{i}", None, 100.0, True, None,
        None, None, None, None, None, episode, None, None, None,
    )  # fmt: skip


def episode_feedback(i: int, ts: float, episode: str, score: float) -> FeedbackRow:
    """A stored feedback row on a whole episode."""
    return FeedbackView(f"f{i}", ts, None, None, None, None, score, "q", None, None, episode)


class FakeEpisodes:
    """An in-memory :class:`~promptd.monitoring.monitor.EpisodeCalls`."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[str, str]]] = {}
        self.asked: list[set[str]] = []

    async def episode_calls(
        self, episode_ids: Collection[str], stored_by: float
    ) -> dict[str, list[tuple[str, str]]]:
        self.asked.append(set(episode_ids))
        return {e: self.calls[e] for e in episode_ids if e in self.calls}


def _monitor(episodes: object, threshold: int = 1000) -> tuple[Monitor, TriggerQueue]:
    queue = TriggerQueue()
    monitor = Monitor(
        MonitoringSettings(feedback_volume_threshold=threshold),
        [],
        WindowStore(),
        FakePersistence([]),
        MonitorExport(CollectorRegistry()),
        queue,
        clock=lambda: T0,
        episodes=episodes,  # type: ignore[arg-type]
    )
    return monitor, queue


async def test_episode_feedback_counts_for_every_call_of_the_episode() -> None:
    """One score on an episode of an extract and an answer call counts once in each
    prompt's feedback (at its variant), and not under the feedback's own names."""
    episodes = FakeEpisodes()
    episodes.calls["ep"] = [("extract", "v1"), ("answer", "v2")]
    monitor, _ = _monitor(episodes)
    calls = (call(1, T0, "extract", "v1", "ep"), call(2, T0, "answer", "v2", "ep"))
    await monitor.on_batch(Outcome(metric_rows=calls, ingested_at=T0))
    await monitor.on_batch(
        Outcome(feedback_rows=(episode_feedback(1, T0 + 1, "ep", 0.25),), ingested_at=T0 + 1)
    )
    assert episodes.asked == [{"ep"}]
    for prompt, variant in (("extract", "v1"), ("answer", "v2")):
        stats = monitor.store.stats(prompt, variant, window_seconds=60, now=T0 + 2)
        assert (stats.feedback_count, stats.feedback_mean) == (1, 0.25)
    assert {k.prompt for k in monitor.store.series("prompt")} == {"extract", "answer"}
    fb = monitor.export.feedback
    assert set(fb) == {("extract", "v1"), ("answer", "v2")}


async def test_batches_without_episode_feedback_ask_nothing() -> None:
    """Call feedback is windowed as before, and no lookup happens for it."""
    episodes = FakeEpisodes()
    monitor, _ = _monitor(episodes)
    row = FeedbackView("f", T0, "p", "v1", None, "r", 0.5, "q", None, None, "ep")
    await monitor.on_batch(Outcome(feedback_rows=(row,), ingested_at=T0))
    assert episodes.asked == []
    assert monitor.store.stats("p", "v1", window_seconds=60, now=T0).feedback_count == 1


async def test_episode_feedback_feeds_the_volume_trigger_per_prompt() -> None:
    """Each credited call counts toward its prompt's feedback-volume trigger."""
    episodes = FakeEpisodes()
    episodes.calls["ep"] = [("extract", "v1"), ("answer", "v1")]
    monitor, queue = _monitor(episodes, threshold=3)
    rows = tuple(episode_feedback(i, T0, "ep", 1.0) for i in range(3))
    await monitor.on_batch(Outcome(feedback_rows=rows, ingested_at=T0))
    assert queue.qsize() == 2
    fired = sorted([(await queue.get()).prompt, (await queue.get()).prompt])
    assert fired == ["answer", "extract"]


async def test_credits_wait_with_their_batch_while_the_windows_are_frozen() -> None:
    """A batch arriving during an evaluation round is applied afterwards with its credits."""
    episodes = FakeEpisodes()
    episodes.calls["ep"] = [("extract", "v1")]
    monitor, _ = _monitor(episodes)
    monitor._frozen = True
    await monitor.on_batch(
        Outcome(feedback_rows=(episode_feedback(1, T0, "ep", 0.5),), ingested_at=T0)
    )
    assert monitor.store.stats("extract", window_seconds=60, now=T0).feedback_count == 0
    monitor._thaw()
    assert monitor.store.stats("extract", window_seconds=60, now=T0).feedback_count == 1


# ---- through storage ----------------------------------------------------------------------


def episode_stream(seed: int, n: int) -> Iterator[list[MetricRow | FeedbackRow]]:
    """Batches of two-step episodes (extract then answer, variants v1/v2), feedback on
    most episodes, sometimes before its answer call (which it then does not credit)."""
    rng = random.Random(seed)
    pending: list[tuple[str, float]] = []
    for b in range(n):
        rows: list[MetricRow | FeedbackRow] = []
        ts = T0 - 3600 + b * 3.0
        for i in range(6):
            k = b * 6 + i
            episode, variant = f"ep{k}", rng.choice(["v1", "v2"])
            rows.append(call(2 * k, ts, "extract", variant, episode))
            if rng.random() < 0.9:
                rows.append(call(2 * k + 1, ts + 1, "answer", variant, episode))
            else:
                pending.append((episode, ts))
            rows.append(episode_feedback(k, ts + 2, episode, rng.random()))
        for episode, at in pending[:2]:
            rows.append(call(10**6 + b, at + 1, "answer", "v1", episode))
        del pending[:2]
        yield rows


@pytest.fixture
async def db(store_target: Path | str) -> AsyncIterator[Database]:
    """A real SQLite file."""
    database = await Database.open(store_target)
    yield database
    await database.close()


async def test_rebuilt_windows_credit_episode_feedback_like_the_live_monitor(
    db: Database,
) -> None:
    """Snapshot, more batches, restart: the windows restored from the snapshot and the
    tail, and the windows rebuilt from the raw events, credit episode feedback to exactly
    the calls the live monitor credited (calls stored later get nothing)."""
    repo = EventRepository(db)
    live = Monitor(
        MonitoringSettings(),
        [],
        WindowStore(),
        AlertStore(db),
        MonitorExport(CollectorRegistry()),
        TriggerQueue(),
        clock=_Clock(T0),
        snapshots=SnapshotStore(db),
        episodes=repo,
    )
    batches = list(episode_stream(7, 300))
    partition = OnePartition()
    for n, rows in enumerate(batches):
        metrics = [r for r in rows if isinstance(r, MetricView)]
        feedback = [r for r in rows if isinstance(r, FeedbackView)]
        clock = partition.batch_time(rows)
        await live.on_batch(await repo.store_batch(metrics, feedback, {}, clock=clock))
        if n == 200:
            assert await live.snapshot_once() > 0
    live.store.expire(T0)
    credited = {
        p: live.store.stats(p, window_seconds=86400, now=T0).feedback_count
        for p in ("extract", "answer")
    }
    # Every episode credits its extract call; answers stored after their feedback do not.
    assert credited["extract"] == 300 * 6
    assert 300 * 6 * 0.8 < credited["answer"] < 300 * 6

    restored = await restore(live.store.config, db, T0)
    assert restored is not None
    store, covered = restored
    assert covered == live.covered
    assert all_stats(store, T0) == all_stats(live.store, T0)

    # The rebuild without a snapshot: events replayed one by one, or (older than the
    # horizon) loaded as SQL aggregates, which the baseline window compares.
    for horizon, windows in ((86400.0, None), (600.0, 86400.0)):
        rebuilt = WindowStore()
        await rebuild_windows(rebuilt, db, T0, horizon_s=horizon)
        pairs = zip(all_stats(rebuilt, T0), all_stats(live.store, T0), strict=True)
        for a, b in pairs:
            if windows is not None and a.window_seconds != windows:
                continue
            assert (a.request_count, a.feedback_count) == (b.request_count, b.feedback_count)
            assert a.feedback_mean == b.feedback_mean or a.feedback_mean == pytest.approx(
                b.feedback_mean, rel=1e-9
            )
