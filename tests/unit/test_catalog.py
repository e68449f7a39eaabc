"""The rollout's metrics are declared once, in the catalog, and the error budget, the
margins, the observation and the arms derive from it (issue 18)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydantic import ValidationError

from promptd.replacement.catalog import (
    CATALOG,
    CELL_METRICS,
    COVARIATES,
    NOT_COVARIATES,
    Observation,
    as_clustered,
)
from promptd.replacement.history import FIGURES
from promptd.replacement.observations import RolloutAccumulator
from promptd.replacement.profiles import PROFILES, RolloutProfile, fixed_split_experiment
from promptd.replacement.state import RolloutState

EXPERIMENTS = [
    fixed_split_experiment(),
    fixed_split_experiment(0.5, alpha=0.02),
    fixed_split_experiment(0.1, alpha=0.1, base=PROFILES["conservative"]),
]
ALL_PROFILES = [*PROFILES.values(), *EXPERIMENTS]
# The profile's alphas that are not shares of the rollback budget: the budget itself and
# the chance of a false win (a budget of its own).
NOT_ROLLBACK_SHARES = {"alpha_total", "alpha_better"}


@pytest.mark.parametrize("profile", ALL_PROFILES, ids=lambda p: p.name)
def test_the_alphas_of_the_catalog_sum_to_the_profiles_total(profile: RolloutProfile) -> None:
    """Every built-in profile and fixed-split experiment spends its whole error budget on
    the catalog's tests: the shares sum to ``alpha_total`` (the union bound of false
    rollbacks for any reason)."""
    shares = [getattr(profile, spec.alpha) for spec in CATALOG]
    assert sum(shares) == pytest.approx(profile.alpha_total, rel=1e-12)
    assert profile.rollback_alpha == pytest.approx(sum(shares), rel=1e-12)
    budget = profile.budget()
    assert [budget[spec.budget] for spec in CATALOG] == shares
    assert budget["rollback_total"] == profile.rollback_alpha


def test_every_alpha_of_the_profile_is_a_share_of_one_test() -> None:
    """An alpha added to the profile without a spec would be outside the budget: every
    ``*_alpha`` field is the share of exactly one test of the catalog."""
    alphas = {name for name in RolloutProfile.model_fields if "alpha" in name}
    claimed = [spec.alpha for spec in CATALOG]
    assert sorted(claimed) == sorted(set(claimed))  # one test per share
    assert alphas - NOT_ROLLBACK_SHARES == set(claimed)


def test_every_field_a_spec_names_is_in_the_profile() -> None:
    """The alphas, margins and settings the specs name are profile fields, and the API's
    margins are exactly the specs' margins."""
    fields = set(RolloutProfile.model_fields)
    for spec in CATALOG:
        assert set(spec.fields) <= fields, spec.name
    named = [name for spec in CATALOG for name in spec.margins]
    assert list(PROFILES["balanced"].margins()) == named


def test_a_profile_spending_more_than_its_budget_is_refused() -> None:
    """A share raised past ``alpha_total`` is refused, naming the allocation."""
    balanced = PROFILES["balanced"].model_dump()
    with pytest.raises(ValidationError, match=r"rollback alphas sum to 0\.051.*latency"):
        RolloutProfile(**{**balanced, "latency_alpha": 0.004})


def test_a_per_step_share_is_split_over_the_test_steps() -> None:
    """The sample-ratio check tests each step on its own: its share is split evenly."""
    for profile in ALL_PROFILES:
        (srm,) = [spec for spec in CATALOG if spec.per_step]
        assert profile.test_alpha(srm) == pytest.approx(profile.srm_alpha / profile.test_steps)
        assert profile.budget()[f"{srm.budget}_per_step"] == profile.test_alpha(srm)


def test_the_observation_and_the_arms_have_every_metric_with_cells() -> None:
    """The accumulator observes and shows each metric of the catalog that has cells; an
    observation refuses a metric the catalog does not know."""
    acc = RolloutAccumulator("v1", "v2", "success_rate", step_starts=[0.0])
    acc.add_metric(1.0, "v2", "u", 10.0, False, None, 0.5, "r1")
    state = RolloutState("r", "p", "v1", "v2", "s", "balanced", "success_rate")
    obs = acc.observation(state)
    assert set(obs.metrics) == set(CELL_METRICS)
    assert set(CELL_METRICS) == {"primary", "log_latency", "errors", "cost", "judge_drift"}
    # Every metric a call feeds has data; the judge-drift pairs need people's and an
    # evaluator's score of a call.
    assert all(obs.metric(name) for name in CELL_METRICS if name != "judge_drift")
    assert as_clustered(obs.metric("judge_drift")).steps == ()
    assert acc.arm_summary()["candidate"] == {
        "requests": 1,
        "primary_samples": 1,
        "primary_mean": 0.0,
        "latency_geomean_ms": pytest.approx(10.0),
        "error_rate": 1.0,
        "cost_per_request": 0.5,
        "judge_drift_pairs": 0,
        "evaluator_minus_people": None,
    }
    with pytest.raises(TypeError, match=r"unknown rollout metric\(s\) \['tokens'\]"):
        Observation(tokens=())
    with pytest.raises(AttributeError, match="no metric 'tokens'"):
        _ = obs.tokens


def test_metrics_are_adjusted_only_on_documented_pre_treatment_covariates() -> None:
    """Every covariate a metric names is one of COVARIATES, each saying why the variant
    cannot change it; tokens_in (which counts the template) is documented as not one; a
    spec naming an unknown covariate, or history without a figure, is refused."""
    for spec in CATALOG:
        for name in spec.adjust:
            assert COVARIATES[name].pre_treatment
        if "history" in spec.adjust:
            assert spec.history is not None
            assert spec.history("feedback_score") in FIGURES
    assert "tokens_in" in NOT_COVARIATES
    assert "tokens_in" not in COVARIATES
    with pytest.raises(ValueError, match="unknown covariates \\['tokens_in'\\]"):
        replace(CATALOG[1], adjust=("tokens_in",))
    with pytest.raises(ValueError, match="history without a figure"):
        replace(CATALOG[1], history=None)
