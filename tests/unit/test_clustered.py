"""Cluster-robust comparisons (``promptd.replacement.clustered``): formulas and simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from promptd.replacement.clustered import ClusteredSample, compare_clustered, estimate
from promptd.replacement.stats import Moments, Stratum


def _moments(values: np.ndarray) -> Moments:
    return Moments(int(values.size), float(values.sum()), float((values * values).sum()))


def test_independent_samples_give_the_sandwich_variance() -> None:
    """With every observation its own cluster, the variance is the closed-form sandwich
    Σ_k (w_k/W)² (SS_bk/n_bk² + SS_ck/n_ck²) · G/(G−1) of the CMH-weighted difference."""
    rng = np.random.default_rng(1)
    arms = [
        (rng.normal(0.0, 1.0, nb), rng.normal(0.3, 2.0, nc)) for nb, nc in ((900, 100), (500, 500))
    ]
    strata = [Stratum(_moments(b), _moments(c), step=k) for k, (b, c) in enumerate(arms)]
    est = estimate(ClusteredSample.from_strata(strata))
    w = np.array([b.size * c.size / (b.size + c.size) for b, c in arms])
    ss = [(((b - b.mean()) ** 2).sum(), ((c - c.mean()) ** 2).sum()) for b, c in arms]
    expected = sum(
        (wk / w.sum()) ** 2 * (sb / b.size**2 + sc / c.size**2)
        for wk, (sb, sc), (b, c) in zip(w, ss, arms, strict=True)
    )
    g = sum(b.size + c.size for b, c in arms)
    diff = sum(wk * (c.mean() - b.mean()) for wk, (b, c) in zip(w, arms, strict=True)) / w.sum()
    assert est.d == pytest.approx(diff, rel=1e-12)
    assert est.var == pytest.approx(expected * g / (g - 1), rel=1e-9)


def _clustered_data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit, cell, value) of observations; units span both steps and may change arm."""
    n = 2000
    unit = rng.integers(0, 150, n)
    step = rng.integers(0, 2, n)
    # A unit is in the candidate at step 0 if its bucket < 0.2, at step 1 if < 0.5.
    bucket = rng.random(150)
    cand = bucket[unit] < np.where(step == 0, 0.2, 0.5)
    effect = rng.normal(0.0, 0.5, 150)[unit]
    value = 1.0 + effect + rng.normal(0.0, 1.0, n) + 0.1 * cand
    return unit, 2 * step + cand, value


def test_cluster_robust_variance_equals_the_unit_level_formula() -> None:
    """From the cross products, the variance equals G/(G−1) Σ_g (Σ_c a_c e_gc)² computed
    unit by unit, with e_gc the unit's residual in cell c and a_c the contrast weights —
    including the covariance of units seen in both steps (and, pooled, with each cell's
    sum of squares taken at its stratum's pooled rate)."""
    rng = np.random.default_rng(2)
    unit, cell, value = _clustered_data(rng)
    y = np.zeros((150, 4))
    m = np.zeros((150, 4))
    np.add.at(y, (unit, cell), value)
    np.add.at(m, (unit, cell), 1.0)
    moments = [(_moments(value[cell == 2 * k]), _moments(value[cell == 2 * k + 1])) for k in (0, 1)]
    sample = ClusteredSample.from_clusters((0, 1), moments, y, m)
    for ratio, pooled in ((1.0, False), (1.1, False), (1.0, True)):
        est = estimate(sample, ratio=ratio, pooled=pooled)
        n = m.sum(axis=0)
        mean = y.sum(axis=0) / n
        w = np.array([n[0] * n[1] / (n[0] + n[1]), n[2] * n[3] / (n[2] + n[3])])
        a = np.array([-ratio * w[0] / n[0], w[0] / n[1], -ratio * w[1] / n[2], w[1] / n[3]])
        a /= w.sum()
        if pooled:
            centre = np.repeat([(y[:, 0] + y[:, 1]).sum() / (n[0] + n[1]),
                                (y[:, 2] + y[:, 3]).sum() / (n[2] + n[3])], 2)  # fmt: skip
        else:
            centre = mean
        resid = y - centre * m
        cov = resid.T @ resid  # Σ_g e_gc e_gd, unit by unit
        if pooled:
            # The null-pooled form: each cell's own sum of squares becomes its stratum's
            # pooled rate per observation times the cell's size.
            rate = np.repeat([cov[0, 0] + cov[1, 1], cov[2, 2] + cov[3, 3]], 2)
            rate /= np.repeat([n[0] + n[1], n[2] + n[3]], 2)
            cov[np.diag_indices(4)] = rate * n
        else:
            influence = (resid * a).sum(axis=1)
            assert a @ cov @ a == pytest.approx((influence**2).sum(), rel=1e-12)
        g = int(np.count_nonzero(m.sum(axis=1)))
        assert est.var == pytest.approx(float(a @ cov @ a) * g / (g - 1), rel=1e-9)
        d = (w[0] * (mean[1] - ratio * mean[0]) + w[1] * (mean[3] - ratio * mean[2])) / w.sum()
        assert est.d == pytest.approx(d, rel=1e-12)


def _correlated_aa(seed: int, runs: int, looks: int) -> tuple[float, float]:
    """False "worse" rejections of an A/A test with correlated users, clustered vs not.

    600 users, 18 thumbs each spread over the looks, per-user rates Beta(7.2, 1.8)
    (mean 0.8, intra-class correlation 0.1), 20 % of users in the candidate.
    """
    rng = np.random.default_rng(seed)
    users, per_user = 600, 18
    reject = np.zeros((2, runs), dtype=bool)
    for run in range(runs):
        rate = rng.beta(7.2, 1.8, users)
        arm = (rng.random(users) < 0.2).astype(int)
        unit = np.repeat(np.arange(users), per_user)
        look = rng.integers(0, looks, unit.size)
        score = (rng.random(unit.size) < rate[unit]).astype(float)
        y = np.zeros((looks, users))
        np.add.at(y, (look, unit), score)
        y = np.cumsum(y, axis=0)
        m = np.cumsum(
            np.bincount(look * users + unit, minlength=looks * users).reshape(looks, users), axis=0
        )
        sq = np.zeros((looks, 2))
        np.add.at(sq, (look, arm[unit]), score)  # Bernoulli: Σy² = Σy
        sq = np.cumsum(sq, axis=0)
        onehot = np.eye(2)[arm]
        for t in range(looks):
            moments = ((Moments(int(m[t] @ onehot[:, 0]), sq[t, 0], sq[t, 0]),
                        Moments(int(m[t] @ onehot[:, 1]), sq[t, 1], sq[t, 1])),)  # fmt: skip
            clustered = ClusteredSample.from_clusters(
                (0,), moments, y[t][:, None] * onehot, m[t][:, None] * onehot
            )
            plain = ClusteredSample.from_strata([Stratum(*moments[0])])
            for i, sample in enumerate((clustered, plain)):
                res = compare_clustered(
                    sample, alpha=0.04, min_samples=100, mde_sd=0.2, alternative="less", pooled=True
                )
                reject[i, run] |= res.reject
    return float(reject[0].mean()), float(reject[1].mean())


def test_correlated_users_keep_alpha_only_with_clustering() -> None:
    """A/A with intra-class correlation 0.1 and 18 calls per user, looked at 30 times: the
    cluster-robust test rejects at most α = 4 %; treating calls as independent rejects
    about twice as often."""
    clustered, plain = _correlated_aa(seed=7, runs=600, looks=30)
    assert clustered <= 0.04
    assert plain >= 1.5 * max(clustered, 0.01)


def test_ratio_margin_keeps_alpha_at_its_boundary() -> None:
    """Non-inferiority at a ratio (cost ≤ 1.1 × baseline): a candidate exactly at the margin
    is rejected at most α of the time under continuous monitoring."""
    rng = np.random.default_rng(11)
    runs, looks, per_look = 500, 40, 100
    rejected = 0
    for _ in range(runs):
        cand = rng.random((looks, per_look)) < 0.2
        cost = rng.lognormal(math.log(0.002), 0.5, (looks, per_look)) * np.where(cand, 1.1, 1.0)
        for t in range(1, looks + 1):
            c, v = cand[:t].ravel(), cost[:t].ravel()
            sample = ClusteredSample.from_strata([Stratum(_moments(v[~c]), _moments(v[c]))])
            res = compare_clustered(
                sample, alpha=0.05, min_samples=100, mde_sd=0.2, ratio=1.1, alternative="greater"
            )
            if res.reject:
                rejected += 1
                break
    assert rejected / runs <= 0.05


def test_empty_sample_is_no_evidence() -> None:
    """No data: no estimate, no rejection, infinite variance."""
    res = compare_clustered(ClusteredSample.empty(), alpha=0.05, min_samples=1, mde_sd=0.2)
    assert not res.reject
    assert not res.enough_samples
    assert math.isinf(res.se)


def test_arms_that_never_vary_within_themselves_are_still_decided() -> None:
    """A deterministic code check scoring every baseline call 0 and every candidate call 1:
    no spread within an arm, all of it between the arms. The null-pooled test sees it
    (before, the mixture's scale came from the within-arm spread, 0, and the evidence
    stayed at 1e-5 of what rejecting needs however many calls came)."""
    for n in (30, 300):
        sample = ClusteredSample.from_strata(
            [Stratum(Moments(n, 0.0, 0.0), Moments(n, float(n), float(n)))]
        )
        res = compare_clustered(
            sample, alpha=0.01, min_samples=20, mde_sd=0.5, alternative="greater", pooled=True
        )
        assert res.reject
        assert res.estimate == pytest.approx(1.0)
