"""Named rollout profiles: the step plan and every threshold the state machine applies.

A profile is configuration, not state: the rollout state stores the profile's name and the
controller passes the profile to :func:`promptd.replacement.machine.step` on every call.
Changing a built-in profile therefore changes running rollouts on their next tick.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

StarvationAction = Literal["hold", "rollback", "alert", "pause"]


class StepPlan(BaseModel):
    """One traffic step: candidate ``weight`` and what it needs before it may complete."""

    model_config = ConfigDict(frozen=True)

    weight: float = Field(gt=0.0, le=1.0)
    min_duration_s: float = Field(default=600.0, ge=0.0)
    min_samples_per_arm: int = Field(default=200, ge=1)


class RolloutProfile(BaseModel):
    """Step plan and thresholds of a rollout or fixed-split experiment.

    Alphas: the primary metric is tested one-sided in both directions with
    ``alpha_worse`` (rollback) and ``alpha_better`` (a significant win), so the chance of any
    wrong decision on an A/A rollout is at most their sum. Each guardrail is one-sided at
    ``guardrail_alpha``. A final step of weight 1.0 is not a test step: reaching it promotes.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    steps: tuple[StepPlan, ...] = Field(min_length=1)
    alpha_worse: float = Field(default=0.04, gt=0.0, lt=0.5)
    alpha_better: float = Field(default=0.01, gt=0.0, lt=0.5)
    mde_sd: float = Field(default=0.2, gt=0.0)
    min_samples_for_test: int = Field(default=100, ge=1)
    guardrail_alpha: float = Field(default=0.05, gt=0.0, lt=0.5)
    max_latency_ratio: float = Field(default=1.0, ge=1.0)
    max_error_rate_increase: float = Field(default=0.0, ge=0.0)
    max_cost_ratio: float = Field(default=1.1, ge=1.0)
    srm_alpha: float = Field(default=0.001, gt=0.0, lt=0.5)
    srm_min_expected: int = Field(default=50, ge=1)
    starvation_grace_s: float = Field(default=3600.0, ge=0.0)
    starvation_action: StarvationAction = "hold"
    promote_requires_win: bool = False

    @model_validator(mode="after")
    def _weights_increase(self) -> RolloutProfile:
        weights = [s.weight for s in self.steps]
        if weights != sorted(set(weights)):
            raise ValueError(f"step weights must strictly increase, got {weights}")
        return self


def _plan(weights: tuple[float, ...], duration_s: float, samples: int) -> tuple[StepPlan, ...]:
    return tuple(
        StepPlan(weight=w, min_duration_s=duration_s, min_samples_per_arm=samples) for w in weights
    )


DEFAULT_WEIGHTS = (0.10, 0.25, 0.50, 0.75, 1.00)

CONSERVATIVE = RolloutProfile(
    name="conservative",
    steps=_plan((0.05, 0.10, 0.25, 0.50, 0.75, 1.00), 3600.0, 500),
    alpha_worse=0.04,
    alpha_better=0.01,
    min_samples_for_test=200,
    max_latency_ratio=1.0,
    max_error_rate_increase=0.0,
    max_cost_ratio=1.05,
    starvation_grace_s=6 * 3600.0,
    starvation_action="alert",
)

BALANCED = RolloutProfile(
    name="balanced",
    steps=_plan(DEFAULT_WEIGHTS, 900.0, 200),
)

AGGRESSIVE = RolloutProfile(
    name="aggressive",
    steps=_plan((0.25, 0.50, 1.00), 300.0, 100),
    max_latency_ratio=1.05,
    max_error_rate_increase=0.005,
    max_cost_ratio=1.25,
    starvation_grace_s=1800.0,
    starvation_action="rollback",
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
    ``alpha`` is split evenly between the two directions.
    """
    return base.model_copy(
        update={
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
