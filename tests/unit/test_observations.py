"""Rollout aggregates: calls land in the cell of their step and arm; feedback in its call's."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from promptd.replacement.clustered import ClusteredSample, estimate
from promptd.replacement.machine import RolloutState
from promptd.replacement.observations import (
    DEFAULT_BUCKETS,
    PENDING_WINDOW_S,
    RolloutAccumulator,
    unit_bucket,
)


def _state(step: int = 0) -> RolloutState:
    return RolloutState(
        rollout_id="r",
        prompt="p",
        baseline_version="v1",
        candidate_version="v2",
        salt="s",
        profile="balanced",
        step_index=step,
    )


def _cells(sample: ClusteredSample) -> dict[int, tuple[tuple[int, float], tuple[int, float]]]:
    """{step: ((n, total) baseline, (n, total) candidate)}."""
    return {
        step: ((b.n, b.total), (c.n, c.total))
        for step, (b, c) in zip(sample.steps, sample.moments, strict=True)
    }


def test_events_are_stratified_by_the_step_of_their_timestamp() -> None:
    """A late event from step 0 counts in step 0 even after the rollout advanced."""
    acc = RolloutAccumulator("v1", "v2", "success_rate", step_starts=[100.0])
    acc.add_metric(101.0, "v1", "u1", 10.0, True, None, None)
    acc.start_step(1, 200.0)
    acc.add_metric(150.0, "v2", "u2", 10.0, False, None, None)  # late, from step 0
    acc.add_metric(201.0, "v2", "u3", 10.0, True, None, None)
    acc.add_metric(99.0, "v2", "u4", 10.0, True, None, None)  # before the rollout: ignored
    acc.add_metric(201.0, "v3", "u5", 10.0, True, None, None)  # not an arm: ignored
    obs = acc.observation(_state(step=1))
    assert isinstance(obs.primary, ClusteredSample)
    assert _cells(obs.primary) == {0: ((1, 1.0), (1, 0.0)), 1: ((0, 0.0), (1, 1.0))}
    assert obs.requests.candidate == 1
    assert isinstance(obs.errors, ClusteredSample)
    assert obs.errors.moments[0][1].total == 1.0
    assert isinstance(obs.log_latency, ClusteredSample)
    assert math.isclose(obs.log_latency.moments[0][0].total, math.log(10.0))


def test_feedback_counts_in_its_calls_step_and_arm() -> None:
    """Feedback arriving after a weight change counts in the step and arm of its call, not
    in the step of its own time, and the arm is the call's even if the feedback says else."""
    acc = RolloutAccumulator("v1", "v2", "feedback_score", step_starts=[0.0])
    acc.add_metric(10.0, "v2", "u1", 5.0, True, 0.9, 0.01, request_id="r1", ingested_at=11.0)
    acc.add_metric(12.0, "v1", "u2", 5.0, True, 0.9, 0.01, request_id="r2", ingested_at=12.0)
    acc.start_step(1, 100.0)
    acc.add_metric(101.0, "v2", "u3", 5.0, True, 0.9, 0.02, request_id="r3", ingested_at=101.0)
    acc.add_feedback("r1", 0.0, ingested_at=400.0)  # 6½ minutes later, step 1 by now
    acc.add_feedback("r2", 1.0, ingested_at=401.0)
    acc.add_feedback("r3", 1.0, ingested_at=402.0)
    obs = acc.observation(_state(step=1))
    assert isinstance(obs.primary, ClusteredSample)
    assert _cells(obs.primary) == {0: ((1, 1.0), (1, 0.0)), 1: ((0, 0.0), (1, 1.0))}
    assert isinstance(obs.cost, ClusteredSample)
    assert obs.cost.moments[0][1].total == 0.01
    assert acc.feedback.joined == 3


def test_feedback_outside_the_rollout_is_ignored() -> None:
    """Feedback on a call before the start, on another variant, or on an unknown request
    never counts; it waits for its call for the pending window, then is unmatched."""
    acc = RolloutAccumulator("v1", "v2", "feedback_score", step_starts=[100.0])
    acc.add_metric(50.0, "v2", "u1", 5.0, True, None, None, request_id="early", ingested_at=100.0)
    acc.add_metric(120.0, "v9", "u2", 5.0, True, None, None, request_id="other", ingested_at=120.0)
    for rid in ("early", "other", "unknown"):
        acc.add_feedback(rid, 1.0, ingested_at=130.0)
    assert acc.feedback.waiting == 3
    acc.add_metric(140.0 + PENDING_WINDOW_S, "v1", "u3", 5.0, True, None, None, "x", 731.0)
    assert (acc.feedback.unmatched, acc.feedback.waiting, acc.feedback.joined) == (3, 0, 0)
    obs = acc.observation(_state())
    assert isinstance(obs.primary, ClusteredSample)
    assert obs.primary.steps == ()


def test_feedback_before_its_call_waits_for_it() -> None:
    """Feedback stored before its call (topics read out of order) joins when the call
    comes within the pending window, and is unmatched when it comes later."""
    acc = RolloutAccumulator("v1", "v2", "feedback_score", step_starts=[0.0])
    acc.add_feedback("r1", 1.0, ingested_at=10.0)
    acc.add_metric(9.0, "v2", "u1", 5.0, True, None, None, request_id="r1", ingested_at=20.0)
    acc.add_feedback("r2", 1.0, ingested_at=30.0)
    late = 31.0 + PENDING_WINDOW_S
    acc.add_metric(25.0, "v1", "u2", 5.0, True, None, None, request_id="r2", ingested_at=late)
    assert (acc.feedback.joined, acc.feedback.unmatched, acc.feedback.waiting) == (1, 1, 0)


def test_feedback_later_than_the_limit_is_not_counted() -> None:
    """Feedback stored more than feedback_max_delay_s after its call does not count."""
    acc = RolloutAccumulator(
        "v1", "v2", "feedback_score", step_starts=[0.0], feedback_max_delay_s=60.0
    )
    acc.add_metric(1.0, "v2", "u1", 5.0, True, None, None, request_id="ok", ingested_at=1.0)
    acc.add_metric(2.0, "v2", "u2", 5.0, True, None, None, request_id="late", ingested_at=2.0)
    acc.add_feedback("ok", 1.0, ingested_at=61.0)
    acc.add_feedback("late", 1.0, ingested_at=62.5)
    assert acc.feedback.joined == 1
    assert acc.feedback.waiting == 1  # its call is forgotten: it waits, then is unmatched


def _events(seed: int) -> tuple[list[tuple[object, ...]], list[tuple[str, float, float]]]:
    """Calls and feedback with stored times, feedback up to 20 minutes after its call."""
    rng = random.Random(seed)
    calls, feedback = [], []
    for i in range(400):
        at = float(i)
        variant = "v2" if rng.random() < 0.3 else "v1"
        calls.append((at, variant, f"u{rng.randrange(60)}", 5.0, True, None, 0.1, f"r{i}", at))
        feedback.append((f"r{i}", float(rng.random() < 0.7), at + rng.uniform(0, 1200)))
    return calls, feedback


def _fill(acc: RolloutAccumulator, order: list[tuple[str, tuple[object, ...]]]) -> None:
    for kind, event in order:
        if kind == "call":
            acc.add_metric(*event)  # type: ignore[arg-type]
        else:
            acc.add_feedback(*event)  # type: ignore[arg-type]


def test_joins_depend_on_stored_times_not_on_order() -> None:
    """Feeding the same events interleaved in storage order (live) or all calls first and
    then all feedback sorted by storage time (a replay) gives the same observation."""
    calls, feedback = _events(seed=3)
    live = [("call", c) for c in calls] + [("feedback", f) for f in feedback]
    live.sort(key=lambda item: float(item[1][-1]))  # type: ignore[arg-type]
    replayed = [("call", c) for c in calls] + sorted(
        (("feedback", f) for f in feedback), key=lambda item: item[1][-1]
    )
    results = []
    for order in (live, replayed):
        acc = RolloutAccumulator(
            "v1", "v2", "feedback_score", step_starts=[0.0], feedback_max_delay_s=900.0
        )
        acc.start_step(1, 200.0)
        _fill(acc, order)
        results.append((acc.observation(_state(1)), acc.feedback.joined))
    (a, joined_a), (b, joined_b) = results
    assert joined_a == joined_b < 400  # the 900 s limit dropped some
    assert isinstance(a.primary, ClusteredSample)
    assert isinstance(b.primary, ClusteredSample)
    assert _cells(a.primary) == _cells(b.primary)
    assert np.allclose(a.primary.yy, b.primary.yy)


def test_units_count_for_srm_only_after_the_settle_period() -> None:
    """Right after a weight change SDK caches still route with the old weight, so units
    are counted for the sample-ratio check only once the settle period has passed."""
    acc = RolloutAccumulator("v1", "v2", "success_rate", step_starts=[0.0], srm_settle_s=3.0)
    acc.start_step(1, 100.0)
    acc.add_metric(101.0, "v1", "early", 1.0, True, None, None)
    acc.add_metric(104.0, "v1", "late", 1.0, True, None, None)
    acc.add_metric(105.0, "v2", "late2", 1.0, True, None, None)
    acc.add_metric(105.5, "v2", "late2", 1.0, True, None, None)  # same unit twice
    obs = acc.observation(_state(step=1))
    assert (obs.units.baseline, obs.units.candidate) == (1, 1)
    assert (obs.requests.baseline, obs.requests.candidate) == (2, 2)


def test_clusters_are_unit_buckets() -> None:
    """A unit's observations share one cluster across steps and arms: the cross products
    equal those of per-bucket sums computed by hand, so a unit seen in two steps adds a
    covariance between them."""
    acc = RolloutAccumulator("v1", "v2", "quality", step_starts=[0.0])
    rng = random.Random(5)
    rows = []
    for i in range(300):
        if i == 150:
            acc.start_step(1, 150.0)
        unit = f"user-{rng.randrange(40)}"
        variant = "v2" if rng.random() < 0.4 else "v1"
        quality = rng.random()
        acc.add_metric(float(i), variant, unit, 3.0, True, quality, None)
        rows.append((unit, (1 if i >= 150 else 0) * 2 + (variant == "v2"), quality))
    values = np.zeros((DEFAULT_BUCKETS, 4))
    counts = np.zeros((DEFAULT_BUCKETS, 4))
    for unit, cell, q in rows:
        values[unit_bucket(unit), cell] += q
        counts[unit_bucket(unit), cell] += 1
    obs = acc.observation(_state(step=1))
    assert isinstance(obs.primary, ClusteredSample)
    assert np.allclose(obs.primary.yy, values.T @ values)
    assert np.allclose(obs.primary.ym, values.T @ counts)
    assert np.allclose(obs.primary.mm, counts.T @ counts)
    assert obs.primary.mm[0, 2] > 0  # units seen in both steps
    assert obs.primary.clusters == np.count_nonzero(counts.sum(axis=1))
    assert estimate(obs.primary).var > 0


@pytest.mark.parametrize("unit", ["user-1", "ünïcødé", ""])
def test_unit_bucket_is_stable(unit: str) -> None:
    """The bucket is CRC-32 of the UTF-8 unit modulo the bucket count (same after restart)."""
    import zlib

    assert unit_bucket(unit) == zlib.crc32(unit.encode()) % DEFAULT_BUCKETS
