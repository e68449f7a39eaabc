"""The pure rollout state machine (``promptd.replacement.machine``)."""

from __future__ import annotations

import dataclasses
import json

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
    Resume,
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


def test_paused_rollout_ignores_ticks_and_resume_restarts_clock() -> None:
    """Ticks do nothing while paused; Resume restarts the step clock."""
    paused, _ = step(_running(), Pause(), T0 + 5, BALANCED)
    same, actions = step(paused, Tick(_obs(cand_rate=0.1)), T0 + 10_000, BALANCED)
    assert same == paused
    assert actions == []
    resumed, _ = step(paused, Resume(), T0 + 20_000, BALANCED)
    assert resumed.status is Status.RUNNING
    assert resumed.step_started_at == T0 + 20_000


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
