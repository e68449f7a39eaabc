"""Named rollout profiles: the step plan and every threshold the state machine applies.

A profile is configuration, not state: the rollout state stores the profile's name and the
controller passes the profile to :func:`promptd.replacement.machine.step` on every call.
Changing a built-in profile therefore changes running rollouts on their next tick.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .catalog import CATALOG, MetricSpec

StarvationAction = Literal["hold", "rollback", "alert", "pause"]
"""What a rollout starved past its grace period does. Every action raises the starvation
alert (metric, API state and the alert sinks); ``hold`` and ``alert`` then keep holding,
``pause`` pauses the rollout and ``rollback`` rolls it back."""


class StepPlan(BaseModel):
    """One traffic step: candidate ``weight`` and what it needs before it may complete."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weight: float = Field(gt=0.0, le=1.0)
    min_duration_s: float = Field(default=600.0, ge=0.0)
    min_samples_per_arm: int = Field(default=200, ge=1)


class RolloutProfile(BaseModel):
    """Step plan, error budget, guardrail margins and thresholds of a rollout or experiment.

    **One error budget.** An equal candidate can be stopped by any test of
    :data:`.catalog.CATALOG`: rolled back by the primary metric (``alpha_worse``), the
    three guardrails (``latency_alpha``, ``error_alpha``, ``cost_alpha``) or the
    sample-ratio check (``srm_alpha``, split evenly over the test steps because each
    step's split is checked on its own), or paused by the judge-drift check
    (``judge_drift_alpha``: on calls scored by both people and the rollout's evaluator,
    the candidate's evaluator-minus-people gap exceeds the baseline's by more than
    ``max_judge_drift``, tested from ``judge_drift_min_pairs`` such calls per arm). Every
    one of these tests is always valid at its alpha, so by the union bound the chance that
    an equal candidate is stopped for *any* reason is at most their sum
    (:attr:`rollback_alpha`, over the catalog), which must not exceed
    ``alpha_total``. ``alpha_better`` is a separate budget: the chance of declaring a
    significant win for an equal candidate (it promotes experiments and optimizer
    candidates, see ``require_win``).

    **Guardrails are non-inferiority tests.** A guardrail rolls back only when the
    candidate is significantly worse than the baseline *by more than its margin*:
    geometric-mean latency above ``max_latency_ratio`` times the baseline's; an error rate
    above ``max_error_rate_ratio`` times the baseline's **and** more than
    ``max_error_rate_increase`` above it (both must be shown, each at ``error_alpha``: an
    intersection–union test, level ``error_alpha``); cost per request above
    ``max_cost_ratio`` times the baseline's. An equal candidate is inside every margin, not
    on its boundary.

    **Errors are rare events.** The error ratio is tested with the exact conditional
    binomial mixture of :mod:`.rates`, its counts divided by the design effect of errors
    clustered in units, and only once ``min_expected_errors`` (effective) candidate errors
    are expected under equal rates.

    **Decisions on fewer requests.** With ``adjust_covariates`` every test runs on the
    metric regression-adjusted (CUPED, :mod:`.adjustment`) on the pre-treatment covariates
    its catalog entry names: each unit's figures over ``history_lookback_s`` before the
    rollout started (0: no history), and the call's input size.

    **Feedback belongs to its call.** Feedback counts in its call's step and arm when the
    daemon stores it at most ``feedback_max_delay_s`` after the call (or up to ten minutes
    before it, when the topics are read out of order).

    **A final step of weight 1.0 is not a test step**: completing the step before it
    promotes. With ``require_win`` (a rollout property, set by the optimizer) or
    ``promote_requires_win`` (a profile property, e.g. experiments), the last test step
    promotes only on a significant win; a ``require_win`` rollout that reaches the horizon
    (``win_max_duration_s`` in that step, or ``win_max_samples_per_arm`` primary samples in
    each arm of it) without one ends as ``no_improvement``.
    """

    # A misspelt threshold in a config file must fail at start, not be ignored.
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    steps: tuple[StepPlan, ...] = Field(min_length=1)
    # The error budget (false rollbacks of an equal candidate) and its allocation.
    alpha_total: float = Field(default=0.05, gt=0.0, lt=0.5)
    alpha_worse: float = Field(default=0.037, gt=0.0, lt=0.5)
    latency_alpha: float = Field(default=0.003, gt=0.0, lt=0.5)
    error_alpha: float = Field(default=0.003, gt=0.0, lt=0.5)
    cost_alpha: float = Field(default=0.002, gt=0.0, lt=0.5)
    srm_alpha: float = Field(default=0.002, gt=0.0, lt=0.5)
    # The judge-drift check (a pause, see the class doc) draws on the same budget.
    judge_drift_alpha: float = Field(default=0.003, gt=0.0, lt=0.5)
    # The chance of a false significant win (promotion), a budget of its own.
    alpha_better: float = Field(default=0.01, gt=0.0, lt=0.5)
    # The mixture scale τ in standard deviations of the metric (see stats.py).
    mde_sd: float = Field(default=0.15, gt=0.0)
    min_samples_for_test: int = Field(default=100, ge=1)
    # Non-inferiority margins of the guardrails.
    max_latency_ratio: float = Field(default=1.05, ge=1.0)
    max_error_rate_ratio: float = Field(default=1.1, ge=1.0)
    max_error_rate_increase: float = Field(default=0.001, ge=0.0, le=1.0)
    max_cost_ratio: float = Field(default=1.1, ge=1.0)
    min_expected_errors: float = Field(default=5.0, ge=0.0)
    srm_min_expected: int = Field(default=50, ge=1)
    # Judge drift: how much more (0..1 score) the candidate may please the evaluator than
    # people, relative to the baseline, and the paired calls per arm before it is tested.
    max_judge_drift: float = Field(default=0.05, ge=0.0, le=1.0)
    judge_drift_min_pairs: int = Field(default=30, ge=2)
    feedback_max_delay_s: float = Field(default=3600.0, gt=0.0)
    starvation_grace_s: float = Field(default=3600.0, ge=0.0)
    starvation_action: StarvationAction = "hold"
    promote_requires_win: bool = False
    win_max_duration_s: float = Field(default=3600.0, ge=0.0)
    win_max_samples_per_arm: int = Field(default=5000, ge=1)
    # Regression adjustment (CUPED) on pre-treatment covariates, and how far back a
    # unit's history is read when the rollout starts.
    adjust_covariates: bool = True
    history_lookback_s: float = Field(default=7 * 86400.0, ge=0.0)

    @model_validator(mode="after")
    def _weights_increase(self) -> RolloutProfile:
        weights = [s.weight for s in self.steps]
        if weights != sorted(set(weights)):
            raise ValueError(f"step weights must strictly increase, got {weights}")
        return self

    @model_validator(mode="after")
    def _within_budget(self) -> RolloutProfile:
        spent = self.rollback_alpha
        # A rounding tolerance: 0.03 + 4 × 0.005 is 0.05000000000000001 in floats.
        if spent > self.alpha_total * (1 + 1e-9):
            raise ValueError(
                f"the rollback alphas sum to {spent:g}, above alpha_total {self.alpha_total:g}: "
                f"{self.budget()}"
            )
        return self

    def alpha_of(self, spec: MetricSpec) -> float:
        """The share of the rollback budget this profile gives the test ``spec``."""
        return float(getattr(self, spec.alpha))

    def test_alpha(self, spec: MetricSpec) -> float:
        """The alpha ``spec``'s test runs at: its share, split over the test steps when it
        tests each step on its own."""
        share = self.alpha_of(spec)
        return share / self.test_steps if spec.per_step else share

    @property
    def rollback_alpha(self) -> float:
        """The bound on false rollbacks of an equal candidate: the sum of the allocations
        of every test in the catalog."""
        return sum(self.alpha_of(spec) for spec in CATALOG)

    @property
    def test_steps(self) -> int:
        """Steps that are tested (a final step of weight 1.0 is not)."""
        return sum(1 for s in self.steps if s.weight < 1.0) or 1

    @property
    def last_test_step(self) -> int:
        """Index of the last tested step (the one before a final 100 % step)."""
        return self.test_steps - 1

    @property
    def srm_step_alpha(self) -> float:
        """The sample-ratio check's alpha in each step (``srm_alpha`` split evenly)."""
        return self.srm_alpha / self.test_steps

    def budget(self) -> dict[str, float]:
        """The error budget as documented in the API: the allocation of every test of the
        catalog (and per step for a per-step test), the totals and the win budget."""
        out = {"alpha_total": self.alpha_total}
        for spec in CATALOG:
            out[spec.budget] = self.alpha_of(spec)
            if spec.per_step:
                out[f"{spec.budget}_per_step"] = self.test_alpha(spec)
        out["rollback_total"] = self.rollback_alpha
        out["primary_better"] = self.alpha_better
        return out

    def margins(self) -> dict[str, float]:
        """The guardrails' non-inferiority margins as documented in the API."""
        return {name: float(getattr(self, name)) for spec in CATALOG for name in spec.margins}


_unknown = sorted(
    {name for spec in CATALOG for name in spec.fields} - set(RolloutProfile.model_fields)
)
if _unknown:  # a spec naming a field the profile lacks is a bug: fail at import
    raise RuntimeError(f"rollout metric specs name unknown profile fields: {_unknown}")


def _plan(weights: tuple[float, ...], duration_s: float, samples: int) -> tuple[StepPlan, ...]:
    return tuple(
        StepPlan(weight=w, min_duration_s=duration_s, min_samples_per_arm=samples) for w in weights
    )


DEFAULT_WEIGHTS = (0.10, 0.25, 0.50, 0.75, 1.00)

CONSERVATIVE = RolloutProfile(
    name="conservative",
    steps=_plan((0.05, 0.10, 0.25, 0.50, 0.75, 1.00), 3600.0, 500),
    min_samples_for_test=200,
    max_latency_ratio=1.05,
    max_error_rate_ratio=1.1,
    max_error_rate_increase=0.0005,
    max_cost_ratio=1.05,
    starvation_grace_s=6 * 3600.0,
    starvation_action="alert",
    win_max_duration_s=6 * 3600.0,
    win_max_samples_per_arm=20_000,
)

BALANCED = RolloutProfile(
    name="balanced",
    steps=_plan(DEFAULT_WEIGHTS, 900.0, 200),
)

AGGRESSIVE = RolloutProfile(
    name="aggressive",
    steps=_plan((0.25, 0.50, 1.00), 300.0, 100),
    max_latency_ratio=1.10,
    max_error_rate_ratio=1.25,
    max_error_rate_increase=0.002,
    max_cost_ratio=1.25,
    starvation_grace_s=1800.0,
    starvation_action="rollback",
    win_max_duration_s=1800.0,
    win_max_samples_per_arm=2_000,
)

PROFILES: dict[str, RolloutProfile] = {p.name: p for p in (CONSERVATIVE, BALANCED, AGGRESSIVE)}


def get_profile(name: str) -> RolloutProfile:
    """The built-in profile ``name``; raises ``KeyError`` naming the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown rollout profile {name!r}; known: {sorted(PROFILES)}") from None


def fixed_split_experiment(
    candidate_share: float = 0.2,
    *,
    min_duration_s: float = 3600.0,
    min_samples_per_arm: int = 500,
    alpha: float = 0.05,
    base: RolloutProfile = BALANCED,
    name: str | None = None,
) -> RolloutProfile:
    """A plain A/B experiment as a one-step plan (e.g. 80/20) that runs until significance.

    The single step holds until the primary metric shows a significant difference: a
    significant loss rolls back, a significant win promotes (``promote_requires_win``).
    ``alpha`` is split evenly between the two directions; the guardrails and the
    sample-ratio check keep ``base``'s allocations, and the budget is their sum.
    """
    spent_elsewhere = base.rollback_alpha - base.alpha_worse
    return base.model_copy(
        update={
            "alpha_total": alpha / 2 + spent_elsewhere,
            "name": name or f"experiment-{round(candidate_share * 100)}",
            "steps": (
                StepPlan(
                    weight=candidate_share,
                    min_duration_s=min_duration_s,
                    min_samples_per_arm=min_samples_per_arm,
                ),
            ),
            "alpha_worse": alpha / 2,
            "alpha_better": alpha / 2,
            "promote_requires_win": True,
        }
    )
