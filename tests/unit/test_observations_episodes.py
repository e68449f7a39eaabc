"""Rollout aggregates with episodes: feedback on a whole episode joins each call of the
rollout's prompt in the episode, in that call's step and arm, under the join window."""

from __future__ import annotations

import numpy as np

from promptd.replacement.clustered import ClusteredSample
from promptd.replacement.observations import PENDING_WINDOW_S, RolloutAccumulator
from tests.unit.test_observations import _state


def _cells(acc: RolloutAccumulator, step: int = 0) -> dict[int, tuple[tuple[int, float], ...]]:
    """{step: ((n, total) baseline, (n, total) candidate)} of the primary metric."""
    sample = acc.observation(_state(step)).primary
    assert isinstance(sample, ClusteredSample)
    return {
        s: ((b.n, b.total), (c.n, c.total))
        for s, (b, c) in zip(sample.steps, sample.moments, strict=True)
    }


def _call(
    acc: RolloutAccumulator, rid: str, variant: str, at: float, episode: str | None = None
) -> None:
    acc.add_metric(at, variant, episode or rid, 5.0, True, None, None, rid, at, episode)


def test_episode_feedback_joins_every_call_of_the_episode_in_its_cell() -> None:
    """Two calls of the prompt in one episode (in different steps) each get the episode's
    score in their own step and arm; a call of another episode gets nothing."""
    acc = RolloutAccumulator("v1", "v2", "feedback_score", step_starts=[0.0])
    _call(acc, "r1", "v2", 10.0, "ep")
    acc.start_step(1, 100.0)
    _call(acc, "r2", "v2", 110.0, "ep")
    _call(acc, "r3", "v1", 120.0, "other")
    acc.add_feedback(None, 0.25, 200.0, "ep")
    assert _cells(acc, step=1) == {0: ((0, 0.0), (1, 0.25)), 1: ((0, 0.0), (1, 0.25))}
    assert (acc.feedback.joined, acc.feedback.waiting, acc.feedback.unmatched) == (1, 0, 0)


def test_a_call_stored_after_its_episode_feedback_still_joins_within_the_window() -> None:
    """Episode feedback is kept for late calls for the pending window: a call stored
    within it joins, one stored after it does not; it counts as joined once."""
    acc = RolloutAccumulator("v1", "v2", "feedback_score", step_starts=[0.0])
    acc.add_feedback(None, 1.0, 10.0, "ep")
    assert acc.feedback.joined == 0
    _call(acc, "r1", "v1", 20.0, "ep")
    _call(acc, "r2", "v1", 30.0, "ep")
    _call(acc, "r3", "v1", 11.0 + PENDING_WINDOW_S, "ep")
    assert _cells(acc) == {0: ((2, 2.0), (0, 0.0))}
    assert acc.feedback.joined == 1


def test_episode_feedback_later_than_the_limit_does_not_join() -> None:
    """A call stored more than feedback_max_delay_s before the episode feedback is
    forgotten; the feedback joins only the calls still in the window."""
    acc = RolloutAccumulator(
        "v1", "v2", "feedback_score", step_starts=[0.0], feedback_max_delay_s=60.0
    )
    _call(acc, "old", "v2", 1.0, "ep")
    _call(acc, "new", "v2", 50.0, "ep")
    acc.add_feedback(None, 0.5, 70.0, "ep")
    assert _cells(acc) == {0: ((0, 0.0), (1, 0.5))}


def test_feedback_naming_both_a_call_and_its_episode_judges_the_call() -> None:
    """With a request id, feedback is call feedback: it joins that call only."""
    acc = RolloutAccumulator("v1", "v2", "feedback_score", step_starts=[0.0])
    _call(acc, "r1", "v1", 1.0, "ep")
    _call(acc, "r2", "v1", 2.0, "ep")
    acc.add_feedback("r1", 1.0, 3.0, "ep")
    assert _cells(acc) == {0: ((1, 1.0), (0, 0.0))}


def test_episode_feedback_of_other_prompts_is_not_counted() -> None:
    """Feedback on an episode with no call of the rollout's prompt neither joins nor
    counts as waiting or unmatched, and is forgotten after the pending window."""
    acc = RolloutAccumulator("v1", "v2", "feedback_score", step_starts=[0.0])
    acc.add_feedback(None, 1.0, 1.0, "elsewhere")
    _call(acc, "r1", "v1", 2.0 + PENDING_WINDOW_S, "x")
    counts = acc.feedback
    assert (counts.joined, counts.waiting, counts.unmatched) == (0, 0, 0)
    assert acc.state()["episode_feedback"] == []


def test_calls_of_an_episode_without_unit_share_one_cluster() -> None:
    """The unit of a call in an episode without a unit id is its episode: its calls fall
    in one unit bucket, and the SRM check counts the episode once."""
    acc = RolloutAccumulator("v1", "v2", "feedback_score", step_starts=[0.0], buckets=1024)
    for i in range(3):
        _call(acc, f"r{i}", "v2", 1.0 + i, "ep")
    acc.add_feedback(None, 1.0, 10.0, "ep")
    assert acc.observation(_state()).units.candidate == 1
    ((step, arm, primary, *_),) = acc.state()["cells"]
    n, _, _, _, per_bucket, *_ = primary
    assert (step, arm, n) == (0, "candidate", 3)  # three observations ...
    counts = np.frombuffer(per_bucket, dtype=np.float64)
    assert counts[counts > 0].tolist() == [3.0]  # ... in one unit bucket


def test_state_round_trip_keeps_episodes_and_reads_older_snapshots() -> None:
    """A loaded state goes on exactly like the original (late calls still join kept
    episode feedback); a state from before episodes (no episode column) loads."""
    acc = RolloutAccumulator("v1", "v2", "feedback_score", step_starts=[0.0])
    _call(acc, "r1", "v2", 1.0, "ep")
    acc.add_feedback(None, 0.5, 2.0, "ep")
    acc.add_feedback(None, 1.0, 3.0, "later")
    copy = RolloutAccumulator("v1", "v2", "feedback_score", step_starts=[0.0])
    copy.load_state(acc.state())
    for target in (acc, copy):
        _call(target, "r2", "v1", 4.0, "later")
        _call(target, "r3", "v2", 5.0, "ep")
    assert copy.state() == acc.state()
    assert _cells(copy) == {0: ((1, 1.0), (2, 1.0))}

    old = acc.state()
    old["calls"] = old["calls"][:5]
    del old["episode_feedback"]
    legacy = RolloutAccumulator("v1", "v2", "feedback_score", step_starts=[0.0])
    legacy.load_state(old)
    assert legacy.state()["episode_feedback"] == []
    assert set(legacy.state()["calls"][5]) == {None}
