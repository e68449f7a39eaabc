"""Snapshots of a live rollout's accumulator: snapshot plus the replayed tail equals both
the uninterrupted accumulator and the full replay from the rollout's start."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from promptd.replacement import snapshots
from promptd.replacement.observations import RolloutAccumulator
from promptd.replacement.replay import replay
from promptd.storage.database import Database
from promptd.storage.repository import BatchOutcome, EventRepository
from promptd.storage.rows import FeedbackRow, MetricRow
from promptd.storage.snapshots import SnapshotStore

# The replay takes rows stored (``ingested_at``, the wall clock) since the rollout began.
T0 = time.time() - 3600


def accumulator(**over: Any) -> RolloutAccumulator:
    """The accumulator of a rollout of v2 against v1 that started at ``T0``."""
    config: dict[str, Any] = {
        "baseline_version": "v1",
        "candidate_version": "v2",
        "primary_metric": "feedback_score",
        "step_starts": [T0],
        "feedback_max_delay_s": 3600.0,
        "buckets": 64,
    }
    config.update(over)
    return RolloutAccumulator(**config)


def batches(seed: int, n: int) -> list[tuple[list[MetricRow], list[FeedbackRow]]]:
    """``n`` batches of calls on v1/v2 (and another variant), each with feedback on some
    calls of this or earlier batches, and some feedback before its call. Some calls are
    in episodes (of two or three calls, some without a unit id); feedback on episodes
    comes after their calls, before some of them, or on episodes of no call here."""
    rng = random.Random(seed)
    out: list[tuple[list[MetricRow], list[FeedbackRow]]] = []
    calls: list[str] = []
    for b in range(n):
        metrics: list[MetricRow] = []
        for i in range(40):
            rid = f"r{b}-{i}"
            variant = rng.choice(["v1", "v2", "v2", "v3"])
            ts = T0 + b * 10 + i * 0.1
            unit: str | None = f"u{rng.randrange(30)}"
            episode = f"e{b}-{i // 3}" if i % 4 else None
            if episode is not None and i % 2:
                unit = None  # routed by its episode
            latency, ok = rng.lognormvariate(5, 1), rng.random() > 0.1
            row: MetricRow = (f"m{rid}", ts, "p", variant, "m", rid, unit, latency, ok)
            size = rng.choice([None, rng.randrange(900)])
            row += (None, rng.random(), None, None, rng.random() / 100, size, episode, None, None)
            row += (None, None)
            metrics.append(row)
            calls.append(rid)
        feedback: list[FeedbackRow] = []
        for j, rid in enumerate([*rng.sample(calls, 15), f"r{b + 1}-3"]):
            score = rng.random()
            feedback.append(
                (f"f{b}-{j}", T0 + b * 10, "p", "v2", None, rid, score, "q", None, None, None, None)
            )
        episodes = [f"e{rng.randrange(b + 1)}-{rng.randrange(14)}" for _ in range(6)]
        for j, episode in enumerate([*episodes, f"e{b + 1}-2", f"other-{b}"]):
            row_fb: FeedbackRow = (f"g{b}-{j}", T0 + b * 10, None, None, None, None)
            feedback.append((*row_fb, rng.random(), "q", None, None, episode, None))
        out.append((metrics, feedback))
    return out


def feed(acc: RolloutAccumulator, outcome: BatchOutcome) -> None:
    """What the controller's batch listener does with one stored batch."""
    for m in outcome.metrics:
        unit = m.unit_id or m.episode_id or m.request_id
        args = (m.latency_ms, m.success, m.quality, m.cost_usd, m.request_id)
        at = outcome.ingested_at
        acc.add_metric(m.ts, m.variant, unit, *args, at, m.episode_id, m.prompt, m.input_chars)
    for f in outcome.feedback:
        acc.add_feedback(f.request_id, f.score, outcome.ingested_at, f.episode_id)


@pytest.fixture
async def db(store_target: Path | str) -> AsyncIterator[Database]:
    """A real SQLite file."""
    database = await Database.open(store_target)
    yield database
    await database.close()


async def test_snapshot_and_tail_equal_the_live_accumulator_and_the_full_replay(
    db: Database,
) -> None:
    """A rollout snapshotted half-way and resumed from the snapshot plus the rows stored
    after it holds exactly what the live feed built and what a replay of everything
    builds: cells, unit buckets, joined and waiting feedback."""
    repo, store = EventRepository(db), SnapshotStore(db)
    live = accumulator()
    covered = (0, 0)
    stream = batches(1, 30)
    for i, (metrics, feedback) in enumerate(stream):
        outcome = await repo.store_batch(metrics, feedback, {})
        feed(live, outcome)
        covered = (outcome.last_metric_id, outcome.last_feedback_id)
        if i == 14:
            header, state = snapshots.take("ro-1", live, covered, T0)
            await store.save(snapshots.finish(header, state))

    snap = await store.load(snapshots.name("ro-1"))
    assert snap is not None
    resumed = accumulator()
    assert snapshots.load(resumed, snap)
    calls, _ = await replay(db, resumed, "p", T0, after=(snap.metric_id, snap.feedback_id))
    # Only the rollout's calls stored after the snapshot are replayed.
    assert calls == sum(m[3] in ("v1", "v2") for metrics, _ in stream[15:] for m in metrics)
    full = accumulator()
    await replay(db, full, "p", T0)

    assert resumed.state() == live.state()
    assert full.state() == live.state()
    assert live.feedback.joined > 0
    assert live.feedback.waiting + live.feedback.unmatched > 0
    assert any(episode for episode in live.state()["calls"][5])
    assert any(joined for *_, joined in live.state()["episode_feedback"])


async def test_snapshot_of_another_configuration_is_not_loaded(db: Database) -> None:
    """A snapshot built for other versions, metric or join window is refused."""
    live = accumulator()
    header, state = snapshots.take("ro-2", live, (0, 0), T0)
    snap = snapshots.finish(header, state)
    assert not snapshots.load(accumulator(candidate_version="v9"), snap)
    assert not snapshots.load(accumulator(primary_metric="success_rate"), snap)
    assert not snapshots.load(accumulator(feedback_max_delay_s=60.0), snap)
    assert not snapshots.load(accumulator(step_starts=[T0 + 1]), snap)
    assert snapshots.load(accumulator(step_starts=[T0, T0 + 100]), snap)
