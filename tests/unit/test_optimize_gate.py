"""The gate's statistics against known answers and by simulation with fixed seeds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from promptd.optimization.candidates import Option, select
from promptd.optimization.gate import (
    bootstrap_interval,
    bootstrap_t_p_value,
    decide,
    sign_flip_p_value,
)

MIN_CONF = 0.95
MIN_GAIN = 0.02


def _mixture(rng: np.random.Generator, n: int) -> np.ndarray:
    """Token-F1-like scores: 30 % wrong (0), 30 % exact (1), the rest partial."""
    u = rng.random(n)
    out = rng.beta(2.0, 2.0, n)
    out[u < 0.3] = 0.0
    out[(u >= 0.3) & (u < 0.6)] = 1.0
    return out


def _no_better(rng: np.random.Generator, baseline: np.ndarray) -> np.ndarray:
    """A candidate no better than the baseline: the same answer on 60 % of the examples,
    an answer of the same quality distribution on the rest."""
    out = baseline.copy()
    changed = rng.random(len(out)) < 0.4
    out[changed] = _mixture(rng, int(changed.sum()))
    return out


def _gate(c: np.ndarray, b: np.ndarray, seed: int) -> bool:
    return decide(
        list(c), list(b), min_confidence=MIN_CONF, min_gain=MIN_GAIN, samples=1000, seed=seed
    ).passed


def test_exact_p_value_matches_scipy_paired_permutation_test() -> None:
    """Without a margin, the exact studentized sign-flip p equals Fisher's paired
    permutation test of the mean (the t statistic is monotone in the mean under flips)."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        c, b = rng.random(9), rng.random(9)
        ours = sign_flip_p_value(list(c - b), samples=4096, seed=1)
        ref = stats.permutation_test(
            (c, b),
            lambda x, y, axis: np.mean(x - y, axis=axis),
            permutation_type="samples",
            alternative="greater",
            n_resamples=np.inf,
        ).pvalue
        assert ours == pytest.approx(ref, abs=1e-12)


def test_all_positive_differences_give_one_over_two_to_the_n() -> None:
    """Only the identity pattern is as extreme: p = 2^-n exactly."""
    assert sign_flip_p_value([0.3, 0.1, 0.2, 0.4, 0.5], samples=4096, seed=0) == 1 / 32


def test_monte_carlo_p_value_agrees_with_the_exact_one() -> None:
    """With more sign patterns than samples, the Monte Carlo p is close to the exact p."""
    rng = np.random.default_rng(3)
    d = list(rng.normal(0.05, 0.3, 13))
    exact = sign_flip_p_value(d, samples=2**13, seed=0)
    sampled = sign_flip_p_value(d, samples=20_000, seed=0)
    assert abs(exact - sampled) < 0.01


def test_the_whole_procedure_at_the_margin_passes_at_most_five_percent() -> None:
    """The whole procedure at the boundary of the gate's null: five candidates whose true
    gain over the active version is exactly ``min_gain`` are scored on 30 validation
    examples, the run's selection picks one (when one beats the active version there),
    and the gate meets it on 40 fresh test examples. Of the 2,000 simulated runs, those
    that reached the gate pass at most 5 % of the time."""
    rng = np.random.default_rng(2026)
    reached, passes = 0, 0
    for seed in range(2000):
        val_base = _mixture(rng, 30)
        found = [_no_better(rng, val_base) + MIN_GAIN for _ in range(5)]
        picked = select([Option(list(c), k) for k, c in enumerate(found)], list(val_base), 1.0)
        if picked is None:
            continue
        reached += 1
        test_base = _mixture(rng, 40)
        passes += _gate(_no_better(rng, test_base) + MIN_GAIN, test_base, seed)
    assert reached > 1500
    assert passes / reached <= 0.05


def test_the_gate_at_the_margin_holds_for_skewed_differences() -> None:
    """A candidate whose gain is exactly ``min_gain``, slightly better on most examples
    and much worse on a few, passes at most 5 % of 1,500 runs at 40 test examples. The
    sign-flip test alone passes it 7 % of the time: the studentized bootstrap is what
    holds here (a plain-mean bootstrap in its place fails this test)."""
    rng = np.random.default_rng(11)
    runs, passes, flip_alone = 1500, 0, 0
    for seed in range(runs):
        base = _mixture(rng, 40) * 0.5
        diff = np.where(rng.random(40) < 0.8, 0.1, -0.4) + MIN_GAIN
        passes += _gate(base + diff, base, seed)
        flip_alone += sign_flip_p_value(list(diff), 1000, seed, MIN_GAIN) <= 1 - MIN_CONF
    assert passes / runs <= 0.05
    assert flip_alone / runs > 0.06


def test_the_gate_at_zero_gain_holds_for_skewed_differences() -> None:
    """The same skewed candidate with no gain at all (no better than the active version)
    passes at most 5 % of the time."""
    rng = np.random.default_rng(11)
    runs, passes = 1500, 0
    for seed in range(runs):
        base = _mixture(rng, 40) * 0.5
        diff = np.where(rng.random(40) < 0.8, 0.1, -0.4)
        passes += _gate(base + diff, base, seed)
    assert passes / runs <= 0.05


def test_bootstrap_t_agrees_with_the_t_test_on_normal_differences() -> None:
    """On many normal differences the bootstrap-t p-value is the one-sample t-test's."""
    rng = np.random.default_rng(4)
    for _ in range(5):
        d = rng.normal(0.05, 0.3, 300)
        ours = bootstrap_t_p_value(list(d), samples=20_000, seed=1, margin=0.02)
        ref = stats.ttest_1samp(d, 0.02, alternative="greater").pvalue
        assert ours == pytest.approx(ref, abs=0.01)


def test_the_sign_flip_test_of_the_t_statistic_is_the_test_of_the_mean() -> None:
    """Under sign flips the t statistic is increasing in the mean (the sum of squares is
    fixed), so studentizing does not change the sign-flip p-value: the exact p of the
    mean statistic, computed independently, is the same for any margin."""
    rng = np.random.default_rng(9)
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=10)))
    for _ in range(10):
        d = rng.normal(0.03, 0.3, 10)
        shifted = d - MIN_GAIN
        by_mean = float(((signs * shifted).mean(axis=1) >= shifted.mean() - 1e-12).mean())
        assert sign_flip_p_value(list(d), 4096, 0, MIN_GAIN) == pytest.approx(by_mean)


def test_the_old_pool_gate_fails_the_same_simulation() -> None:
    """Contrast: gating five no-better candidates on the same 20 examples with a paired
    bootstrap at confidence 0.8 and keeping any that passes passes about half the time."""
    rng = np.random.default_rng(5)
    runs, passes = 400, 0
    for _ in range(runs):
        base = _mixture(rng, 20)
        passed = False
        for _k in range(5):
            d = _no_better(rng, base) - base
            idx = rng.integers(0, 20, size=(500, 20))
            passed |= bool(((d[idx].mean(axis=1) > 1e-12).mean()) >= 0.8)
        passes += passed
    assert passes / runs > 0.3


def test_gate_finds_a_real_gain() -> None:
    """A candidate better by about 0.2 on 60 test examples passes in at least 90 % of runs."""
    rng = np.random.default_rng(8)
    runs, passes = 300, 0
    for seed in range(runs):
        base = _mixture(rng, 60)
        better = np.clip(base + rng.normal(0.2, 0.25, 60), 0, 1)
        passes += _gate(better, base, seed)
    assert passes / runs >= 0.9


def test_gain_interval_covers_the_true_gain() -> None:
    """The 95 % bootstrap interval covers the true mean gain in 92-97 % of 600 runs."""
    rng = np.random.default_rng(13)
    covered = 0
    for seed in range(600):
        d = rng.normal(0.1, 0.3, 80)
        low, high = bootstrap_interval(list(d), samples=1000, seed=seed)
        covered += low <= 0.1 <= high
    assert 0.92 <= covered / 600 <= 0.97


def test_a_candidate_better_by_the_same_amount_everywhere_passes() -> None:
    """Differences that are all equal (a candidate right where the active version is
    always partly right) pass at any size: the resamples' zero spread around their mean
    is rounding, not a tie with the observed statistic."""
    for n in range(10, 60):
        result = decide(
            [1.0] * n, [2 / 11] * n, min_confidence=0.95, min_gain=0.02, samples=200, seed=5
        )
        assert result.passed, (n, result)


def test_a_candidate_better_everywhere_but_one_example_passes() -> None:
    """Right on 22 of 23 test examples where the active version is partly right, a little
    less right on the last: the resamples that miss that example have no spread and
    prove nothing either way; the gate passes."""
    candidate = [1.0] * 22 + [0.5]
    result = decide(
        candidate, [2 / 11] * 23, min_confidence=0.95, min_gain=0.02, samples=1000, seed=3
    )
    assert result.passed, result
    assert result.p_bootstrap_t < 0.01


def test_a_candidate_right_on_all_but_two_examples_passes() -> None:
    """The real-model bench's case (sentiment, SmolLM2): the candidate right on 35 of 37
    test examples, the active version on none (token F1 0.048 on one). Resamples that
    miss the two failures have almost no spread; their t statistics must not count as
    "as extreme" as the observed one (they did: p = 0.07, the gate failed)."""
    candidate = [1.0] * 35 + [0.0, 0.0]
    baseline = [0.0] * 34 + [0.0476, 0.0, 0.0]
    result = decide(candidate, baseline, min_confidence=0.95, min_gain=0.02, samples=4000, seed=1)
    assert result.passed, result
    assert result.p_bootstrap_t < 0.001


def test_decision_reasons() -> None:
    """Too few examples, a gain below the minimum and low confidence are named."""
    assert (
        decide(
            [1.0], [0.0], min_confidence=0.95, min_gain=0.0, samples=100, seed=0, min_examples=2
        ).reason
        == "too_few_examples"
    )
    small = decide(
        [0.51] * 40, [0.5] * 40, min_confidence=0.95, min_gain=0.02, samples=1000, seed=0
    )
    assert (small.passed, small.reason) == (False, "small_gain")
    noisy = decide(
        [1, 0] * 20, [0, 1] * 19 + [0, 0], min_confidence=0.95, min_gain=0.0, samples=1000, seed=0
    )
    assert (noisy.passed, noisy.reason) == (False, "low_confidence")
