"""Rollout aggregates: events land in the stratum of their timestamp's step, per arm."""

from __future__ import annotations

import math

from promptd.replacement.machine import RolloutState
from promptd.replacement.observations import RolloutAccumulator


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
    by_step = {s.step: s for s in obs.primary}
    assert (by_step[0].baseline.n, by_step[0].candidate.n) == (1, 1)
    assert by_step[0].candidate.total == 0.0
    assert (by_step[1].baseline.n, by_step[1].candidate.n) == (0, 1)
    assert obs.requests.candidate == 1
    assert obs.errors[0].candidate.total == 1.0
    assert math.isclose(obs.log_latency[0].baseline.total, math.log(10.0))


def test_feedback_is_the_primary_metric_when_configured() -> None:
    """With feedback_score, calls feed guardrails and feedback feeds the primary metric."""
    acc = RolloutAccumulator("v1", "v2", "feedback_score", step_starts=[0.0])
    acc.add_metric(1.0, "v1", "u1", 5.0, True, 0.9, 0.01)
    acc.add_feedback(2.0, "v1", 0.25)
    acc.add_feedback(2.0, "v2", 1.0)
    obs = acc.observation(_state())
    assert (obs.primary[0].baseline.n, obs.primary[0].baseline.total) == (1, 0.25)
    assert obs.primary[0].candidate.total == 1.0
    assert obs.cost[0].baseline.total == 0.01


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
