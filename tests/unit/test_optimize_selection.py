"""Strategy selection: Beta posteriors, Thompson sampling, the shared prior (pure)."""

from __future__ import annotations

import random

import pytest
from scipy import integrate, stats

from promptd.optimization.selection import Evidence, choose, posterior


def _p_first_wins(a1: float, b1: float, a2: float, b2: float) -> float:
    """P(X1 > X2) for independent Beta(a1, b1), Beta(a2, b2), by numerical integration."""
    value, _err = integrate.quad(
        lambda x: stats.beta.pdf(x, a1, b1) * stats.beta.cdf(x, a2, b2), 0, 1
    )
    return float(value)


def test_posterior_adds_own_outcomes_and_discounted_shared_ones() -> None:
    """alpha = prior + w * successes elsewhere + successes here (and likewise beta)."""
    outcomes = [
        Evidence("p", "fewshot", 1, 0),
        Evidence("p", "fewshot", 0, 1),
        Evidence("q", "fewshot", 1, 0),
        Evidence("q", "fewshot", 1, 0),
        Evidence("q", "mipro", 0, 1),
    ]
    post = posterior("fewshot", "p", outcomes, 1.0, 1.0, shared_weight=0.5)
    assert (post.alpha, post.beta) == (1 + 1 + 0.5 * 2, 1 + 1)
    assert (post.runs_here, post.runs_elsewhere) == (2, 2)
    assert post.mean == pytest.approx(3 / 5)


def test_thompson_choice_frequency_matches_the_beta_race() -> None:
    """Over many draws, A is chosen with probability P(Beta_A > Beta_B)."""
    outcomes = [Evidence("p", "a", 3, 1), Evidence("p", "b", 2, 2)]
    expected = _p_first_wins(4, 2, 3, 3)
    n = 6000
    wins = sum(
        choose(["a", "b"], "p", outcomes, random.Random(seed)).strategy == "a" for seed in range(n)
    )
    # Binomial standard error is about 0.006: four of them.
    assert wins / n == pytest.approx(expected, abs=0.025)


def test_shared_prior_steers_a_new_prompt() -> None:
    """A prompt never optimized prefers the strategy that worked on the other prompts,
    with the probability of the discounted Beta race."""
    outcomes = [Evidence(f"other{i}", "a", 1, 0) for i in range(6)]
    outcomes += [Evidence(f"other{i}", "b", 0, 1) for i in range(6)]
    expected = _p_first_wins(1 + 0.5 * 6, 1, 1, 1 + 0.5 * 6)
    n = 4000
    wins = sum(
        choose(["a", "b"], "new", outcomes, random.Random(seed)).strategy == "a"
        for seed in range(n)
    )
    assert expected > 0.9
    assert wins / n == pytest.approx(expected, abs=0.02)


def test_bandit_concentrates_on_the_best_strategy() -> None:
    """With true success rates 0.2, 0.45 and 0.7, the last 100 of 300 simulated runs
    choose the best strategy at least 70 % of the time."""
    truth = {"x": 0.2, "y": 0.45, "z": 0.7}
    rng = random.Random(42)
    outcomes: list[Evidence] = []
    picks = []
    for _ in range(300):
        choice = choose(list(truth), "p", outcomes, rng)
        success = rng.random() < truth[choice.strategy]
        outcomes.append(Evidence("p", choice.strategy, float(success), float(not success)))
        picks.append(choice.strategy)
    assert picks[-100:].count("z") >= 70


def test_choice_says_why() -> None:
    """The choice carries the method, the draws and each posterior."""
    one = choose(["fewshot"], "p", [], random.Random(0))
    assert (one.strategy, one.method) == ("fewshot", "only_one")
    many = choose(["fewshot", "mipro"], "p", [], random.Random(0)).to_dict()
    assert many["method"] == "thompson"
    assert set(many["draws"]) == {"fewshot", "mipro"}
    assert many["posteriors"]["mipro"]["alpha"] == 1.0
    with pytest.raises(ValueError, match="no strategy"):
        choose([], "p", [], random.Random(0))
