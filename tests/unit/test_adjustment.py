"""Regression adjustment on pre-treatment covariates (``promptd.replacement.adjustment``):
closed forms against numpy's least squares, and simulations with fixed seeds of the
variance reduction and of the type I error under continuous monitoring."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from promptd.replacement.adjustment import adjusted, compare, theta
from promptd.replacement.clustered import ClusteredSample, Covariates, compare_clustered, estimate
from promptd.replacement.stats import Alternative, Moments, Stratum


def _moments(values: np.ndarray) -> Moments:
    return Moments(int(values.size), float(values.sum()), float((values * values).sum()))


def sample_of(
    unit: np.ndarray, cell: np.ndarray, y: np.ndarray, x: np.ndarray, units: int, cells: int
) -> ClusteredSample:
    """The sufficient statistics the accumulator keeps, from observations: their unit,
    cell (2·step + arm), value and covariates (one column each)."""
    k = x.shape[1]
    values, counts = np.zeros((units, cells)), np.zeros((units, cells))
    xs = np.zeros((units, cells, k))
    np.add.at(values, (unit, cell), y)
    np.add.at(counts, (unit, cell), 1.0)
    np.add.at(xs, (unit, cell), x)
    masks = [cell == c for c in range(cells)]
    covariates = Covariates.from_clusters(
        [f"x{j}" for j in range(k)],
        np.array([x[m].sum(axis=0) for m in masks]),
        np.array([x[m].T @ x[m] for m in masks]),
        np.array([x[m].T @ y[m] for m in masks]),
        xs,
        values,
        counts,
    )
    moments = [
        (_moments(y[masks[2 * s]]), _moments(y[masks[2 * s + 1]])) for s in range(cells // 2)
    ]
    return ClusteredSample.from_clusters(range(cells // 2), moments, values, counts, covariates)


def _two_steps(rng: np.random.Generator, n: int = 3000, units: int = 300) -> tuple[np.ndarray, ...]:
    """Units spanning two steps (moving arm as the weight grows), a unit-level covariate
    and a per-observation one, a unit effect and a small treatment effect."""
    unit = rng.integers(0, units, n)
    step = rng.integers(0, 2, n)
    route = rng.random(units)
    cand = route[unit] < np.where(step == 0, 0.2, 0.5)
    history = rng.normal(0.0, 1.0, units)
    size = rng.normal(0.0, 1.0, n)
    y = 2.0 + 0.6 * history[unit] + 0.4 * size + rng.normal(0.0, 1.0, n) + 0.1 * cand
    x = np.stack([history[unit], size], axis=1)
    return unit, 2 * step + cand, y, x


def test_theta_is_the_within_cell_least_squares_slope() -> None:
    """θ equals numpy's least squares of the metric on its covariates with a fixed effect
    per cell (step × arm), and a covariate without variation gets θ = 0."""
    rng = np.random.default_rng(11)
    unit, cell, y, x = _two_steps(rng)
    sample = sample_of(unit, cell, y, x, 300, 4)
    dummies = np.eye(4)[cell]
    ols, *_ = np.linalg.lstsq(np.hstack([dummies, x]), y, rcond=None)
    assert theta(sample) == pytest.approx(ols[4:], rel=1e-9)
    constant = np.hstack([x[:, :1], np.zeros((y.size, 1))])
    slopes = theta(sample_of(unit, cell, y, constant, 300, 4))
    assert slopes[1] == 0.0
    assert slopes[0] == pytest.approx(np.linalg.lstsq(np.hstack([dummies, x[:, :1]]), y,
                                                      rcond=None)[0][4], rel=1e-9)  # fmt: skip


@pytest.mark.parametrize("ratio", [1.0, 1.1])
def test_adjusted_contrast_and_its_cluster_robust_variance(ratio: float) -> None:
    """The adjusted contrast is Σ_k w_k [(ȳ_ck − θᵀ(x̄_ck − x̄_k)) − r (ȳ_bk − θᵀ(x̄_bk −
    x̄_k))] / W with x̄_k the step's pooled covariate mean, and its variance is the
    unit-level sandwich G/(G−1) Σ_g (Σ_c a_c e_gc)² of the adjusted values z = y − θ f_c x,
    computed unit by unit."""
    rng = np.random.default_rng(12)
    unit, cell, y, x = _two_steps(rng)
    sample = sample_of(unit, cell, y, x, 300, 4)
    slopes = theta(sample)
    est = estimate(adjusted(sample, slopes, ratio), ratio=ratio)
    n = np.bincount(cell, minlength=4).astype(float)
    w = np.array([n[0] * n[1] / (n[0] + n[1]), n[2] * n[3] / (n[2] + n[3])])
    d = 0.0
    for s in (0, 1):
        pooled = x[cell // 2 == s].mean(axis=0)
        means = [y[cell == 2 * s + a].mean() - slopes @ (x[cell == 2 * s + a].mean(axis=0) - pooled)
                 for a in (0, 1)]  # fmt: skip
        d += w[s] * (means[1] - ratio * means[0])
    assert est.d == pytest.approx(d / w.sum(), rel=1e-9)
    # The same from per-observation adjusted values, unit by unit.
    f = np.ones(4)
    if ratio != 1.0:
        for s in (0, 1):
            nk = n[2 * s] + n[2 * s + 1]
            f[2 * s] = 1 + (1 - ratio) * n[2 * s] / (ratio * nk)
            f[2 * s + 1] = 1 - (1 - ratio) * n[2 * s + 1] / nk
    z = y - f[cell] * (x @ slopes)
    zs, ms = np.zeros((300, 4)), np.zeros((300, 4))
    np.add.at(zs, (unit, cell), z)
    np.add.at(ms, (unit, cell), 1.0)
    mean = zs.sum(axis=0) / n
    a = np.array([-ratio * w[0] / n[0], w[0] / n[1], -ratio * w[1] / n[2], w[1] / n[3]])
    influence = (zs - mean * ms) @ (a / w.sum())
    g = np.count_nonzero(ms.sum(axis=1))
    assert est.var == pytest.approx(g / (g - 1) * (influence**2).sum(), rel=1e-9)


def test_without_covariates_or_history_the_test_is_the_raw_one() -> None:
    """A sample without covariates, or whose covariates are all 0 (no unit has history),
    gives exactly the unadjusted test."""
    rng = np.random.default_rng(13)
    unit, cell, y, x = _two_steps(rng)
    raw = compare_clustered(sample_of(unit, cell, y, x, 300, 4), alpha=0.05, min_samples=10,
                            mde_sd=0.15, pooled=True)  # fmt: skip
    for data in (np.zeros((y.size, 0)), np.zeros_like(x)):
        res, adjustment = compare(sample_of(unit, cell, y, data, 300, 4), alpha=0.05,
                                  min_samples=10, mde_sd=0.15, pooled=True)  # fmt: skip
        assert res == raw
        assert adjustment is None or adjustment.variance_reduction == 0.0


def _world(
    rng: np.random.Generator, rho: float, n: int, effect: float = 0.0, weight: float = 0.1
) -> tuple[np.ndarray, ...]:
    """One observation per unit, the unit's covariate correlated ``rho`` with it."""
    arm = (rng.random(n) < weight).astype(int)
    x = rng.normal(0.0, 1.0, n)
    y = rho * x + math.sqrt(1 - rho * rho) * rng.normal(0.0, 1.0, n) + effect * arm
    return np.arange(n), arm, y, x[:, None]


def test_variance_reduction_is_rho_squared() -> None:
    """With a covariate correlated ρ = 0.5 with the metric, the adjusted contrast's
    variance is 1 − ρ² = 75 % of the raw one (within sampling noise)."""
    rng = np.random.default_rng(14)
    unit, arm, y, x = _world(rng, 0.5, 20_000)
    _, adjustment = compare(sample_of(unit, arm, y, x, y.size, 2), alpha=0.05, min_samples=10,
                            mde_sd=0.15, pooled=True)  # fmt: skip
    assert adjustment is not None
    assert adjustment.variance_reduction == pytest.approx(0.25, abs=0.02)
    assert adjustment.theta[0] == pytest.approx(0.5, abs=0.02)


def _ever_rejects(
    runs: int,
    looks: int,
    n: int,
    seed: int,
    tests: Callable[[ClusteredSample], tuple[bool, ...]],
    world: Callable[[np.random.Generator], tuple[np.ndarray, ...]],
) -> list[float]:
    """Per test, the share of runs that it rejects at *any* of ``looks`` evenly spaced
    looks."""
    rng = np.random.default_rng(seed)
    hits: np.ndarray | None = None
    for _ in range(runs):
        unit, cell, y, x = world(rng)
        ever: np.ndarray | None = None
        for m in np.linspace(n / looks, n, looks).astype(int):
            now = np.array(tests(sample_of(unit[:m], cell[:m], y[:m], x[:m], n, 2)))
            ever = now if ever is None else ever | now
            if ever.all():
                break
        assert ever is not None
        hits = ever.astype(int) if hits is None else hits + ever
    assert hits is not None
    return list(hits / runs)


@pytest.mark.parametrize(
    ("alternative", "pooled"), [("two-sided", False), ("less", True), ("greater", False)]
)
def test_adjusted_test_keeps_alpha_under_continuous_monitoring(
    alternative: Alternative, pooled: bool
) -> None:
    """A/A with a covariate of ρ = 0.7, looked at 25 times from 80 to 2,000 observations
    at a 10 % canary: the adjusted test (θ re-fitted at every look) rejects at most α; a
    fixed-horizon z-test on the same adjusted estimate, looked at as often, does not."""
    alpha = 0.05
    limit = 1.96 if alternative == "two-sided" else 1.645

    def world(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        return _world(rng, 0.7, 2000)

    def tests(sample: ClusteredSample) -> tuple[bool, bool]:
        res, _ = compare(sample, alpha=alpha, min_samples=20, mde_sd=0.15,
                         alternative=alternative, pooled=pooled)  # fmt: skip
        z = {"two-sided": abs(res.z), "greater": res.z, "less": -res.z}[alternative]
        return res.reject, res.n_candidate >= 20 and z > limit

    valid, naive = _ever_rejects(400, 25, 2000, 21, tests, world)
    assert valid <= alpha
    assert naive > 2 * alpha  # the simulation can tell a test that does not keep α


def test_ratio_margin_keeps_alpha_at_its_boundary() -> None:
    """At the boundary of a ratio margin (μ_c = 1.1 μ_b, cost-like values with a
    covariate of ρ = 0.6), the adjusted non-inferiority test, looked at 20 times, rejects
    at most α: the covariates are centred on the step's pooled mean."""
    alpha = 0.05

    def world(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        unit, arm, y, x = _world(rng, 0.6, 2000, weight=0.2)
        # A covariate far from 0 (uncentred), as an input size is.
        return unit, arm, (10.0 + y) * np.where(arm == 1, 1.1, 1.0), x + 5.0

    def tests(sample: ClusteredSample) -> tuple[bool]:
        res, _ = compare(sample, alpha=alpha, min_samples=20, mde_sd=0.15, ratio=1.1,
                         alternative="greater")  # fmt: skip
        return (res.reject,)

    (rate,) = _ever_rejects(400, 20, 2000, 22, tests, world)
    assert rate <= alpha


def test_a_guardrail_keeps_its_allocation_with_clustered_units() -> None:
    """Units of about 8 observations sharing a strong unit effect (half the variance),
    their history as the covariate, at a guardrail's non-inferiority margin (candidate
    exactly 0.05 above the baseline): the adjusted cluster-robust test, looked at 20
    times, rejects at most α; ignoring the clusters (every observation its own unit)
    does not."""
    alpha, units, n = 0.05, 250, 2000

    def world(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        effect = rng.normal(0.0, 1.0, units)
        history = effect + rng.normal(0.0, 1.0, units)
        arm = (rng.random(units) < 0.2).astype(int)
        unit = rng.integers(0, units, n)
        y = effect[unit] + rng.normal(0.0, 1.0, n) + 0.05 * arm[unit]
        return unit, arm[unit], y, history[unit][:, None]

    def rejects(sample: ClusteredSample) -> bool:
        res, _ = compare(sample, alpha=alpha, min_samples=20, mde_sd=0.15, margin=0.05,
                         alternative="greater")  # fmt: skip
        return res.reject

    def tests(sample: ClusteredSample) -> tuple[bool, bool]:
        # Every observation its own cluster (and so no covariates either).
        flat = ClusteredSample.from_strata([Stratum(*sample.moments[0])])
        return rejects(sample), rejects(flat)

    rng = np.random.default_rng(24)
    hits = np.zeros(2)
    runs = 300
    for _ in range(runs):
        unit, cell, y, x = world(rng)
        ever = np.zeros(2, dtype=bool)
        for m in np.linspace(n / 20, n, 20).astype(int):
            ever |= np.array(tests(sample_of(unit[:m], cell[:m], y[:m], x[:m], units, 2)))
        hits += ever
    clustered, naive = hits / runs
    assert clustered <= alpha
    assert naive > 2 * alpha


def test_a_real_drop_is_found_sooner() -> None:
    """A drop of 0.2 standard deviations at a 10 % canary with a covariate of ρ = 0.5:
    looked at every 100 observations, the adjusted test rejects it after fewer
    observations in median than the raw test (about a quarter fewer)."""
    rng = np.random.default_rng(23)
    first: dict[bool, list[int]] = {True: [], False: []}
    for _ in range(60):
        unit, arm, y, x = _world(rng, 0.5, 8000, effect=-0.2)
        for adjust in (True, False):
            covs = x if adjust else np.zeros((y.size, 0))
            for m in range(200, 8001, 100):
                res, _ = compare(sample_of(unit[:m], arm[:m], y[:m], covs[:m], 8000, 2),
                                 alpha=0.04, min_samples=50, mde_sd=0.15,
                                 alternative="less", pooled=True)  # fmt: skip
                if res.reject:
                    first[adjust].append(m)
                    break
            else:
                first[adjust].append(8100)
    adjusted_median, raw_median = np.median(first[True]), np.median(first[False])
    assert adjusted_median <= 0.85 * raw_median
