"""What the data says on one tick of a running rollout (pure, no I/O).

:func:`evaluate` turns an :class:`Observation` into a :class:`Verdict`; the state machine
(:mod:`.machine`) turns the verdict into a transition. Decision order, first match wins:

1. a test of :data:`.catalog.CATALOG` rejects, in catalog order: sample ratio mismatch in
   the current step, primary metric significantly worse (cluster-robust mSPRT over the
   steps), a guardrail breached beyond its non-inferiority margin (latency, errors, cost)
   → rollback; judge drift (the candidate pleases the rollout's evaluator more than
   people, beyond a margin) → pause, with ``paused_by`` in the details;
4. too few primary samples in an arm of the current step → hold (``starving`` once the
   step's minimum time is in);
5. step time not in → hold;
6. the step is complete: advance; at the last test step promote, or — when a win is
   required — promote on a significant win, end as ``no_improvement`` at the horizon
   (``require_win`` rollouts only), else hold.

Every test here is always valid at the alpha the profile allocates to it, so the chance
that an equal candidate is rolled back for any reason is at most the profile's
``rollback_alpha`` (see :class:`~.profiles.RolloutProfile`; a judge-drift pause counts in it
too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .catalog import (
    CATALOG,
    PRIMARY,
    ArmCounts,
    Details,
    Limits,
    Metric,
    MetricSpec,
    Observation,
    alternatives,
    as_clustered,
    primary_test,
)
from .profiles import RolloutProfile
from .state import RolloutState

__all__ = [
    "ArmCounts",
    "Details",
    "Metric",
    "Observation",
    "Verdict",
    "as_clustered",
    "evaluate",
    "has_significant_result",
    "limits",
    "winner",
]

VerdictKind = Literal["hold", "advance", "promote", "rollback", "pause", "no_improvement"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the data says on one tick, before starvation handling."""

    kind: VerdictKind
    reason: str
    details: Details
    starving: bool = False


def limits(
    spec: MetricSpec,
    profile: RolloutProfile,
    *,
    weight: float = 0.0,
    primary_metric: str = "primary",
    higher_is_better: bool = True,
) -> Limits:
    """What ``spec``'s check reads from ``profile`` (and the rollout's context)."""
    return Limits(
        alpha=profile.test_alpha(spec),
        values={name: float(getattr(profile, name)) for name in (*spec.margins, *spec.settings)},
        min_samples=profile.min_samples_for_test,
        mde_sd=profile.mde_sd,
        weight=weight,
        primary_metric=primary_metric,
        higher_is_better=higher_is_better,
    )


def _state_limits(spec: MetricSpec, state: RolloutState, profile: RolloutProfile) -> Limits:
    return limits(
        spec,
        profile,
        weight=state.weight,
        primary_metric=state.primary_metric,
        higher_is_better=state.higher_is_better,
    )


def _breach(
    state: RolloutState, obs: Observation, profile: RolloutProfile, details: Details
) -> tuple[MetricSpec, str] | None:
    """The first test of the catalog that rejects and why, or None."""
    for spec in CATALOG:
        reason = spec.check(obs, _state_limits(spec, state, profile), details)
        if reason is not None:
            return spec, reason
    return None


def _current_samples(state: RolloutState, obs: Observation) -> tuple[int, int]:
    """Primary-metric samples per arm (baseline, candidate) in the current step."""
    primary = as_clustered(obs.metric(PRIMARY.name))
    n_b = n_c = 0
    for step, (base, cand) in zip(primary.steps, primary.moments, strict=True):
        if step == state.step_index:
            n_b, n_c = n_b + base.n, n_c + cand.n
    return n_b, n_c


def _completion(
    state: RolloutState,
    obs: Observation,
    profile: RolloutProfile,
    details: Details,
    samples: int,
) -> Verdict:
    """The step's time and samples are in and nothing argued against it: move on."""
    last = profile.last_test_step
    if state.step_index < last:
        nxt = profile.steps[state.step_index + 1].weight
        reason = f"step {state.step_index} ({state.weight:.0%}) completed; advancing to {nxt:.0%}"
        return Verdict("advance", reason, details)
    if not (state.require_win or profile.promote_requires_win):
        return Verdict("promote", "last step completed without regression", details)
    _, better = alternatives(state.higher_is_better)
    win = primary_test(obs, _state_limits(PRIMARY, state, profile), better, profile.alpha_better)
    details["primary_p_better"] = win.p_value
    if win.reject:
        reason = (
            f"candidate significantly better on {state.primary_metric}: "
            f"{win.estimate:+.4f} (always-valid p {win.p_value:.4f} < {profile.alpha_better})"
        )
        return Verdict("promote", reason, details)
    elapsed = float(details.get("step_elapsed_s", 0.0))
    horizon = elapsed >= profile.win_max_duration_s or samples >= profile.win_max_samples_per_arm
    if state.require_win and horizon:
        reason = (
            f"no significant win by the horizon ({elapsed:.0f}s of "
            f"{profile.win_max_duration_s:.0f}s, {samples} of "
            f"{profile.win_max_samples_per_arm} samples per arm in the last step): "
            f"{state.primary_metric} {win.estimate:+.4f}, always-valid p {win.p_value:.3f}"
        )
        return Verdict("no_improvement", reason, details)
    return Verdict("hold", "waiting for a significant win", details)


def evaluate(state: RolloutState, obs: Observation, now: float, profile: RolloutProfile) -> Verdict:
    """Decide on one tick of a running rollout (see the module docstring for the order)."""
    details: Details = {}
    breach = _breach(state, obs, profile, details)
    if breach is not None:
        spec, reason = breach
        if spec.action == "pause":
            details["paused_by"] = spec.name
            return Verdict("pause", reason, details)
        return Verdict("rollback", reason, details)
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
    return _completion(state, obs, profile, details, min(n_b, n_c))


def winner(
    obs: Observation, profile: RolloutProfile, *, higher_is_better: bool = True
) -> Literal["candidate", "baseline"] | None:
    """The arm that is significantly better on the primary metric, if any (always valid)."""
    worse, better = alternatives(higher_is_better)
    primary = limits(PRIMARY, profile, higher_is_better=higher_is_better)
    if primary_test(obs, primary, better, profile.alpha_better).reject:
        return "candidate"
    if primary_test(obs, primary, worse, primary.alpha).reject:
        return "baseline"
    return None


def has_significant_result(
    obs: Observation, profile: RolloutProfile, *, higher_is_better: bool = True
) -> bool:
    """True when the candidate is significantly better (``winner`` is the candidate)."""
    return winner(obs, profile, higher_is_better=higher_is_better) == "candidate"
