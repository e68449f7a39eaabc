"""A rollout's primary metric reads the quality signals it was started with, and the
judge-drift check pauses a rollout whose candidate pleases the evaluator more than it
pleases people (issue 20): the pairing in the accumulator, the decision, and the check's
error rate and power by simulation with fixed seeds."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from promptd.replacement import machine
from promptd.replacement.catalog import CATALOG, as_clustered
from promptd.replacement.decision import evaluate
from promptd.replacement.observations import RolloutAccumulator
from promptd.replacement.profiles import BALANCED, RolloutProfile
from promptd.replacement.state import RolloutState, Status

JUDGE = "eval:judge"
DRIFT = next(spec for spec in CATALOG if spec.name == "judge_drift")


def _state(signals: tuple[str, ...] = (JUDGE,)) -> RolloutState:
    return RolloutState(
        "ro-1", "p", "v1", "v2", "salt", "balanced", signals=signals, status=Status.RUNNING
    )


def _acc(signals: tuple[str, ...] = (JUDGE,)) -> RolloutAccumulator:
    return RolloutAccumulator("v1", "v2", "feedback_score", step_starts=[0.0], signals=signals)


def _call(acc: RolloutAccumulator, rid: str, variant: str, at: float, unit: str = "") -> None:
    acc.add_metric(at, variant, unit or rid, 10.0, True, None, None, rid, at)


def test_the_primary_metric_counts_the_rollouts_signals_only() -> None:
    """Started on an evaluator, a rollout's primary metric counts that evaluator's scores;
    people's and another evaluator's are not primary samples."""
    acc = _acc((JUDGE,))
    _call(acc, "r1", "v2", 1.0)
    acc.add_feedback("r1", 0.25, 2.0, source=JUDGE)
    acc.add_feedback("r1", 1.0, 2.0, source=None)
    acc.add_feedback("r1", 0.0, 2.0, source="eval:other")
    assert acc.arm_summary()["candidate"]["primary_samples"] == 1
    assert acc.arm_summary()["candidate"]["primary_mean"] == 0.25
    both = _acc(("human", JUDGE))
    _call(both, "r1", "v2", 1.0)
    both.add_feedback("r1", 0.25, 2.0, source=JUDGE)
    both.add_feedback("r1", 1.0, 2.0, source=None)
    assert both.arm_summary()["candidate"]["primary_samples"] == 2
    human = _acc(("human",))
    assert not human.accepts(JUDGE)
    assert human.accepts(None)
    assert human.read_signals() == ("human",)
    assert _acc((JUDGE,)).read_signals() == (JUDGE, "human")


def test_a_call_scored_by_people_and_the_evaluator_is_one_pair() -> None:
    """The first score of each on a call makes one value, evaluator − people, in the
    call's cell, whatever their order and even when they come before the call; a later
    score of the same source changes nothing."""
    acc = _acc()
    _call(acc, "r1", "v2", 1.0)
    acc.add_feedback("r1", 1.0, 2.0, source=JUDGE)
    acc.add_feedback("r1", 0.0, 3.0, source=None)
    acc.add_feedback("r1", 1.0, 4.0, source=None)  # a second rating: not paired again
    acc.add_feedback("r2", 0.0, 5.0, source=None)  # before its call (topics out of order)
    acc.add_feedback("r2", 0.5, 5.0, source=JUDGE)
    _call(acc, "r2", "v1", 5.0)
    _call(acc, "r3", "v1", 6.0)
    acc.add_feedback("r3", 1.0, 7.0, source=JUDGE)  # the evaluator only: no pair
    summary = acc.arm_summary()
    assert summary["candidate"]["judge_drift_pairs"] == 1
    assert summary["candidate"]["evaluator_minus_people"] == 1.0
    assert summary["baseline"]["judge_drift_pairs"] == 1
    assert summary["baseline"]["evaluator_minus_people"] == 0.5


def test_pairs_survive_a_snapshot_of_the_accumulator() -> None:
    """A call that has one of its two scores when the state is saved pairs with the other
    after it is loaded, exactly as without the snapshot."""
    acc = _acc()
    _call(acc, "r1", "v2", 1.0)
    acc.add_feedback("r1", 0.75, 2.0, source=JUDGE)
    acc.add_feedback("r9", 0.0, 2.0, source=None)  # waiting for its call
    loaded = _acc()
    loaded.load_state(acc.state())
    for one in (acc, loaded):
        one.add_feedback("r1", 0.25, 3.0, source=None)
        _call(one, "r9", "v2", 3.0)
        one.add_feedback("r9", 1.0, 4.0, source=JUDGE)
    assert loaded.arm_summary() == acc.arm_summary()
    assert acc.arm_summary()["candidate"]["judge_drift_pairs"] == 2
    assert loaded.config()["signals"] == [JUDGE]


def _paired(
    acc: RolloutAccumulator, rid: str, variant: str, at: float, human: float, judged: float
) -> None:
    _call(acc, rid, variant, at, unit=f"u{zlib.crc32(rid.encode()) % 50}")
    acc.add_feedback(rid, judged, at, source=JUDGE)
    acc.add_feedback(rid, human, at, source=None)


def test_judge_drift_pauses_the_rollout_and_says_why() -> None:
    """A candidate the evaluator scores 0.4 above people's scores (the baseline: equal)
    is paused, not rolled back, with the reason, the figures and ``paused_by``."""
    acc = _acc()
    rng = np.random.default_rng(7)
    for i in range(200):
        human = 0.5 * float(rng.integers(0, 2))
        _paired(acc, f"b{i}", "v1", i, human, human)
        _paired(acc, f"c{i}", "v2", i, human, human + 0.4)
    state = _state()
    new, actions = machine.step(state, machine.Tick(acc.observation(state)), 300.0, BALANCED)
    assert new.status is Status.PAUSED
    (record,) = [a for a in actions if isinstance(a, machine.RecordDecision)]
    assert record.kind == "pause"
    assert record.reason.startswith("judge drift:")
    assert "pleases the evaluator more than people by +0.4" in record.reason
    assert record.details["paused_by"] == "judge_drift"
    assert record.details["judge_drift_pairs_candidate"] == 200
    assert not any(isinstance(a, machine.RollbackCandidate) for a in actions)


def test_no_test_before_the_minimum_of_pairs() -> None:
    """Below ``judge_drift_min_pairs`` paired calls in an arm the check does not decide,
    however large the gap."""
    acc = _acc()
    for i in range(BALANCED.judge_drift_min_pairs - 1):
        _paired(acc, f"b{i}", "v1", i, 0.0, 0.0)
        _paired(acc, f"c{i}", "v2", i, 0.0, 1.0)
    verdict = evaluate(_state(), acc.observation(_state()), 10.0, BALANCED)
    assert verdict.kind != "pause"


# --- error rate and power, by simulation ---------------------------------------------------

PAIRS_PER_LOOK = 50


def _simulate(seed: int, profile: RolloutProfile, gamed: float, looks: int = 8) -> bool:
    """One rollout's paired calls: units of four calls with a per-unit quality; people
    give a thumbs (0/1); the evaluator agrees with people 80 % of the time (else a
    uniform 0..1 score), and on the candidate it adds ``gamed`` to its score (capped at 1)
    on a random 40 % of the calls. Returns whether the rollout was paused at any look."""
    rng = np.random.default_rng(seed)
    acc = _acc()
    state = _state()
    n = 0
    for look in range(looks):
        for _ in range(PAIRS_PER_LOOK):
            for arm, variant in (("b", "v1"), ("c", "v2")):
                unit = f"{arm}{n // 4}"
                quality = 0.3 + 0.4 * (zlib.crc32(unit.encode()) % 100) / 100
                human = float(rng.random() < quality)
                judged = human if rng.random() < 0.8 else float(rng.random())
                if variant == "v2" and rng.random() < 0.4:
                    judged = min(1.0, judged + gamed)
                rid = f"{arm}{n}"
                acc.add_metric(n, variant, unit, 10.0, True, None, None, rid, n)
                acc.add_feedback(rid, judged, n, source=JUDGE)
                acc.add_feedback(rid, human, n, source=None)
            n += 1
        verdict = evaluate(state, acc.observation(state), float(look), profile)
        if verdict.kind == "pause":
            return True
    return False


def _at_boundary(alpha: float) -> RolloutProfile:
    """The balanced profile with the drift check at ``alpha`` and no margin: an equal
    candidate is then on the null's boundary, where the error rate is largest."""
    return BALANCED.model_copy(
        update={"judge_drift_alpha": alpha, "alpha_worse": 0.01, "max_judge_drift": 0.0}
    )


def test_an_equal_candidate_is_rarely_paused() -> None:
    """At the null's boundary (no margin) with alpha 0.05, an equal candidate is paused in
    at most 5 % of 300 rollouts (plus binomial slack) over eight looks: the test is always
    valid. With the balanced profile's own alpha and margin, none of 50 is paused."""
    runs = 300
    paused = sum(_simulate(seed, _at_boundary(0.05), gamed=0.0) for seed in range(runs))
    assert paused / runs <= 0.05 + 3 * (0.05 * 0.95 / runs) ** 0.5
    assert not any(_simulate(seed, BALANCED, gamed=0.0) for seed in range(50))


@pytest.mark.parametrize(("gamed", "pairs"), [(1.0, 400), (0.5, 2000)])
def test_a_gamed_judge_is_caught(gamed: float, pairs: int) -> None:
    """A judge that scores 40 % of the candidate's answers higher than people do, by
    ``gamed`` (the mean gap grows by about 0.22 and 0.14), is caught by the balanced
    profile's check within ``pairs`` paired calls per arm in at least 95 of 100 rollouts
    (measured: 97 and 100; 94 for the smaller gap within 1,200 pairs)."""
    looks = pairs // PAIRS_PER_LOOK
    caught = sum(_simulate(1000 + seed, BALANCED, gamed, looks) for seed in range(100))
    assert caught >= 95


def test_the_judge_drift_check_is_a_pause_within_the_budget() -> None:
    """The check is a catalog entry: a pause, with its alpha in the rollback budget."""
    assert DRIFT.action == "pause"
    assert DRIFT.paired
    assert BALANCED.budget()["judge_drift"] == BALANCED.judge_drift_alpha
    assert "max_judge_drift" in BALANCED.margins()
    assert as_clustered(_acc().observation(_state()).metric("judge_drift")).steps == ()
