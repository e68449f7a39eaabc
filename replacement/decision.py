"""What the data says on one tick of a running rollout (pure, no I/O).

:func:`evaluate` turns an :class:`Observation` into a :class:`Verdict`; the state machine
(:mod:`.machine`) turns the verdict into a transition. Decision order, first match wins:

1. sample ratio mismatch in the current step → rollback;
2. primary metric significantly worse (cluster-robust mSPRT over the steps) → rollback;
3. a guardrail breached beyond its non-inferiority margin (latency, errors, cost) →
   rollback;
4. too few primary samples in an arm of the current step → hold (``starving`` once the
   step's minimum time is in);
5. step time not in → hold;
6. the step is complete: advance; at the last test step promote, or — when a win is
   required — promote on a significant win, end as ``no_improvement`` at the horizon
   (``require_win`` rollouts only), else hold.

Every test here is always valid at the alpha the profile allocates to it, so the chance
that an equal candidate is rolled back for any reason is at most the profile's
``rollback_alpha`` (see :class:`~.profiles.RolloutProfile`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .clustered import ClusteredSample, compare_clustered
from .profiles import RolloutProfile
from .rates import rate_ratio_test
from .stats import Alternative, SequentialResult, Stratum, compare_means, srm_test

if TYPE_CHECKING:
    from .machine import RolloutState

__all__ = [
    "ArmCounts",
    "Details",
    "Metric",
    "Observation",
    "Verdict",
    "as_clustered",
    "evaluate",
    "has_significant_result",
    "winner",
]

Metric = ClusteredSample | tuple[Stratum, ...]
"""A metric's data: cluster-robust statistics, or plain strata of independent samples."""

Details = dict[str, float | int | str]


@dataclass(frozen=True, slots=True)
class ArmCounts:
    """Distinct units (or requests) per arm in the current step, for the SRM check."""

    baseline: int = 0
    candidate: int = 0


@dataclass(frozen=True, slots=True)
class Observation:
    """What the controller measured, stratified by the rollout step of each *call*.

    - ``primary``: the primary metric per sample (feedback score joined to its call,
      success 0/1 or quality); higher is better unless the state says otherwise;
    - ``log_latency``: ``ln(latency)`` per request;
    - ``cost``: cost per request;
    - ``errors``: per request 1 for an error, else 0, as plain strata (the rate test
      conditions on the counts, see :mod:`.rates`).

    ``primary``, ``log_latency`` and ``cost`` are :class:`ClusteredSample` s (clustered by
    unit) or, for independent samples, tuples of :class:`Stratum`. ``units`` and
    ``requests`` count the current step only; the SRM check uses ``units``.
    """

    primary: Metric = ()
    log_latency: Metric = ()
    errors: tuple[Stratum, ...] = ()
    cost: Metric = ()
    units: ArmCounts = ArmCounts()
    requests: ArmCounts = ArmCounts()


VerdictKind = Literal["hold", "advance", "promote", "rollback", "no_improvement"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the data says on one tick, before starvation handling."""

    kind: VerdictKind
    reason: str
    details: Details
    starving: bool = False


def as_clustered(metric: Metric) -> ClusteredSample:
    """A metric as cluster-robust statistics (plain strata: one cluster per sample)."""
    if isinstance(metric, ClusteredSample):
        return metric
    return ClusteredSample.from_strata(metric)


def _alternatives(higher_is_better: bool) -> tuple[Alternative, Alternative]:
    """(alternative meaning "worse", alternative meaning "better") for the primary metric."""
    return ("less", "greater") if higher_is_better else ("greater", "less")


def _primary_test(
    obs: Observation, profile: RolloutProfile, alternative: Alternative, alpha: float
) -> SequentialResult:
    return compare_clustered(
        as_clustered(obs.primary),
        alpha=alpha,
        min_samples=profile.min_samples_for_test,
        mde_sd=profile.mde_sd,
        alternative=alternative,
        pooled=True,
    )


def _check_srm(state: RolloutState, obs: Observation, profile: RolloutProfile) -> Verdict | None:
    units = obs.units
    srm = srm_test(
        units.baseline,
        units.candidate,
        state.weight,
        alpha=profile.srm_step_alpha,
        min_expected=profile.srm_min_expected,
    )
    if not srm.mismatch:
        return None
    total = units.baseline + units.candidate
    reason = (
        f"sample ratio mismatch: {units.candidate} of {total} units in the candidate, "
        f"intended {state.weight:.0%} (chi2 {srm.chi2:.1f}, always-valid p "
        f"{math.exp(-srm.log_lr):.2g} < {profile.srm_step_alpha:.2g})"
    )
    return Verdict("rollback", reason, {"srm_chi2": srm.chi2, "srm_fixed_p": srm.fixed_p_value})


def _check_primary(
    state: RolloutState, obs: Observation, profile: RolloutProfile, details: Details
) -> Verdict | None:
    worse, _ = _alternatives(state.higher_is_better)
    res = _primary_test(obs, profile, worse, profile.alpha_worse)
    details.update(
        primary_diff=res.estimate,
        primary_se=res.se,
        primary_p_worse=res.p_value,
        n_baseline=res.n_baseline,
        n_candidate=res.n_candidate,
    )
    if not res.reject:
        return None
    reason = (
        f"{state.primary_metric} significantly worse: candidate − baseline "
        f"{res.estimate:+.4f} (always-valid p {res.p_value:.4f} < {profile.alpha_worse})"
    )
    return Verdict("rollback", reason, details)


def _check_latency(obs: Observation, profile: RolloutProfile, details: Details) -> str | None:
    res = compare_clustered(
        as_clustered(obs.log_latency),
        alpha=profile.latency_alpha,
        min_samples=profile.min_samples_for_test,
        mde_sd=profile.mde_sd,
        margin=math.log(profile.max_latency_ratio),
        alternative="greater",
    )
    ratio = math.exp(res.estimate)
    details.update(latency_ratio=ratio, latency_p=res.p_value)
    if not res.reject:
        return None
    return (
        f"latency guardrail: candidate/baseline geometric-mean latency {ratio:.3f}, "
        f"significantly above the margin {profile.max_latency_ratio} "
        f"(always-valid p {res.p_value:.4f} < {profile.latency_alpha})"
    )


def _check_errors(obs: Observation, profile: RolloutProfile, details: Details) -> str | None:
    """Intersection–union test: the ratio (exact) and the increase must both be shown."""
    rel = rate_ratio_test(
        obs.errors,
        alpha=profile.error_alpha,
        margin_ratio=profile.max_error_rate_ratio,
        min_expected=profile.min_expected_errors,
    )
    details.update(
        error_rate_baseline=rel.rate_baseline,
        error_rate_candidate=rel.rate_candidate,
        error_rate_ratio=rel.ratio if math.isfinite(rel.ratio) else 1e9,
        error_p_ratio=rel.p_value,
        error_expected=rel.expected,
    )
    if not rel.reject:
        return None
    absolute = compare_means(
        obs.errors,
        alpha=profile.error_alpha,
        min_samples=profile.min_samples_for_test,
        mde_sd=profile.mde_sd,
        margin=profile.max_error_rate_increase,
        alternative="greater",
        pooled=True,
    )
    details["error_p_increase"] = absolute.p_value
    if not absolute.reject:
        return None
    return (
        f"error-rate guardrail: candidate {rel.rate_candidate:.4f} vs baseline "
        f"{rel.rate_baseline:.4f}, significantly above both {profile.max_error_rate_ratio}× "
        f"(exact p {rel.p_value:.4f}) and +{profile.max_error_rate_increase} "
        f"(p {absolute.p_value:.4f}), at alpha {profile.error_alpha}"
    )


def _check_cost(obs: Observation, profile: RolloutProfile, details: Details) -> str | None:
    sample = as_clustered(obs.cost)
    res = compare_clustered(
        sample,
        alpha=profile.cost_alpha,
        min_samples=profile.min_samples_for_test,
        mde_sd=profile.mde_sd,
        ratio=profile.max_cost_ratio,
        alternative="greater",
    )
    base, cand = sample.arm_totals()
    ratio = cand.mean / base.mean if base.mean > 0 else 1.0
    details.update(cost_ratio=ratio, cost_p=res.p_value)
    if not res.reject:
        return None
    return (
        f"cost guardrail: candidate/baseline cost per request {ratio:.3f}, significantly "
        f"above the margin {profile.max_cost_ratio} "
        f"(always-valid p {res.p_value:.4f} < {profile.cost_alpha})"
    )


def _check_guardrails(obs: Observation, profile: RolloutProfile, details: Details) -> str | None:
    """Reason of the first breached guardrail (latency, errors, cost), or None."""
    for check in (_check_latency, _check_errors, _check_cost):
        breach = check(obs, profile, details)
        if breach is not None:
            return breach
    return None


def _current_samples(state: RolloutState, obs: Observation) -> tuple[int, int]:
    """Primary-metric samples per arm (baseline, candidate) in the current step."""
    primary = as_clustered(obs.primary)
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
    _, better = _alternatives(state.higher_is_better)
    win = _primary_test(obs, profile, better, profile.alpha_better)
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
    return _completion(state, obs, profile, details, min(n_b, n_c))


def winner(
    obs: Observation, profile: RolloutProfile, *, higher_is_better: bool = True
) -> Literal["candidate", "baseline"] | None:
    """The arm that is significantly better on the primary metric, if any (always valid)."""
    worse, better = _alternatives(higher_is_better)
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
