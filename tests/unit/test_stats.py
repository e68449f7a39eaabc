"""Always-valid sequential statistics (``promptd.replacement.stats``), by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from promptd.replacement.clustered import ClusteredSample, compare_clustered
from promptd.replacement.profiles import BALANCED
from promptd.replacement.stats import (
    Moments,
    Stratum,
    combine_strata_arrays,
    compare_means,
    fixed_horizon_total_n,
    mixture_log_lr,
    msprt_z2_threshold,
    sequential_reject_arrays,
    srm_arrays,
    srm_test,
)

RUNS = 2000
TICK = 100  # requests between two looks of the controller
Z_95 = float(stats.norm.ppf(0.975))


def _bernoulli_paths(
    p_base: float, p_cand: float, weight: float, total: int, seed: int
) -> tuple[np.ndarray, ...]:
    """Cumulative (n_b, s_b, n_c, s_c) per run and tick, shape (RUNS, ticks, 1 stratum)."""
    rng = np.random.default_rng(seed)
    ticks = total // TICK
    n_c = rng.binomial(TICK, weight, size=(RUNS, ticks))
    n_b = TICK - n_c
    s_c = rng.binomial(n_c, p_cand)
    s_b = rng.binomial(n_b, p_base)
    return tuple(np.cumsum(a, axis=1)[..., None].astype(np.float64) for a in (n_b, s_b, n_c, s_c))


def _monitor(
    p_base: float, p_cand: float, weight: float, total: int, seed: int
) -> dict[str, np.ndarray]:
    """Run BALANCED's primary-metric rule and a naive z-test at every tick of every run."""
    n_b, s_b, n_c, s_c = _bernoulli_paths(p_base, p_cand, weight, total, seed)
    d, var, big_w = combine_strata_arrays((n_b, s_b, s_b), (n_c, s_c, s_c))
    enough = np.minimum(n_b, n_c)[..., 0] >= BALANCED.min_samples_for_test
    kw = {"mde_sd": BALANCED.mde_sd}
    z, log_worse = sequential_reject_arrays(d, var, big_w, alpha=1, alternative="less", **kw)
    _, log_better = sequential_reject_arrays(d, var, big_w, alpha=1, alternative="greater", **kw)
    worse = enough & (log_worse >= math.log(1 / BALANCED.alpha_worse))
    better = enough & (log_better >= math.log(1 / BALANCED.alpha_better))
    naive = enough & (np.abs(z) >= Z_95)
    first_worse = np.where(worse.any(axis=1), worse.argmax(axis=1) + 1, np.inf) * TICK
    return {"any": (worse | better).any(axis=1), "naive": naive.any(axis=1), "first": first_worse}


@pytest.mark.parametrize(("rate", "weight"), [(0.80, 0.5), (0.80, 0.1), (0.99, 0.5), (0.99, 0.1)])
def test_aa_continuous_monitoring_keeps_alpha(rate: float, weight: float) -> None:
    """Equal arms checked at every tick: ≤ 6.1 % wrong decisions; the naive z-test inflates."""
    result = _monitor(rate, rate, weight, total=20_000, seed=int(rate * 100 + weight * 10))
    assert result["any"].mean() <= 0.061
    assert result["naive"].mean() >= 0.20


def test_power_ten_percent_relative_drop_at_canary() -> None:
    """0.80 → 0.72 at a 10 % canary is rolled back in ≥ 95 % of runs within 6,000 requests."""
    first = _monitor(0.80, 0.72, 0.1, total=6_000, seed=7)["first"]
    assert np.isfinite(first).mean() >= 0.95
    assert np.median(first) <= 3_000
    # For scale: a fixed-horizon test with 80 % power needs this many requests in total.
    # (1.95996 + 0.84162)² × (0.16/0.9 + 0.2016/0.1) / 0.08² ≈ 2,690 (unpooled normal approx).
    assert fixed_horizon_total_n(0.80, 0.72, 0.1) == pytest.approx(2690.4, rel=1e-3)


def _srm_first_alarm(
    observed: float, weights: tuple[float, ...], units_per_step: int, runs: int, seed: int
) -> np.ndarray:
    """Alarm indicator per run; counts reset at every step (the test is per current step)."""
    rng = np.random.default_rng(seed)
    alarm = np.zeros(runs, dtype=bool)
    for weight in weights:
        true_share = observed if observed >= 0 else weight
        n_c = np.cumsum(rng.binomial(TICK, true_share, size=(runs, units_per_step // TICK)), axis=1)
        n_b = np.arange(1, units_per_step // TICK + 1) * TICK - n_c
        _, log_lr = srm_arrays(n_b, n_c, weight)
        enough = (n_b + n_c) * min(weight, 1 - weight) >= BALANCED.srm_min_expected
        alarm |= (enough & (log_lr >= math.log(1 / BALANCED.srm_step_alpha))).any(axis=1)
    return alarm


def test_srm_catches_45_55_split() -> None:
    """An observed 45/55 split (50/50 intended) is flagged in ≥ 95 % of runs by 4,000 units."""
    alarm = _srm_first_alarm(0.45, (0.5,), 4_000, RUNS, seed=11)
    assert alarm.mean() >= 0.95


@pytest.mark.parametrize("weights", [(0.5,), (0.1, 0.25, 0.5, 0.75)])
def test_srm_false_alarms_are_rare(weights: tuple[float, ...]) -> None:
    """A correct split raises ≤ 0.2 % false SRM alarms over 20,000 units, across step changes."""
    alarm = _srm_first_alarm(-1.0, weights, 20_000 // len(weights), 20_000, seed=len(weights))
    assert alarm.mean() <= 0.002


def test_srm_result_fields() -> None:
    """srm_test flags a gross mismatch and needs the minimum expected count per cell."""
    assert srm_test(600, 400, 0.5).mismatch
    assert srm_test(600, 400, 0.5).fixed_p_value < 1e-9
    assert not srm_test(30, 10, 0.5).mismatch  # expected 20 per cell < 50
    assert not srm_test(5000, 5000, 0.5).mismatch


def _latency_breaches(ratio: float, total: int, seed: int, runs: int = 500) -> float:
    """Share of runs in which BALANCED's latency guardrail (a non-inferiority test at its
    margin and alpha, cluster-robust) fires within ``total`` requests at a 10 % canary."""
    rng = np.random.default_rng(seed)
    per_look = 2 * TICK
    looks = total // per_look
    breached = 0
    for _ in range(runs):
        is_cand = rng.random((looks, per_look)) < 0.1
        log_lat = rng.normal(0.0, 0.5, (looks, per_look)) + is_cand * math.log(ratio)
        for t in range(1, looks + 1):
            c, v = is_cand[:t].ravel(), log_lat[:t].ravel()
            base = Moments(int((~c).sum()), float(v[~c].sum()), float((v[~c] ** 2).sum()))
            cand = Moments(int(c.sum()), float(v[c].sum()), float((v[c] ** 2).sum()))
            res = compare_clustered(
                ClusteredSample.from_strata([Stratum(base, cand)]),
                alpha=BALANCED.latency_alpha,
                min_samples=BALANCED.min_samples_for_test,
                mde_sd=BALANCED.mde_sd,
                margin=math.log(BALANCED.max_latency_ratio),
                alternative="greater",
            )
            if res.reject:
                breached += 1
                break
    return breached / runs


def test_latency_guardrail_power() -> None:
    """15 % higher latency (lognormal σ 0.5) at a 10 % canary breaches the 5 % margin in
    ≥ 95 % of runs within 10,000 requests."""
    assert _latency_breaches(1.15, 10_000, seed=5) >= 0.95


def test_latency_inside_the_margin_is_not_a_breach() -> None:
    """A candidate 4 % slower — inside the 5 % margin — breaches at most the guardrail's
    alpha of the time, and an equal one practically never."""
    assert _latency_breaches(1.04, 10_000, seed=6, runs=300) <= BALANCED.latency_alpha
    assert _latency_breaches(1.0, 10_000, seed=7, runs=300) == 0.0


# GrowthBook gbstats 0.8.0, SequentialTwoSidedTTest(difference_type="absolute"), computed with
# the real package: (n_a, sum_a, ss_a, n_b, sum_b, ss_b, tuning N*, alpha) -> (rho, ci, p).
GBSTATS = [
    ((5000, 4000, 4000, 600, 432, 432, 5000, 0.05), 0.03984006677137368,
     (-0.1382772364441463, -0.021722763555853834), 0.0012829875831151312),
    ((2000, 1980, 1980, 2000, 1960, 1960, 2000, 0.05), 0.06299267656536578,
     (-0.021760766920295993, 0.001760766920295977), 0.16957019928429992),
    ((2700, 16200.0, 97875.0, 300, 1842.0, 11384.88, 3000, 0.05), 0.051433305039107244,
     (0.047500926636079355, 0.23249907336392), 0.00025455569863919636),
]  # fmt: skip


@pytest.mark.parametrize(("inputs", "rho", "ci", "p_value"), GBSTATS)
def test_boundary_matches_gbstats(
    inputs: tuple[float, ...], rho: float, ci: tuple[float, float], p_value: float
) -> None:
    """Our mixture bound reproduces gbstats' confidence sequence and p-value (x = N ρ²)."""
    n_a, s_a, q_a, n_b, s_b, q_b, _, alpha = inputs
    # gbstats' unpooled variance of the difference, sample variances with n - 1.
    var = sum((q - s * s / n) / (n - 1) / n for n, s, q in ((n_a, s_a, q_a), (n_b, s_b, q_b)))
    diff = s_b / n_b - s_a / n_a
    x = (n_a + n_b) * rho**2
    half = math.sqrt(var * float(msprt_z2_threshold(x, alpha)))
    assert diff - half == pytest.approx(ci[0], rel=1e-9)
    assert diff + half == pytest.approx(ci[1], rel=1e-9)
    log_lr = float(mixture_log_lr(diff / math.sqrt(var), x))
    assert min(1.0, math.exp(-log_lr)) == pytest.approx(p_value, rel=1e-9)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
@pytest.mark.parametrize(("z", "x"), [(2.5, 3.0), (-1.0, 20.0), (3.3, 0.5)])
def test_mixture_matches_numerical_integral(alternative: str, z: float, x: float) -> None:
    """The closed-form mixture likelihood ratio equals its numerical integral over θ."""
    # Work in units where se = 1: Z ~ N(θ, 1), θ ~ N(0, x) (half-normal when one-sided).
    lo, hi = {"two-sided": (-np.inf, np.inf), "greater": (0, np.inf), "less": (-np.inf, 0)}[
        alternative
    ]
    scale = 1.0 if alternative == "two-sided" else 2.0
    value, _ = integrate.quad(
        lambda t: scale * stats.norm.pdf(t, 0, math.sqrt(x)) * math.exp(t * z - t * t / 2),
        lo,
        hi,
    )
    closed = float(mixture_log_lr(z, x, alternative))  # type: ignore[arg-type]
    assert closed == pytest.approx(math.log(value), abs=1e-7)


def test_threshold_is_the_solution_of_lambda_equal_one_over_alpha() -> None:
    """At Z² equal to the published bound the two-sided likelihood ratio is exactly 1/α."""
    x = np.array([0.1, 1.0, 8.0, 100.0])
    z = np.sqrt(msprt_z2_threshold(x, 0.05))
    assert np.allclose(mixture_log_lr(z, x), math.log(20.0))


def test_strata_compare_same_periods() -> None:
    """A baseline that drifts between steps does not look like a candidate effect."""
    # Step 0: rate 0.9 in both arms at 10 %; step 1: rate 0.7 in both arms at 50 %.
    early = Stratum(Moments(9000, 8100, 8100), Moments(1000, 900, 900), step=0)
    late = Stratum(Moments(5000, 3500, 3500), Moments(5000, 3500, 3500), step=1)
    res = compare_means([early, late], alpha=0.05, min_samples=100, alternative="less")
    assert res.estimate == pytest.approx(0.0, abs=1e-12)
    assert not res.reject
    # Collapsing the steps would compare a mostly-late candidate with a mostly-early baseline.
    flat = Stratum(Moments(14000, 11600, 11600), Moments(6000, 4400, 4400))
    assert compare_means([flat], alpha=0.05, min_samples=100, alternative="less").reject


def test_minimum_samples_gate_rejection() -> None:
    """No rejection before both arms have the minimum number of samples."""
    strata = [Stratum(Moments(1000, 1000, 1000), Moments(50, 25, 25))]
    assert not compare_means(strata, alpha=0.05, min_samples=100).reject
    assert compare_means(strata, alpha=0.05, min_samples=50).reject


def test_empty_input_is_no_evidence() -> None:
    """No strata at all gives no samples and no rejection."""
    res = compare_means([], alpha=0.05, min_samples=1)
    assert not res.enough_samples
    assert not res.reject
    assert res.p_value == 1.0
