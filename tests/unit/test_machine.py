"""The pure rollout state machine (``promptd.replacement.machine``)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from promptd.replacement.machine import (
    TRANSITIONS,
    ArmCounts,
    Event,
    IllegalTransition,
    Moments,
    Observation,
    Pause,
    Promote,
    PromoteCandidate,
    RaiseAlert,
    RecordDecision,
    ResolveAlert,
    Resume,
    RetireCandidate,
    Rollback,
    RollbackCandidate,
    RolloutState,
    SetWeight,
    Start,
    Status,
    Stratum,
    Tick,
    has_significant_result,
    step,
    winner,
)
from promptd.replacement.profiles import (
    AGGRESSIVE,
    BALANCED,
    CONSERVATIVE,
    RolloutProfile,
    fixed_split_experiment,
    get_profile,
)

T0 = 1_000_000.0
STEP_S = BALANCED.steps[0].min_duration_s


def _state(**changes: object) -> RolloutState:
    base = RolloutState(
        rollout_id="r1",
        prompt="greeting",
        baseline_version="v1",
        candidate_version="v2",
        salt="s1",
        profile="balanced",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _running(step_index: int = 0) -> RolloutState:
    weight = BALANCED.steps[step_index].weight
    return _state(status=Status.RUNNING, step_index=step_index, weight=weight, step_started_at=T0)


def _bern(n: int, rate: float) -> Moments:
    k = round(n * rate)
    return Moments(n, k, k)


def _obs(
    step_index: int = 0,
    n: int = 3000,
    weight: float = 0.1,
    cand_rate: float = 0.8,
    base_rate: float = 0.8,
    units: ArmCounts | None = None,
    cand_latency: float = 0.0,
) -> Observation:
    """A current-step observation with ``n`` requests split by ``weight``."""
    n_c, n_b = round(n * weight), n - round(n * weight)
    primary = (Stratum(_bern(n_b, base_rate), _bern(n_c, cand_rate), step=step_index),)
    latency = (
        Stratum(
            Moments(n_b, 0.0, n_b * 0.25),
            Moments(n_c, n_c * cand_latency, n_c * (0.25 + cand_latency**2)),
            step=step_index,
        ),
    )
    errors = (Stratum(_bern(n_b, 0.01), _bern(n_c, 0.01), step=step_index),)
    cost = (
        Stratum(Moments(n_b, n_b * 1.0, n_b * 1.01), Moments(n_c, n_c, n_c * 1.01), step_index),
    )
    return Observation(
        primary=primary,
        log_latency=latency,
        errors=errors,
        cost=cost,
        units=units or ArmCounts(n_b, n_c),
        requests=ArmCounts(n_b, n_c),
    )


def _kinds(actions: list[object]) -> list[str]:
    return [a.kind for a in actions if isinstance(a, RecordDecision)]


def test_start_sets_first_weight() -> None:
    """Start moves a pending rollout to running at the first step's weight."""
    state, actions = step(_state(), Start(), T0, BALANCED)
    assert state.status is Status.RUNNING
    assert state.weight == 0.1
    assert state.step_started_at == T0
    assert actions[0] == SetWeight(0.1)


ILLEGAL: list[tuple[Status, Event]] = [
    (Status.PENDING, Tick(Observation())),
    (Status.PENDING, Resume()),
    (Status.RUNNING, Start()),
    (Status.RUNNING, Resume()),
    (Status.PAUSED, Pause()),
    (Status.PROMOTED, Tick(Observation())),
    (Status.PROMOTED, Rollback()),
    (Status.ROLLED_BACK, Promote()),
    (Status.ROLLED_BACK, Resume()),
]


@pytest.mark.parametrize(("status", "event"), ILLEGAL)
def test_illegal_event_raises_and_keeps_state(status: Status, event: Event) -> None:
    """An illegal event raises an error naming status and event; the state is unchanged."""
    state = _state(status=status)
    before = state.to_dict()
    with pytest.raises(IllegalTransition) as info:
        step(state, event, T0, BALANCED)
    assert type(event).__name__ in str(info.value)
    assert status.value in str(info.value)
    assert state.to_dict() == before


def test_transition_table_is_data() -> None:
    """Terminal statuses accept no event; every live status accepts manual rollback."""
    assert TRANSITIONS[Status.PROMOTED] == {}
    assert TRANSITIONS[Status.ROLLED_BACK] == {}
    for status in (Status.PENDING, Status.RUNNING, Status.PAUSED):
        assert Status.ROLLED_BACK in TRANSITIONS[status][Rollback]


@pytest.mark.parametrize(
    ("event", "status", "first_action"),
    [
        (Pause(), Status.PAUSED, None),
        (Promote(), Status.PROMOTED, SetWeight(1.0)),
        (Rollback(), Status.ROLLED_BACK, SetWeight(0.0)),
    ],
)
def test_manual_events_win_over_data(event: Event, status: Status, first_action: object) -> None:
    """Manual Pause/Promote/Rollback apply even when the data argues otherwise."""
    state, actions = step(_running(), event, T0 + 10, BALANCED)
    assert state.status is status
    if first_action is not None:
        assert actions[0] == first_action
    assert _kinds(actions) == [{"paused": "pause", "promoted": "promote"}.get(status, "rollback")]


def test_paused_rollout_ignores_ticks_and_resume_keeps_the_elapsed_time() -> None:
    """Ticks do nothing while paused; Resume continues the step clock where the pause
    stopped it (the time paused does not count)."""
    paused, _ = step(_running(), Pause(), T0 + 5, BALANCED)
    assert paused.paused_at == T0 + 5
    same, actions = step(paused, Tick(_obs(cand_rate=0.1)), T0 + 10_000, BALANCED)
    assert same == paused
    assert actions == []
    resumed, _ = step(paused, Resume(), T0 + 20_000, BALANCED)
    assert resumed.status is Status.RUNNING
    assert resumed.step_started_at == T0 + 20_000 - 5
    assert resumed.paused_at is None


def test_a_short_pause_keeps_the_steps_progress() -> None:
    """Issue 19: a 2.5 s pause 3.5 minutes into a 300 s step left "9s of 300s" a few
    seconds after the resume; the step keeps its 210 s, also across a restart while
    paused (the pause time is part of the stored state)."""
    start = _state(status=Status.RUNNING, weight=0.25, step_started_at=T0)
    paused, _ = step(start, Pause(), T0 + 210, AGGRESSIVE)
    stored = RolloutState.from_dict(paused.to_dict())
    resumed, _ = step(stored, Resume(), T0 + 212.5, AGGRESSIVE)
    _, actions = step(resumed, Tick(_obs(n=3000, weight=0.25)), T0 + 221.5, AGGRESSIVE)
    assert _kinds(actions) == ["hold"]
    hold = next(a for a in actions if isinstance(a, RecordDecision))
    assert hold.reason == "step time not in: 219s of 300s"
    assert hold.details["step_elapsed_s"] == pytest.approx(219.0)


def test_a_pause_stored_before_pauses_kept_their_time_restarts_the_step() -> None:
    """A rollout paused by an older daemon has no pause time: resuming it restarts the
    step's clock, as that daemon did."""
    paused = dataclasses.replace(_running(), status=Status.PAUSED)
    resumed, _ = step(paused, Resume(), T0 + 500, BALANCED)
    assert resumed.step_started_at == T0 + 500


def test_manual_promote_from_paused() -> None:
    """A paused rollout can still be promoted by hand."""
    paused, _ = step(_running(), Pause(), T0, BALANCED)
    state, actions = step(paused, Promote("ops says so"), T0 + 1, BALANCED)
    assert state.status is Status.PROMOTED
    assert PromoteCandidate() in actions
    assert _kinds(actions) == ["promote"]


def test_hold_until_step_time_is_in_then_advance() -> None:
    """Enough samples but not enough time holds; once the time is in, advance."""
    state, actions = step(_running(), Tick(_obs()), T0 + STEP_S - 1, BALANCED)
    assert _kinds(actions) == ["hold"]
    assert "time" in actions[-1].reason  # type: ignore[union-attr]
    state, actions = step(state, Tick(_obs()), T0 + STEP_S, BALANCED)
    assert _kinds(actions) == ["advance"]
    assert state.step_index == 1
    assert state.weight == 0.25
    assert actions[0] == SetWeight(0.25)
    assert state.step_started_at == T0 + STEP_S


def test_promote_at_last_step() -> None:
    """Completing the step before the final 100 % step promotes the candidate."""
    state = _running(step_index=3)
    obs = _obs(step_index=3, weight=0.75)
    new, actions = step(state, Tick(obs), T0 + STEP_S, BALANCED)
    assert new.status is Status.PROMOTED
    assert new.weight == 1.0
    assert actions[:2] == [SetWeight(1.0), PromoteCandidate()]


def test_full_rollout_walks_every_step() -> None:
    """Healthy data walks 10 → 25 → 50 → 75 % and then promotes."""
    state, _ = step(_state(), Start(), T0, BALANCED)
    now = T0
    seen = []
    for _ in range(10):  # bounded: a stuck machine fails instead of hanging
        if state.status is not Status.RUNNING:
            break
        now += STEP_S
        seen.append(state.weight)
        state, _ = step(state, Tick(_obs(state.step_index, weight=state.weight)), now, BALANCED)
    assert seen == [0.1, 0.25, 0.5, 0.75]
    assert state.status is Status.PROMOTED


ROLLBACKS = [
    ("primary", _obs(n=5000, cand_rate=0.6), "significantly worse"),
    ("latency", _obs(n=5000, cand_latency=0.3), "latency guardrail"),
    ("srm", _obs(n=5000, units=ArmCounts(4000, 1000)), "sample ratio mismatch"),
]


@pytest.mark.parametrize(("name", "obs", "reason"), ROLLBACKS, ids=[r[0] for r in ROLLBACKS])
def test_rollback_reasons(name: str, obs: Observation, reason: str) -> None:
    """A worse primary metric, a latency breach or an SRM rolls back with a reason."""
    state, actions = step(_running(), Tick(obs), T0 + 1, BALANCED)
    assert state.status is Status.ROLLED_BACK
    assert state.weight == 0.0
    assert actions[:2] == [SetWeight(0.0), RollbackCandidate()]
    assert reason in actions[-1].reason  # type: ignore[union-attr]


def test_error_and_cost_guardrails() -> None:
    """More errors or a higher cost per request than allowed roll back."""
    obs = _obs(n=5000)
    worse_errors = dataclasses.replace(obs, errors=(Stratum(_bern(4500, 0.01), _bern(500, 0.08)),))
    _, actions = step(_running(), Tick(worse_errors), T0 + 1, BALANCED)
    assert "error-rate guardrail" in actions[-1].reason  # type: ignore[union-attr]
    pricier = dataclasses.replace(
        obs, cost=(Stratum(Moments(4500, 4500, 4545), Moments(500, 750, 1130)),)
    )
    _, actions = step(_running(), Tick(pricier), T0 + 1, BALANCED)
    assert "cost guardrail" in actions[-1].reason  # type: ignore[union-attr]


@pytest.mark.parametrize("weight", [0.0, 0.1])
def test_starvation_holds_then_applies_grace_action(weight: float) -> None:
    """Too few samples hold (never advance); past the grace period the profile's action runs."""
    profile = BALANCED.model_copy(update={"starvation_action": "rollback"})
    starved = _obs(n=100, weight=weight)  # at most 10 candidate samples
    state = _running()
    now = T0 + STEP_S
    state, actions = step(state, Tick(starved), now, profile)
    assert _kinds(actions) == ["hold"]
    assert state.starving_since == now
    state, actions = step(state, Tick(starved), now + profile.starvation_grace_s - 1, profile)
    assert _kinds(actions) == ["hold"]
    state, actions = step(state, Tick(starved), now + profile.starvation_grace_s, profile)
    assert state.status is Status.ROLLED_BACK
    assert "starved" in actions[-1].reason  # type: ignore[union-attr]


def test_starvation_alert_once_and_recovery_resets() -> None:
    """The alert action alerts once per episode and keeps holding; fresh data clears it."""
    profile = CONSERVATIVE
    state = _running()
    starved = _obs(n=100)
    late = T0 + profile.steps[0].min_duration_s
    state, _ = step(state, Tick(starved), late, profile)
    grace_over = late + profile.starvation_grace_s
    state, actions = step(state, Tick(starved), grace_over, profile)
    assert isinstance(actions[0], RaiseAlert)
    assert state.status is Status.RUNNING
    state, actions = step(state, Tick(starved), grace_over + 60, profile)
    assert not any(isinstance(a, RaiseAlert) for a in actions)
    state, _ = step(state, Tick(_obs(n=10_000)), grace_over + 120, profile)
    assert state.starving_since is None


def test_pause_as_starvation_action() -> None:
    """The pause action pauses the rollout and raises an alert."""
    profile = BALANCED.model_copy(update={"starvation_action": "pause", "starvation_grace_s": 0})
    state, actions = step(_running(), Tick(_obs(n=10)), T0 + STEP_S, profile)
    assert state.status is Status.PAUSED
    assert isinstance(actions[0], RaiseAlert)
    assert _kinds(actions) == ["pause"]


def test_resume_from_serialized_state() -> None:
    """A state written with to_dict (as JSON) and read back continues identically."""
    state, _ = step(_state(), Start(), T0, BALANCED)
    state, _ = step(state, Tick(_obs()), T0 + STEP_S, BALANCED)
    restored = RolloutState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state
    obs = _obs(step_index=1, weight=0.25)
    assert step(restored, Tick(obs), T0 + 2 * STEP_S, BALANCED) == step(
        state, Tick(obs), T0 + 2 * STEP_S, BALANCED
    )


def test_fixed_split_experiment_runs_until_significance() -> None:
    """An 80/20 experiment holds without a winner and promotes on a significant win."""
    profile = fixed_split_experiment(0.2, min_duration_s=0, min_samples_per_arm=100)
    assert len(profile.steps) == 1
    state, _ = step(_state(), Start(), T0, profile)
    assert state.weight == 0.2
    flat = _obs(n=5000, weight=0.2)
    state, actions = step(state, Tick(flat), T0 + 1, profile)
    assert _kinds(actions) == ["hold"]
    assert winner(flat, profile) is None
    better = _obs(n=5000, weight=0.2, cand_rate=0.86)
    assert has_significant_result(better, profile)
    state, actions = step(state, Tick(better), T0 + 2, profile)
    assert state.status is Status.PROMOTED
    assert winner(_obs(n=5000, weight=0.2, cand_rate=0.74), profile) == "baseline"


def test_lower_is_better_primary_metric() -> None:
    """With higher_is_better false, a higher candidate value is the regression."""
    state = dataclasses.replace(_running(), higher_is_better=False)
    new, _ = step(state, Tick(_obs(n=5000, cand_rate=0.9)), T0 + 1, BALANCED)
    assert new.status is Status.ROLLED_BACK


def test_profiles() -> None:
    """The named profiles exist, unknown names fail clearly, weights must increase."""
    assert get_profile("aggressive") is AGGRESSIVE
    assert [s.weight for s in BALANCED.steps] == [0.1, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(KeyError, match="unknown rollout profile"):
        get_profile("yolo")
    with pytest.raises(ValueError, match="strictly increase"):
        RolloutProfile(name="bad", steps=(BALANCED.steps[1], BALANCED.steps[0]))


# --- statistics v2: non-inferiority guardrails, the error budget, require_win, starvation --


def _with(obs: Observation, **changes: object) -> Observation:
    return dataclasses.replace(obs, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("log_shift", "rolled_back"),
    [(math.log(1.03), False), (math.log(1.25), True)],
)
def test_latency_guardrail_has_a_margin(log_shift: float, rolled_back: bool) -> None:
    """3 % slower is inside the 5 % margin even with 100,000 requests; 25 % is a breach."""
    obs = _obs(n=100_000, cand_latency=log_shift)
    state, actions = step(_running(), Tick(obs), T0 + 1, BALANCED)
    assert (state.status is Status.ROLLED_BACK) is rolled_back
    if rolled_back:
        assert "latency guardrail" in actions[-1].reason  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("n", "base_rate", "cand_rate", "rolled_back"),
    [
        (1_000_000, 0.0001, 0.0004, False),  # 4× the rate, but +0.03 pt: inside the margin
        (20_000, 0.01, 0.03, True),  # 3× and +2 pt
        (5_000, 0.01, 0.0105, False),  # +5 %: inside the 10 % relative margin
    ],
)
def test_error_guardrail_needs_both_relative_and_absolute_breach(
    n: int, base_rate: float, cand_rate: float, rolled_back: bool
) -> None:
    """The error guardrail rolls back only when the rate is shown above both its relative
    (×1.1) and its absolute (+0.1 pt) margin."""
    obs = _with(
        _obs(n=n),
        errors=(Stratum(_bern(round(n * 0.9), base_rate), _bern(round(n * 0.1), cand_rate)),),
    )
    state, actions = step(_running(), Tick(obs), T0 + 1, BALANCED)
    assert (state.status is Status.ROLLED_BACK) is rolled_back
    if rolled_back:
        assert "error-rate guardrail" in actions[-1].reason  # type: ignore[union-attr]


@pytest.mark.parametrize(("ratio", "rolled_back"), [(1.05, False), (1.4, True)])
def test_cost_guardrail_is_a_ratio_margin(ratio: float, rolled_back: bool) -> None:
    """Cost 5 % higher is inside the 10 % margin; 40 % higher is a breach."""
    n_b, n_c = 45_000, 5_000
    cost = (
        Stratum(
            Moments(n_b, n_b * 1.0, n_b * 1.25),
            Moments(n_c, n_c * ratio, n_c * (0.25 + ratio**2)),
        ),
    )
    state, _ = step(_running(), Tick(_with(_obs(n=50_000), cost=cost)), T0 + 1, BALANCED)
    assert (state.status is Status.ROLLED_BACK) is rolled_back


def test_profiles_stay_within_their_error_budget() -> None:
    """Every built-in profile's rollback alphas sum to at most alpha_total, the SRM alpha is
    split over the test steps, and a profile over budget is refused with the allocation."""
    for profile in (CONSERVATIVE, BALANCED, AGGRESSIVE):
        assert profile.rollback_alpha <= profile.alpha_total + 1e-12
        budget = profile.budget()
        parts = ("primary_worse", "latency", "errors", "cost", "sample_ratio", "judge_drift")
        assert sum(budget[k] for k in parts) == pytest.approx(budget["rollback_total"])
        assert profile.srm_step_alpha == pytest.approx(profile.srm_alpha / profile.test_steps)
    assert BALANCED.test_steps == 4
    with pytest.raises(ValueError, match="above alpha_total"):
        RolloutProfile(name="greedy", steps=BALANCED.steps, alpha_worse=0.049)
    experiment = fixed_split_experiment(0.2, alpha=0.05)
    assert experiment.rollback_alpha == pytest.approx(experiment.alpha_total)


def _last(require_win: bool, profile: RolloutProfile = BALANCED) -> RolloutState:
    index = profile.last_test_step
    return _state(
        status=Status.RUNNING,
        step_index=index,
        weight=profile.steps[index].weight,
        step_started_at=T0,
        require_win=require_win,
    )


def test_require_win_promotes_on_a_significant_win() -> None:
    """At the last test step a require_win rollout holds while the candidate is merely not
    worse, and promotes once it is significantly better."""
    flat = _obs(step_index=3, weight=0.75, n=4000)
    state, actions = step(_last(True), Tick(flat), T0 + STEP_S, BALANCED)
    assert state.status is Status.RUNNING
    assert actions[-1].reason == "waiting for a significant win"  # type: ignore[union-attr]
    better = _obs(step_index=3, weight=0.75, n=4000, cand_rate=0.86)
    state, actions = step(state, Tick(better), T0 + STEP_S + 10, BALANCED)
    assert state.status is Status.PROMOTED
    assert "significantly better" in actions[2].reason  # type: ignore[union-attr]


@pytest.mark.parametrize("by", ["time", "samples"])
def test_require_win_ends_as_no_improvement_at_the_horizon(by: str) -> None:
    """Without a win by the horizon (time in the last step, or samples per arm), the rollout
    ends as no_improvement: weight 0, candidate retired, baseline kept."""
    if by == "time":
        obs, now = _obs(step_index=3, weight=0.75, n=4000), T0 + BALANCED.win_max_duration_s
    else:
        n = round(BALANCED.win_max_samples_per_arm / 0.25) + 10
        obs, now = _obs(step_index=3, weight=0.75, n=n), T0 + STEP_S
    state, actions = step(_last(True), Tick(obs), now, BALANCED)
    assert state.status is Status.NO_IMPROVEMENT
    assert state.weight == 0.0
    assert actions[:2] == [SetWeight(0.0), RetireCandidate()]
    assert _kinds(actions) == ["no_improvement"]
    assert "no significant win" in actions[2].reason  # type: ignore[union-attr]
    assert TRANSITIONS[Status.NO_IMPROVEMENT] == {}
    with pytest.raises(IllegalTransition):
        step(state, Promote(), now + 1, BALANCED)


def test_manual_rollouts_keep_their_profile_behaviour() -> None:
    """Without require_win the last step promotes on no regression; an experiment profile
    (promote_requires_win) holds for a win however long it takes, never no_improvement."""
    flat = _obs(step_index=3, weight=0.75, n=4000)
    state, _ = step(_last(False), Tick(flat), T0 + STEP_S, BALANCED)
    assert state.status is Status.PROMOTED
    experiment = fixed_split_experiment(0.2, min_duration_s=0, min_samples_per_arm=100)
    running = _state(status=Status.RUNNING, weight=0.2, step_started_at=T0)
    later = T0 + 100 * experiment.win_max_duration_s
    state, actions = step(running, Tick(_obs(n=5000, weight=0.2)), later, experiment)
    assert state.status is Status.RUNNING
    assert _kinds(actions) == ["hold"]


def test_starvation_alert_is_raised_once_and_resolved() -> None:
    """The hold action also alerts (once per episode) past the grace period; samples coming
    back resolve the alert, and so does the end of the rollout."""
    starved, late = _obs(n=100), T0 + STEP_S
    state, _ = step(_running(), Tick(starved), late, BALANCED)
    grace_over = late + BALANCED.starvation_grace_s
    state, actions = step(state, Tick(starved), grace_over, BALANCED)
    assert isinstance(actions[0], RaiseAlert)
    assert state.starvation_acted_at == grace_over
    state, actions = step(state, Tick(starved), grace_over + 10, BALANCED)
    assert not any(isinstance(a, RaiseAlert | ResolveAlert) for a in actions)
    fed, actions = step(state, Tick(_obs(n=10_000)), grace_over + 20, BALANCED)
    assert isinstance(actions[0], ResolveAlert)
    assert (fed.starving_since, fed.starvation_acted_at) == (None, None)
    ended, actions = step(state, Rollback("ops"), grace_over + 30, BALANCED)
    assert isinstance(actions[-1], ResolveAlert)
    assert ended.starvation_acted_at is None


def test_paused_by_starvation_resolves_on_resume() -> None:
    """The pause action alerts and pauses; resuming resolves the alert."""
    profile = BALANCED.model_copy(update={"starvation_action": "pause", "starvation_grace_s": 0})
    paused, _ = step(_running(), Tick(_obs(n=10)), T0 + STEP_S, profile)
    resumed, actions = step(paused, Resume(), T0 + STEP_S + 5, profile)
    assert isinstance(actions[0], ResolveAlert)
    assert resumed.status is Status.RUNNING


def test_decision_details_are_strict_json() -> None:
    """A tick without data records details that strict JSON accepts (no infinities)."""
    _, actions = step(_running(), Tick(Observation()), T0 + 1, BALANCED)
    details = [a.details for a in actions if isinstance(a, RecordDecision)]
    assert details
    json.dumps(details, allow_nan=False)
