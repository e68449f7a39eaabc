"""The rollout state machine: pure, no I/O, modelled on h11's ``_state.py``.

``step(state, event, now, profile) -> (new_state, actions)`` is the whole API. The controller
(the async shell) feeds it events — a periodic :class:`Tick` carrying an :class:`Observation`
computed from SQLite, and the manual commands :class:`Pause`, :class:`Resume`,
:class:`Promote`, :class:`Rollback` — and executes the returned actions in order
(:class:`SetWeight`, :class:`RecordDecision`, :class:`PromoteCandidate`,
:class:`RollbackCandidate`, :class:`RaiseAlert`).

Which event is legal in which status is data (:data:`TRANSITIONS`); an illegal event raises
:class:`IllegalTransition` naming the status and the event, and since states are immutable the
caller's state is untouched. Manual commands are legal in every live status and are applied
before anything the data says, so they always win.

Tick decision order (first match wins): sample ratio mismatch → rollback; primary metric
significantly worse → rollback; guardrail breached → rollback; too few samples in an arm →
hold (after the starvation grace period, the profile's starvation action); step time not in
→ hold; last step of an experiment without a significant win → hold; otherwise advance, or
promote when the next step has weight 1.0 or this is the last step.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .profiles import RolloutProfile
from .stats import (
    Alternative,
    Moments,
    SequentialResult,
    Stratum,
    compare_means,
    srm_test,
)

__all__ = [
    "TRANSITIONS",
    "Action",
    "ArmCounts",
    "Event",
    "IllegalTransition",
    "Moments",
    "Observation",
    "Pause",
    "Promote",
    "PromoteCandidate",
    "RaiseAlert",
    "RecordDecision",
    "Resume",
    "Rollback",
    "RollbackCandidate",
    "RolloutState",
    "SetWeight",
    "Start",
    "Status",
    "Stratum",
    "Tick",
    "evaluate",
    "has_significant_result",
    "promote",
    "rollback",
    "step",
    "winner",
]


class Status(enum.StrEnum):
    """Lifecycle of a rollout; ``PROMOTED`` and ``ROLLED_BACK`` are terminal."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True, slots=True)
class ArmCounts:
    """Distinct units (or requests) per arm in the current step, for the SRM check."""

    baseline: int = 0
    candidate: int = 0


@dataclass(frozen=True, slots=True)
class Observation:
    """What the controller measured, stratified by rollout step (see ``stats.Stratum``).

    Every field but ``units``/``requests`` is a tuple of strata, one per step the rollout has
    been through (``Stratum.step`` = step index; steps without data may be omitted), each
    holding per-arm sufficient statistics over that step's time range only:

    - ``primary``: the rollout's primary metric per sample (feedback score, success 0/1 or
      quality); higher is better unless ``RolloutState.higher_is_better`` is false;
    - ``log_latency``: ``n``, ``sum(ln latency)``, ``sum(ln latency ** 2)`` per request;
    - ``errors``: per request 1 for an error, else 0 (so ``total_sq == total``);
    - ``cost``: cost per request.

    ``units`` and ``requests`` count the current step only (distinct ``unit_id`` and requests
    per arm); the SRM check uses ``units``. The number of samples per arm of the current
    step is read from the current step's ``primary`` stratum.
    """

    primary: tuple[Stratum, ...] = ()
    log_latency: tuple[Stratum, ...] = ()
    errors: tuple[Stratum, ...] = ()
    cost: tuple[Stratum, ...] = ()
    units: ArmCounts = ArmCounts()
    requests: ArmCounts = ArmCounts()


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """Begin the rollout at its first step."""


@dataclass(frozen=True, slots=True)
class Tick:
    """Periodic evaluation with the latest observation."""

    observation: Observation


@dataclass(frozen=True, slots=True)
class Pause:
    """Manual pause: hold the current weight and stop evaluating."""

    reason: str = "manual pause"


@dataclass(frozen=True, slots=True)
class Resume:
    """Manual resume of a paused rollout; the current step's clock restarts."""

    reason: str = "manual resume"


@dataclass(frozen=True, slots=True)
class Promote:
    """Manual promotion of the candidate, whatever the data says."""

    reason: str = "manual promote"


@dataclass(frozen=True, slots=True)
class Rollback:
    """Manual rollback to the baseline, whatever the data says."""

    reason: str = "manual rollback"


Event = Start | Tick | Pause | Resume | Promote | Rollback

# --- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetWeight:
    """Publish routing with this candidate weight (0.0 sends everyone to the baseline)."""

    weight: float


@dataclass(frozen=True, slots=True)
class RecordDecision:
    """Append to the audit log: ``kind`` is hold/advance/promote/rollback/pause/resume/start."""

    kind: str
    reason: str
    details: Mapping[str, float | int | str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PromoteCandidate:
    """Make the candidate the active version (the old one stays in history as backup)."""


@dataclass(frozen=True, slots=True)
class RollbackCandidate:
    """Retire the candidate; the baseline stays active."""


@dataclass(frozen=True, slots=True)
class RaiseAlert:
    """Notify operators (e.g. the rollout is starved of traffic)."""

    reason: str


Action = SetWeight | RecordDecision | PromoteCandidate | RollbackCandidate | RaiseAlert

# --- state --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RolloutState:
    """Everything needed to resume a rollout after a restart; see ``to_dict``/``from_dict``."""

    rollout_id: str
    prompt: str
    baseline_version: str
    candidate_version: str
    salt: str
    profile: str
    primary_metric: str = "feedback_score"
    higher_is_better: bool = True
    status: Status = Status.PENDING
    step_index: int = 0
    weight: float = 0.0
    started_at: float | None = None
    step_started_at: float | None = None
    starving_since: float | None = None
    starvation_acted_at: float | None = None
    finished_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the status as its string value)."""
        out = dataclasses.asdict(self)
        out["status"] = self.status.value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutState:
        """Inverse of :meth:`to_dict`; unknown keys are rejected."""
        values = dict(data)
        values["status"] = Status(values.get("status", Status.PENDING.value))
        return cls(**values)


class IllegalTransition(Exception):
    """An event that is not legal in the rollout's current status; the state is unchanged."""

    def __init__(self, status: Status, event: Event) -> None:
        self.status = status
        self.event = event
        super().__init__(f"event {type(event).__name__} is illegal in rollout status {status}")


_LIVE = (Status.PENDING, Status.RUNNING, Status.PAUSED)

TRANSITIONS: Mapping[Status, Mapping[type[Any], frozenset[Status]]] = {
    Status.PENDING: {
        Start: frozenset({Status.RUNNING}),
        Promote: frozenset({Status.PROMOTED}),
        Rollback: frozenset({Status.ROLLED_BACK}),
    },
    Status.RUNNING: {
        Tick: frozenset({Status.RUNNING, Status.PAUSED, Status.PROMOTED, Status.ROLLED_BACK}),
        Pause: frozenset({Status.PAUSED}),
        Promote: frozenset({Status.PROMOTED}),
        Rollback: frozenset({Status.ROLLED_BACK}),
    },
    Status.PAUSED: {
        Tick: frozenset({Status.PAUSED}),
        Resume: frozenset({Status.RUNNING}),
        Promote: frozenset({Status.PROMOTED}),
        Rollback: frozenset({Status.ROLLED_BACK}),
    },
    Status.PROMOTED: {},
    Status.ROLLED_BACK: {},
}
"""Legal events per status, with the statuses each may lead to (checked after every step)."""


def step(
    state: RolloutState, event: Event, now: float, profile: RolloutProfile
) -> tuple[RolloutState, list[Action]]:
    """Apply ``event`` at time ``now`` (seconds); return the new state and actions to run."""
    allowed = TRANSITIONS[state.status].get(type(event))
    if allowed is None:
        raise IllegalTransition(state.status, event)
    new_state, actions = _dispatch(state, event, now, profile)
    # The table is the contract: a handler leading elsewhere is a bug, not a decision.
    if new_state.status not in allowed:
        raise AssertionError(f"{type(event).__name__} led {state.status} to {new_state.status}")
    return new_state, actions


def _dispatch(
    state: RolloutState, event: Event, now: float, profile: RolloutProfile
) -> tuple[RolloutState, list[Action]]:
    match event:
        case Start():
            first = profile.steps[0].weight
            new = dataclasses.replace(
                state,
                status=Status.RUNNING,
                step_index=0,
                weight=first,
                started_at=now,
                step_started_at=now,
            )
            return new, [SetWeight(first), RecordDecision("start", "rollout started")]
        case Pause(reason=reason):
            new = dataclasses.replace(state, status=Status.PAUSED)
            return new, [RecordDecision("pause", reason)]
        case Resume(reason=reason):
            new = dataclasses.replace(
                state, status=Status.RUNNING, step_started_at=now, starving_since=None
            )
            return new, [RecordDecision("resume", reason)]
        case Promote(reason=reason):
            return promote(state, now, reason, {})
        case Rollback(reason=reason):
            return rollback(state, now, reason, {})
        case Tick(observation=obs):
            if state.status is Status.PAUSED:
                return state, []  # paused rollouts are not evaluated
            return _tick(state, obs, now, profile)
    raise IllegalTransition(state.status, event)  # pragma: no cover - exhaustive match


def promote(
    state: RolloutState, now: float, reason: str, details: Mapping[str, float | int | str]
) -> tuple[RolloutState, list[Action]]:
    """Terminal promotion: full weight, then the version switch, then the audit record."""
    new = dataclasses.replace(state, status=Status.PROMOTED, weight=1.0, finished_at=now)
    return new, [SetWeight(1.0), PromoteCandidate(), RecordDecision("promote", reason, details)]


def rollback(
    state: RolloutState, now: float, reason: str, details: Mapping[str, float | int | str]
) -> tuple[RolloutState, list[Action]]:
    """Terminal rollback: weight 0 first (users leave the candidate at once), then record."""
    new = dataclasses.replace(state, status=Status.ROLLED_BACK, weight=0.0, finished_at=now)
    return new, [SetWeight(0.0), RollbackCandidate(), RecordDecision("rollback", reason, details)]


def _tick(
    state: RolloutState, obs: Observation, now: float, profile: RolloutProfile
) -> tuple[RolloutState, list[Action]]:
    verdict = evaluate(state, obs, now, profile)
    details = verdict.details
    if verdict.kind == "rollback":
        return rollback(state, now, verdict.reason, details)
    if verdict.kind == "promote":
        return promote(state, now, verdict.reason, details)
    if verdict.kind == "advance":
        index = state.step_index + 1
        weight = profile.steps[index].weight
        new = dataclasses.replace(
            state, step_index=index, weight=weight, step_started_at=now, starving_since=None
        )
        return new, [SetWeight(weight), RecordDecision("advance", verdict.reason, details)]
    return _hold(state, verdict.reason, verdict.starving, details, now, profile)


def _hold(
    state: RolloutState,
    reason: str,
    starving: bool,
    details: Mapping[str, float | int | str],
    now: float,
    profile: RolloutProfile,
) -> tuple[RolloutState, list[Action]]:
    """Hold; when starved past the grace period, apply the profile's starvation action."""
    if not starving:
        new = dataclasses.replace(state, starving_since=None, starvation_acted_at=None)
        return new, [RecordDecision("hold", reason, details)]
    since = state.starving_since if state.starving_since is not None else now
    new = dataclasses.replace(state, starving_since=since)
    action = profile.starvation_action
    if now - since < profile.starvation_grace_s or action == "hold":
        return new, [RecordDecision("hold", reason, details)]
    starved = f"starved for {now - since:.0f}s (grace {profile.starvation_grace_s:.0f}s): {reason}"
    if action == "rollback":
        return rollback(new, now, starved, details)
    if action == "pause":
        paused = dataclasses.replace(new, status=Status.PAUSED)
        return paused, [RaiseAlert(starved), RecordDecision("pause", starved, details)]
    # "alert": keep holding, alert once per starvation episode.
    actions: list[Action] = [RecordDecision("hold", starved, details)]
    if state.starvation_acted_at is None:
        new = dataclasses.replace(new, starvation_acted_at=now)
        actions.insert(0, RaiseAlert(starved))
    return new, actions


# --- evaluation of a tick -----------------------------------------------------------------

Details = dict[str, float | int | str]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the data says on one tick, before starvation handling."""

    kind: str  # hold | advance | promote | rollback
    reason: str
    details: Details
    starving: bool = False


def _primary_alternatives(state: RolloutState) -> tuple[Alternative, Alternative]:
    """(alternative meaning "worse", alternative meaning "better") for the primary metric."""
    return ("less", "greater") if state.higher_is_better else ("greater", "less")


def _check_srm(state: RolloutState, obs: Observation, profile: RolloutProfile) -> Verdict | None:
    units = obs.units
    srm = srm_test(
        units.baseline,
        units.candidate,
        state.weight,
        alpha=profile.srm_alpha,
        min_expected=profile.srm_min_expected,
    )
    if not srm.mismatch:
        return None
    total = units.baseline + units.candidate
    reason = (
        f"sample ratio mismatch: {units.candidate} of {total} units in the candidate, "
        f"intended {state.weight:.0%} (chi2 {srm.chi2:.1f})"
    )
    return Verdict("rollback", reason, {"srm_chi2": srm.chi2, "srm_fixed_p": srm.fixed_p_value})


def _check_primary(
    state: RolloutState, obs: Observation, profile: RolloutProfile, details: Details
) -> Verdict | None:
    worse_alt, _ = _primary_alternatives(state)
    res = compare_means(
        obs.primary,
        alpha=profile.alpha_worse,
        min_samples=profile.min_samples_for_test,
        mde_sd=profile.mde_sd,
        alternative=worse_alt,
    )
    details.update(primary_diff=res.estimate, primary_p_worse=res.p_value)
    details.update(n_baseline=res.n_baseline, n_candidate=res.n_candidate)
    if not res.reject:
        return None
    reason = (
        f"{state.primary_metric} significantly worse: candidate − baseline "
        f"{res.estimate:+.4f} (always-valid p {res.p_value:.4f} < {profile.alpha_worse})"
    )
    return Verdict("rollback", reason, details)


def _guard(
    strata: tuple[Stratum, ...], margin: float, pooled: bool, profile: RolloutProfile
) -> SequentialResult:
    """One-sided guardrail test: H0 "candidate − baseline ≤ margin"."""
    return compare_means(
        strata,
        alpha=profile.guardrail_alpha,
        min_samples=profile.min_samples_for_test,
        mde_sd=profile.mde_sd,
        margin=margin,
        alternative="greater",
        pooled=pooled,
    )


def _check_guardrails(obs: Observation, profile: RolloutProfile, details: Details) -> str | None:
    """Reason of the first breached guardrail (latency, errors, cost), or None."""
    latency = _guard(obs.log_latency, math.log(profile.max_latency_ratio), False, profile)
    details["latency_ratio"] = math.exp(latency.estimate)
    if latency.reject:
        return (
            f"latency guardrail: candidate/baseline geometric-mean latency "
            f"{math.exp(latency.estimate):.3f}, significantly above {profile.max_latency_ratio} "
            f"(p {latency.p_value:.4f})"
        )
    # Errors are Bernoulli: pooled (null) variance, see stats.py.
    errors = _guard(obs.errors, profile.max_error_rate_increase, True, profile)
    details["error_rate_diff"] = errors.estimate
    if errors.reject:
        return (
            f"error-rate guardrail: candidate − baseline {errors.estimate:+.4f}, "
            f"significantly above {profile.max_error_rate_increase} (p {errors.p_value:.4f})"
        )
    n_base = sum(s.baseline.n for s in obs.cost)
    base_mean = sum(s.baseline.total for s in obs.cost) / n_base if n_base else 0.0
    cost = _guard(obs.cost, (profile.max_cost_ratio - 1.0) * base_mean, False, profile)
    details["cost_diff"] = cost.estimate
    if cost.reject:
        return (
            f"cost guardrail: candidate − baseline cost per request {cost.estimate:+.6f}, "
            f"significantly above {profile.max_cost_ratio - 1.0:.0%} of baseline "
            f"(p {cost.p_value:.4f})"
        )
    return None


def _current_samples(state: RolloutState, obs: Observation) -> tuple[int, int]:
    """Primary-metric samples per arm (baseline, candidate) in the current step."""
    current = [s for s in obs.primary if s.step == state.step_index]
    return sum(s.baseline.n for s in current), sum(s.candidate.n for s in current)


def _completion(
    state: RolloutState, obs: Observation, profile: RolloutProfile, details: Details
) -> Verdict:
    """The step's time and samples are in and nothing argued against it: move on."""
    last = len(profile.steps) - 1
    if profile.promote_requires_win:
        if has_significant_result(obs, profile, higher_is_better=state.higher_is_better):
            return Verdict("promote", "candidate significantly better (experiment won)", details)
        return Verdict("hold", "experiment: no significant result yet", details)
    nxt = state.step_index + 1
    if state.step_index == last or (nxt == last and profile.steps[nxt].weight >= 1.0):
        return Verdict("promote", "last step completed without regression", details)
    return Verdict(
        "advance",
        f"step {state.step_index} ({state.weight:.0%}) completed; "
        f"advancing to {profile.steps[nxt].weight:.0%}",
        details,
    )


def evaluate(state: RolloutState, obs: Observation, now: float, profile: RolloutProfile) -> Verdict:
    """Decide on one tick of a running rollout (see the module docstring for the order)."""
    srm = _check_srm(state, obs, profile)
    if srm is not None:
        return srm
    details: Details = {}
    primary = _check_primary(state, obs, profile, details)
    if primary is not None:
        return primary
    breach = _check_guardrails(obs, profile, details)
    if breach is not None:
        return Verdict("rollback", breach, details)
    plan = profile.steps[state.step_index]
    started = state.step_started_at if state.step_started_at is not None else now
    elapsed = now - started
    n_b, n_c = _current_samples(state, obs)
    details.update(step_elapsed_s=elapsed, step_n_baseline=n_b, step_n_candidate=n_c)
    if min(n_b, n_c) < plan.min_samples_per_arm:
        reason = (
            f"too few samples in step {state.step_index}: baseline {n_b}, candidate {n_c}, "
            f"need {plan.min_samples_per_arm} per arm"
        )
        return Verdict("hold", reason, details, starving=elapsed >= plan.min_duration_s)
    if elapsed < plan.min_duration_s:
        reason = f"step time not in: {elapsed:.0f}s of {plan.min_duration_s:.0f}s"
        return Verdict("hold", reason, details)
    return _completion(state, obs, profile, details)


def _primary_test(
    obs: Observation, profile: RolloutProfile, alternative: Alternative, alpha: float
) -> SequentialResult:
    return compare_means(
        obs.primary,
        alpha=alpha,
        min_samples=profile.min_samples_for_test,
        mde_sd=profile.mde_sd,
        alternative=alternative,
    )


def winner(
    obs: Observation, profile: RolloutProfile, *, higher_is_better: bool = True
) -> Literal["candidate", "baseline"] | None:
    """The arm that is significantly better on the primary metric, if any (always valid)."""
    better: Alternative = "greater" if higher_is_better else "less"
    worse: Alternative = "less" if higher_is_better else "greater"
    if _primary_test(obs, profile, better, profile.alpha_better).reject:
        return "candidate"
    if _primary_test(obs, profile, worse, profile.alpha_worse).reject:
        return "baseline"
    return None


def has_significant_result(
    obs: Observation, profile: RolloutProfile, *, higher_is_better: bool = True
) -> bool:
    """True when the candidate is significantly better (``winner`` is the candidate)."""
    return winner(obs, profile, higher_is_better=higher_is_better) == "candidate"
