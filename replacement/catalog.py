"""The rollout's metrics and checks, each declared once here (pure, no I/O).

A :class:`MetricSpec` is everything about one test of a rollout: its ``kind``; what it is
observed from (a call, or the feedback joined to a call); whether its variance is
cluster-robust by unit; its test (``check``, the statistic and its reason); the profile
fields it reads, that is its share of the error budget (``alpha``), its non-inferiority
margins and other thresholds; and how it is shown in a rollout's arms. The rest derives
from :data:`CATALOG`:

- the accumulator (:mod:`.observations`) keeps one running aggregate per metric with
  cells, per (step, arm), fed by ``observe`` and the feedback joins; it snapshots them by
  name and hands them to the machine as an :class:`Observation`;
- :func:`.decision.evaluate` runs every check in catalog order, and the first breach
  rolls back;
- the profile's error budget (:class:`~.profiles.RolloutProfile`) is the sum of every
  spec's ``alpha``, which must stay within ``alpha_total``; its ``budget()`` and
  ``margins()`` (shown by the API) list them;
- a rollout's ``arms`` in ``GET /v1/rollouts/{id}`` show each metric by its ``show``;
- each metric's regression adjustment (CUPED, :mod:`.adjustment`) is declared with it:
  ``adjust`` names the :data:`COVARIATES` it is adjusted on, ``history`` the unit's
  pre-period figure the ``history`` covariate reads (:mod:`.history`); the accumulator
  keeps the covariates' sums in the metric's cells, and the check reports the variance
  reduction it achieved (``<name>_variance_reduction`` in its details, shown by the API
  and as ``promptd_rollout_variance_reduction``).

**Adding a metric**: write its statistic (:mod:`.stats`, :mod:`.clustered`,
:mod:`.rates`, :mod:`.adjustment`), add its spec to :data:`CATALOG` (in decision order),
name the covariates it may be adjusted on (only :data:`COVARIATES`: each one documents why
the variant cannot change it), and add the fields
the spec names to :class:`~.profiles.RolloutProfile`, its configuration (a default, and
the value of each built-in profile). Its alpha then counts in the budget of every profile
(a profile whose alphas exceed ``alpha_total`` is refused), and the tests in
``tests/unit/test_catalog.py`` fail while a profile's ``*_alpha`` field is not some
spec's. A snapshot of the accumulator built with other metrics is not loaded (the rollout
replays from storage instead).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

from .adjustment import Adjustment, compare
from .clustered import ClusteredSample, compare_clustered
from .rates import design_effect, rate_ratio_test
from .stats import Alternative, Moments, SequentialResult, Stratum, srm_test

__all__ = [
    "CATALOG",
    "CELL_METRICS",
    "COVARIATES",
    "NOT_COVARIATES",
    "PRIMARY",
    "Action",
    "ArmCounts",
    "CallFacts",
    "Covariate",
    "Details",
    "Limits",
    "Metric",
    "MetricSpec",
    "Observation",
    "alternatives",
    "as_clustered",
    "primary_test",
]

Metric = ClusteredSample | tuple[Stratum, ...]
"""A metric's data: cluster-robust statistics, or plain strata of independent samples."""

Details = dict[str, float | int | str]

Kind = Literal["sample_ratio", "primary", "guardrail", "rate_guardrail", "judge_drift"]
"""``sample_ratio``: the observed split against the intended one; ``primary``: the primary
metric, rolled back when significantly worse; ``guardrail``: a non-inferiority test of a
mean beyond a margin; ``rate_guardrail``: the same for a rare-event rate (exact at low
counts); ``judge_drift``: the candidate pleases the rollout's evaluator more than it
pleases people, beyond a margin (paused, not rolled back)."""

Action = Literal["rollback", "pause"]
"""What a test that rejects does to the rollout."""

# Latencies below 1 µs are clamped before the log so a 0 ms call does not yield -inf.
_MIN_LATENCY_MS: Final = 1e-3


@dataclass(frozen=True, slots=True)
class ArmCounts:
    """Distinct units (or requests) per arm in the current step, for the SRM check."""

    baseline: int = 0
    candidate: int = 0


@dataclass(frozen=True, slots=True, init=False)
class Observation:
    """What the controller measured, stratified by the rollout step of each *call*.

    ``metrics`` holds one datum per metric with cells in :data:`CATALOG`, by name, also
    read as attributes: ``obs.primary`` (the primary metric per sample: feedback score
    joined to its call, success 0/1 or quality), ``obs.log_latency`` (``ln(latency)`` per
    request), ``obs.errors`` (per request 1 for an error, else 0, as plain strata: the rate
    test conditions on the counts, see :mod:`.rates`), ``obs.cost`` (cost per request).
    Each is a :class:`ClusteredSample` (clustered by unit) or a tuple of :class:`Stratum`
    (independent samples); a metric not given has no data. ``units`` and ``requests``
    count the current step only; the SRM check uses ``units``.

    Built with the metrics by name, ``Observation(primary=..., errors=..., units=...)``,
    or as a mapping (``metrics=``); an unknown name is refused.
    """

    metrics: Mapping[str, Metric]
    units: ArmCounts
    requests: ArmCounts

    def __init__(
        self,
        *,
        units: ArmCounts = ArmCounts(),
        requests: ArmCounts = ArmCounts(),
        metrics: Mapping[str, Metric] | None = None,
        **named: Metric,
    ) -> None:
        given = {**(metrics or {}), **named}
        unknown = sorted(set(given) - set(CELL_METRICS))
        if unknown:
            raise TypeError(f"unknown rollout metric(s) {unknown}; known: {list(CELL_METRICS)}")
        # Frozen: the fields are set once, here.
        object.__setattr__(self, "metrics", {n: given.get(n, ()) for n in CELL_METRICS})
        object.__setattr__(self, "units", units)
        object.__setattr__(self, "requests", requests)

    def metric(self, name: str) -> Metric:
        """The data of the metric ``name`` (a spec of :data:`CATALOG` with cells)."""
        return self.metrics[name]

    def __getattr__(self, name: str) -> Metric:
        # Only reached for names that are not fields: the metrics, by name.
        try:
            return object.__getattribute__(self, "metrics")[name]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(f"Observation has no metric {name!r}") from None


class CallFacts(NamedTuple):
    """What a call tells the metrics observed per call (and the per-call covariates)."""

    latency_ms: float
    success: bool
    quality: float | None
    cost_usd: float | None
    input_chars: int | None = None


@dataclass(frozen=True, slots=True)
class Covariate:
    """A pre-treatment covariate a metric may be regression-adjusted on (CUPED).

    Only a quantity the variant cannot change may be one: the adjustment subtracts
    ``θ·(x̄_candidate − x̄_baseline)``, which is zero in expectation only when routing alone
    decides the arm a value lands in. ``pre_treatment`` says why that holds. ``of_call``
    reads it from a call; ``None`` means the unit's figure from before the rollout (the
    spec's ``history`` names which, see :mod:`.history`).
    """

    name: str
    pre_treatment: str
    of_call: Callable[[CallFacts], float | None] | None = None


def _log_input_chars(call: CallFacts) -> float | None:
    return None if call.input_chars is None else math.log1p(call.input_chars)


def _input_chars(call: CallFacts) -> float | None:
    return None if call.input_chars is None else float(call.input_chars)


COVARIATES: Final[Mapping[str, Covariate]] = {
    c.name: c
    for c in (
        Covariate(
            "history",
            "the unit's figure of the same metric over the lookback before the rollout "
            "started, from events stored before it started: no variant of the rollout "
            "had served the unit then",
        ),
        Covariate(
            "log_input_chars",
            "ln(1 + input_chars): the size of what the app passed in for the call (the "
            "user's message, the document), counted by the SDK from the call's arguments "
            "before the variant is chosen; the prompt template is not in it",
            _log_input_chars,
        ),
        Covariate(
            "input_chars", "the same size, not logged (cost grows linearly with it)", _input_chars
        ),
    )
}
"""Every covariate a metric may be adjusted on, and why the variant cannot change it."""

NOT_COVARIATES: Final[Mapping[str, str]] = {
    "tokens_in": "counts the prompt template and its examples, which the variant changes",
    "tokens_out": "the answer's length: an outcome of the variant",
    "latency_ms, success, quality, cost_usd, feedback": "outcomes of the call itself",
    "input (captured payload)": "capped at 32 KB and only sent when the app opts in; "
    "its size is input_chars",
}
"""Fields of a call that look like covariates but are not pre-treatment, and why."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What a check reads: its alpha (per step for a per-step test), the profile's values
    of the fields its spec names, the shared test settings and the rollout's context."""

    alpha: float
    values: Mapping[str, float]
    min_samples: int
    mde_sd: float
    weight: float
    primary_metric: str
    higher_is_better: bool


Check = Callable[[Observation, Limits, Details], "str | None"]
"""A test: adds its figures to the details; returns why it rolls back, or None."""
Observe = Callable[[CallFacts], "float | None"]
"""The value of one call (None: nothing observed)."""
Show = Callable[[Moments], "dict[str, float | int | None]"]
"""An arm's totals of the metric as ``GET /v1/rollouts/{id}`` shows them."""


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One test of a rollout, declared once (see the module doc).

    ``alpha``, ``margins`` and ``settings`` name :class:`~.profiles.RolloutProfile` fields:
    its share of the rollback budget (split evenly over the test steps when ``per_step``),
    the non-inferiority margins the API lists, and other thresholds the check reads.
    A spec with ``observe``, ``feedback`` or ``paired`` has cells in the accumulator:
    ``observe(primary_metric)`` gives the function of a call's value (None when no call
    is a value of it for that primary metric), ``feedback(primary_metric)`` says whether
    the feedback joined to a call counts as a value of the call's cell, ``paired`` that
    the value is a call's evaluator score minus people's score. ``action`` is what a
    rejection does: roll back (the default) or pause the rollout.

    ``adjust`` names the :data:`COVARIATES` its test is regression-adjusted on (CUPED,
    :mod:`.adjustment`); ``history(primary_metric)`` names the unit's pre-period figure
    (a column of :data:`.history.FIGURES`) the ``history`` covariate reads.
    """

    name: str
    kind: Kind
    budget: str
    alpha: str
    check: Check
    margins: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()
    per_step: bool = False
    observe: Callable[[str], Observe | None] | None = None
    feedback: Callable[[str], bool] | None = None
    clustered: bool = True
    show: Show | None = None
    #: Fed by the accumulator's paired scores of a call (the evaluator's minus people's).
    paired: bool = False
    action: Action = "rollback"
    adjust: tuple[str, ...] = ()
    history: Callable[[str], str | None] | None = None

    @property
    def has_cells(self) -> bool:
        """Whether the accumulator keeps this metric per (step, arm)."""
        return self.observe is not None or self.feedback is not None or self.paired

    @property
    def fields(self) -> tuple[str, ...]:
        """Every profile field the spec names."""
        return (self.alpha, *self.margins, *self.settings)

    def __post_init__(self) -> None:
        unknown = [name for name in self.adjust if name not in COVARIATES]
        if unknown:
            raise ValueError(
                f"metric {self.name!r} adjusts on unknown covariates {unknown}; "
                f"known: {sorted(COVARIATES)}"
            )
        if "history" in self.adjust and self.history is None:
            raise ValueError(f"metric {self.name!r} adjusts on history without a figure")


def as_clustered(metric: Metric) -> ClusteredSample:
    """A metric as cluster-robust statistics (plain strata: one cluster per sample)."""
    if isinstance(metric, ClusteredSample):
        return metric
    return ClusteredSample.from_strata(metric)


def _as_strata(metric: Metric) -> tuple[Stratum, ...]:
    """A metric's per-step moments (the clusters left out)."""
    if isinstance(metric, ClusteredSample):
        return tuple(
            Stratum(b, c, step=s) for s, (b, c) in zip(metric.steps, metric.moments, strict=True)
        )
    return metric


def alternatives(higher_is_better: bool) -> tuple[Alternative, Alternative]:
    """(alternative meaning "worse", alternative meaning "better") for the primary metric."""
    return ("less", "greater") if higher_is_better else ("greater", "less")


def primary_test(
    obs: Observation, limits: Limits, alternative: Alternative, alpha: float
) -> SequentialResult:
    """The primary metric's always-valid test in one direction at ``alpha``."""
    return _primary(obs, limits, alternative, alpha)[0]


def _primary(
    obs: Observation, limits: Limits, alternative: Alternative, alpha: float
) -> tuple[SequentialResult, Adjustment | None]:
    return compare(
        as_clustered(obs.metric("primary")),
        alpha=alpha,
        min_samples=limits.min_samples,
        mde_sd=limits.mde_sd,
        alternative=alternative,
        pooled=True,
    )


def _adjusted(details: Details, name: str, adjustment: Adjustment | None) -> None:
    """Record what the regression adjustment of metric ``name`` achieved."""
    if adjustment is None:
        return
    details[f"{name}_variance_reduction"] = adjustment.variance_reduction
    for covariate, slope in zip(adjustment.names, adjustment.theta, strict=True):
        details[f"{name}_theta_{covariate}"] = slope


# --- the checks ---------------------------------------------------------------------------


def _check_srm(obs: Observation, limits: Limits, details: Details) -> str | None:
    units = obs.units
    srm = srm_test(
        units.baseline,
        units.candidate,
        limits.weight,
        alpha=limits.alpha,
        min_expected=int(limits.values["srm_min_expected"]),
    )
    if not srm.mismatch:
        return None
    details.update(srm_chi2=srm.chi2, srm_fixed_p=srm.fixed_p_value)
    total = units.baseline + units.candidate
    return (
        f"sample ratio mismatch: {units.candidate} of {total} units in the candidate, "
        f"intended {limits.weight:.0%} (chi2 {srm.chi2:.1f}, always-valid p "
        f"{math.exp(-srm.log_lr):.2g} < {limits.alpha:.2g})"
    )


def _check_primary(obs: Observation, limits: Limits, details: Details) -> str | None:
    worse, _ = alternatives(limits.higher_is_better)
    res, adjustment = _primary(obs, limits, worse, limits.alpha)
    _adjusted(details, "primary", adjustment)
    details.update(
        primary_diff=res.estimate,
        primary_se=res.se,
        primary_p_worse=res.p_value,
        n_baseline=res.n_baseline,
        n_candidate=res.n_candidate,
    )
    if not res.reject:
        return None
    return (
        f"{limits.primary_metric} significantly worse: candidate − baseline "
        f"{res.estimate:+.4f} (always-valid p {res.p_value:.4f} < {limits.alpha})"
    )


def _check_latency(obs: Observation, limits: Limits, details: Details) -> str | None:
    max_ratio = limits.values["max_latency_ratio"]
    res, adjustment = compare(
        as_clustered(obs.metric("log_latency")),
        alpha=limits.alpha,
        min_samples=limits.min_samples,
        mde_sd=limits.mde_sd,
        margin=math.log(max_ratio),
        alternative="greater",
    )
    _adjusted(details, "log_latency", adjustment)
    ratio = math.exp(res.estimate)
    details.update(latency_ratio=ratio, latency_p=res.p_value)
    if not res.reject:
        return None
    return (
        f"latency guardrail: candidate/baseline geometric-mean latency {ratio:.3f}, "
        f"significantly above the margin {max_ratio} "
        f"(always-valid p {res.p_value:.4f} < {limits.alpha})"
    )


def _check_errors(obs: Observation, limits: Limits, details: Details) -> str | None:
    """Intersection–union test: the ratio (exact, counts divided by the design effect of
    clustered errors) and the increase (cluster-robust, regression-adjusted) must both be
    shown."""
    sample = as_clustered(obs.metric("errors"))
    errors = _as_strata(sample)
    max_ratio, max_increase = (
        limits.values["max_error_rate_ratio"],
        limits.values["max_error_rate_increase"],
    )
    rel = rate_ratio_test(
        errors,
        alpha=limits.alpha,
        margin_ratio=max_ratio,
        min_expected=limits.values["min_expected_errors"],
        dispersion=design_effect(sample) if sample.clusters else 1.0,
    )
    details.update(
        error_rate_baseline=rel.rate_baseline,
        error_rate_candidate=rel.rate_candidate,
        error_rate_ratio=rel.ratio if math.isfinite(rel.ratio) else 1e9,
        error_p_ratio=rel.p_value,
        error_expected=rel.expected,
        error_dispersion=rel.dispersion,
    )
    absolute, adjustment = compare(
        sample,
        alpha=limits.alpha,
        min_samples=limits.min_samples,
        mde_sd=limits.mde_sd,
        margin=max_increase,
        alternative="greater",
        pooled=True,
    )
    _adjusted(details, "errors", adjustment)
    details["error_p_increase"] = absolute.p_value
    if not (rel.reject and absolute.reject):
        return None
    return (
        f"error-rate guardrail: candidate {rel.rate_candidate:.4f} vs baseline "
        f"{rel.rate_baseline:.4f}, significantly above both {max_ratio}× "
        f"(exact p {rel.p_value:.4f}, design effect {rel.dispersion:.2f}) and "
        f"+{max_increase} (p {absolute.p_value:.4f}), at alpha {limits.alpha}"
    )


def _check_cost(obs: Observation, limits: Limits, details: Details) -> str | None:
    max_ratio = limits.values["max_cost_ratio"]
    sample = as_clustered(obs.metric("cost"))
    res, adjustment = compare(
        sample,
        alpha=limits.alpha,
        min_samples=limits.min_samples,
        mde_sd=limits.mde_sd,
        ratio=max_ratio,
        alternative="greater",
    )
    _adjusted(details, "cost", adjustment)
    base, cand = sample.arm_totals()
    ratio = cand.mean / base.mean if base.mean > 0 else 1.0
    details.update(cost_ratio=ratio, cost_p=res.p_value)
    if not res.reject:
        return None
    return (
        f"cost guardrail: candidate/baseline cost per request {ratio:.3f}, significantly "
        f"above the margin {max_ratio} "
        f"(always-valid p {res.p_value:.4f} < {limits.alpha})"
    )


def _check_judge_drift(obs: Observation, limits: Limits, details: Details) -> str | None:
    """On calls scored by both people and the rollout's evaluator, ``d`` = evaluator −
    people: the candidate's mean ``d`` above the baseline's by more than the margin means
    the evaluator likes the candidate more than people do (cluster-robust by unit)."""
    margin = limits.values["max_judge_drift"]
    sample = as_clustered(obs.metric("judge_drift"))
    res = compare_clustered(
        sample,
        alpha=limits.alpha,
        min_samples=int(limits.values["judge_drift_min_pairs"]),
        mde_sd=limits.mde_sd,
        margin=margin,
        alternative="greater",
    )
    details.update(
        judge_drift=res.estimate,
        judge_drift_p=res.p_value,
        judge_drift_pairs_baseline=res.n_baseline,
        judge_drift_pairs_candidate=res.n_candidate,
    )
    if not res.reject:
        return None
    base, cand = sample.arm_totals()
    return (
        f"judge drift: on calls scored by both, the evaluator's score minus people's is "
        f"{cand.mean:+.3f} in the candidate and {base.mean:+.3f} in the baseline "
        f"({res.n_candidate} and {res.n_baseline} calls): the candidate pleases the evaluator "
        f"more than people by {res.estimate:+.3f}, significantly above the margin {margin} "
        f"(always-valid p {res.p_value:.4f} < {limits.alpha}); paused: check the evaluator, "
        "then promote, roll back or resume"
    )


# --- how each metric is observed and shown ------------------------------------------------


def _primary_of_call(primary_metric: str) -> Observe | None:
    if primary_metric == "success_rate":
        return lambda call: 1.0 if call.success else 0.0
    if primary_metric == "quality":
        return lambda call: call.quality
    return None  # feedback_score: the joined feedback is the value


def _log_latency(call: CallFacts) -> float:
    return math.log(max(call.latency_ms, _MIN_LATENCY_MS))


def _error(call: CallFacts) -> float:
    return 0.0 if call.success else 1.0


def _cost(call: CallFacts) -> float | None:
    return call.cost_usd


def _mean(m: Moments) -> float | None:
    return m.mean if m.n else None


CATALOG: Final[tuple[MetricSpec, ...]] = (
    MetricSpec(
        name="sample_ratio",
        kind="sample_ratio",
        budget="sample_ratio",
        alpha="srm_alpha",
        # Each step's split is checked on its own: the alpha is split over the test steps.
        per_step=True,
        settings=("srm_min_expected",),
        check=_check_srm,
    ),
    MetricSpec(
        name="primary",
        kind="primary",
        budget="primary_worse",
        alpha="alpha_worse",
        check=_check_primary,
        observe=_primary_of_call,
        feedback=lambda primary_metric: primary_metric == "feedback_score",
        show=lambda m: {"primary_samples": m.n, "primary_mean": _mean(m)},
        adjust=("history",),
        # The unit's earlier figure of the rollout's primary metric.
        history=lambda primary_metric: primary_metric,
    ),
    MetricSpec(
        name="log_latency",
        kind="guardrail",
        budget="latency",
        alpha="latency_alpha",
        margins=("max_latency_ratio",),
        check=_check_latency,
        observe=lambda primary_metric: _log_latency,
        show=lambda m: {"latency_geomean_ms": math.exp(m.mean) if m.n else None},
        adjust=("history", "log_input_chars"),
        history=lambda primary_metric: "log_latency",
    ),
    MetricSpec(
        name="errors",
        kind="rate_guardrail",
        budget="errors",
        alpha="error_alpha",
        margins=("max_error_rate_ratio", "max_error_rate_increase", "min_expected_errors"),
        check=_check_errors,
        observe=lambda primary_metric: _error,
        show=lambda m: {"error_rate": _mean(m)},
        adjust=("history",),
        history=lambda primary_metric: "error_rate",
    ),
    MetricSpec(
        name="cost",
        kind="guardrail",
        budget="cost",
        alpha="cost_alpha",
        margins=("max_cost_ratio",),
        check=_check_cost,
        observe=lambda primary_metric: _cost,
        show=lambda m: {"cost_per_request": _mean(m)},
        adjust=("history", "input_chars"),
        history=lambda primary_metric: "cost",
    ),
    MetricSpec(
        name="judge_drift",
        kind="judge_drift",
        budget="judge_drift",
        alpha="judge_drift_alpha",
        margins=("max_judge_drift",),
        settings=("judge_drift_min_pairs",),
        check=_check_judge_drift,
        paired=True,
        action="pause",
        show=lambda m: {"judge_drift_pairs": m.n, "evaluator_minus_people": _mean(m)},
    ),
)
"""Every test of a rollout, in decision order (the first breach decides)."""

CELL_METRICS: Final = tuple(spec.name for spec in CATALOG if spec.has_cells)
"""The metrics the accumulator keeps per (step, arm), in catalog order."""

PRIMARY: Final = next(spec for spec in CATALOG if spec.kind == "primary")
"""The primary metric's spec (its win test, ``alpha_better``, is a budget of its own)."""
