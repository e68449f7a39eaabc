"""Agreement statistics by simulation with fixed seeds, against scipy and closed forms:
Spearman's rho and its interval, Cohen's kappa, its variance and its interval; and the
calibration's pairs, report and floor."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from promptd.evaluation.agreement import cohen_kappa, kappa_from_table, spearman
from promptd.evaluation.calibration import Pair, Pairs, below_floor, report


def test_spearman_matches_scipy_with_ties() -> None:
    """The estimate is scipy's spearmanr, ties (thumbs, a 1..5 judge) included."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(5, 200))
        x = rng.integers(0, 2, n).astype(float)
        y = np.clip(x * 2 + rng.integers(1, 4, n), 1, 5) / 5
        est = spearman(list(x), list(y))
        expected = stats.spearmanr(x, y).statistic
        if np.isnan(expected):
            assert est is None
        else:
            assert est is not None
            assert est.value == pytest.approx(expected, abs=1e-12)
            assert est.low <= est.value <= est.high


def test_spearman_interval_covers_the_population_value() -> None:
    """For a bivariate normal with correlation r, Spearman's rho is (6/pi) asin(r/2); the
    95 % interval covers it in about 95 % of 2000 samples of 60 pairs."""
    rng = np.random.default_rng(2)
    r = 0.5
    truth = 6 / math.pi * math.asin(r / 2)
    cov = [[1, r], [r, 1]]
    hits = 0
    trials = 2000
    for _ in range(trials):
        xy = rng.multivariate_normal([0, 0], cov, 60)
        est = spearman(list(xy[:, 0]), list(xy[:, 1]))
        assert est is not None
        hits += est.low <= truth <= est.high
    assert 0.93 <= hits / trials <= 0.97


def test_kappa_matches_its_closed_form() -> None:
    """kappa = (po - pe) / (1 - pe) on a worked table."""
    a = [True] * 40 + [False] * 60
    b = [True] * 30 + [False] * 10 + [True] * 15 + [False] * 45
    est = cohen_kappa(a, b)
    assert est is not None
    po = (30 + 45) / 100
    pe = 0.4 * 0.45 + 0.6 * 0.55
    assert est.value == pytest.approx((po - pe) / (1 - pe))


def test_kappa_variance_matches_the_simulated_variance() -> None:
    """The large-sample variance (Fleiss, Cohen & Everitt) at the population table equals
    the variance of kappa over 4000 simulated samples of 200 pairs, within 10 %; the
    interval covers the population kappa about 95 % of the time."""
    p = np.array([[0.45, 0.10], [0.15, 0.30]])
    n, trials = 200, 4000
    kappa_true, variance = kappa_from_table(p, n) or (0.0, 0.0)
    rng = np.random.default_rng(3)
    cells = rng.choice(4, size=(trials, n), p=p.ravel())
    kappas, hits = [], 0
    for row in cells:
        a = list(row >= 2)
        b = list(row % 2 == 1)
        est = cohen_kappa(a, b)
        assert est is not None
        kappas.append(est.value)
        hits += est.low <= kappa_true <= est.high
    assert float(np.var(kappas)) == pytest.approx(variance, rel=0.1)
    assert 0.93 <= hits / trials <= 0.97


def test_undefined_statistics_are_none() -> None:
    """Too few pairs, or one rater giving a single score, give no statistic."""
    assert spearman([1, 2, 3], [1, 2, 3]) is None
    assert spearman([1, 1, 1, 1, 1], [1, 2, 3, 4, 5]) is None
    assert cohen_kappa([True] * 10, [True] * 10) is None
    assert cohen_kappa([True] * 10, [True, False] * 5) is None
    assert cohen_kappa([True, False, True], [True, False, False]) is None


def test_pairs_are_kept_once_and_pruned_by_time() -> None:
    """A pair offered twice (met from both sides) counts once; old pairs leave; late
    pairs keep time order; the cap keeps the newest."""
    pairs = Pairs(window_s=100.0, max_pairs=3)
    assert pairs.add("p", "j", Pair(10.0, 1.0, 0.8, "f1"))
    assert not pairs.add("p", "j", Pair(10.0, 1.0, 0.8, "f1"))
    pairs.add("p", "j", Pair(50.0, 0.0, 0.2, "f2"))
    pairs.add("p", "j", Pair(30.0, 0.0, 0.4, "f3"))
    assert [p.feedback_id for p in pairs.get("p", "j")] == ["f1", "f3", "f2"]
    pairs.add("p", "j", Pair(60.0, 1.0, 1.0, "f4"))
    assert [p.feedback_id for p in pairs.get("p", "j")] == ["f3", "f2", "f4"]
    pairs.prune(now=140.0)
    assert [p.feedback_id for p in pairs.get("p", "j")] == ["f2", "f4"]
    assert pairs.add("p", "j", Pair(10.0, 1.0, 0.8, "f1"))  # forgotten, so new again


def test_the_floor_alert_needs_confidence() -> None:
    """A judge that disagrees with people is below the floor once the interval's upper
    end is; an agreeing judge or too few pairs never is."""
    rng = np.random.default_rng(4)
    human = rng.integers(0, 2, 200).astype(float)
    good = [
        Pair(float(i), h, min(1.0, h * 0.8 + rng.random() * 0.3), f"f{i}")
        for i, h in enumerate(human)
    ]
    noise = [Pair(float(i), h, float(rng.random()), f"f{i}") for i, h in enumerate(human)]
    kwargs = {"confidence": 0.95, "binary_threshold": 0.5, "min_pairs": 30}
    agreeing = report("p", "j", good, **kwargs)
    random_judge = report("p", "j", noise, **kwargs)
    few = report("p", "j", noise[:20], **kwargs)
    assert below_floor(agreeing, 0.3, 0.2) is None
    reason = below_floor(random_judge, 0.3, 0.2)
    assert reason is not None
    assert "Spearman" in reason
    assert few.spearman is None
    assert below_floor(few, 0.3, 0.2) is None
    hist = report("p", "j", good, periods=4, now=200.0, window_s=200.0, **kwargs).history
    assert [n for _, _, n in hist] == [50, 50, 50, 50]
