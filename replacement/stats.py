"""Always-valid sequential statistics for rollouts and A/B tests (pure, no I/O).

The controller looks at the data on every tick, so a fixed-horizon p-value checked again and
again would reject a true null far more often than ``alpha``. Everything here is *always
valid*: the probability that a test ever rejects a true null, however often it is looked at,
is at most ``alpha``.

Method: normal-mixture sequential probability ratio test (mSPRT)
-----------------------------------------------------------------
For an estimate ``d`` of the difference candidate − baseline with standard error ``se``, let
``Z = (d - margin) / se`` and the information ``I = 1 / se**2``. Mixing the Gaussian likelihood
ratio over effects ``theta ~ N(0, tau**2)`` gives, with ``x = I * tau**2``::

    Lambda = (1 + x) ** -0.5 * exp(Z**2 / 2 * x / (1 + x))

``Lambda`` is a non-negative martingale under the null, so by Ville's inequality
``P(sup_t Lambda_t >= 1/alpha) <= alpha``. The two-sided test rejects when::

    Z**2 >= (1 + x) / x * (ln(1 + x) + 2 ln(1 / alpha))

and the matching confidence sequence is ``d ± se * sqrt(that bound)``. One-sided tests
(guardrails: "the candidate is worse") mix over a half-normal instead, which adds
``ln 2 + ln Phi(Z sqrt(x / (1 + x)))`` to ``ln Lambda``; it is again a martingale, so the
one-sided test is exactly valid and, for the large ``Z`` that matter, as sharp as the
two-sided one at ``2 * alpha``.

References: Johari, Pekelis & Walsh, "Always valid inference" (2017/2022); Howard, Ramdas,
McAuliffe & Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence sequences" (2021),
normal mixture boundary; Waudby-Smith et al., "Time-uniform central limit theory and
asymptotic confidence sequences" (2023), eq. 9, as implemented by GrowthBook's ``gbstats``
(``SequentialTwoSidedTTest``: ``N * rho**2`` there is ``x`` here).

Choice of tau
-------------
``tau`` is set in standard-deviation units: ``tau = mde_sd * sigma``, so ``x = mde_sd**2 * W``
where ``W = sum_k n_b,k n_c,k / (n_b,k + n_c,k)`` is the effective sample size (with
clustered data, :mod:`.clustered` uses ``sigma**2 / Var(d)`` for ``W``). The mixture is
tightest (the bound on ``Z`` is smallest) near ``x ≈ 8``. The rollout profiles use
``mde_sd = 0.15``, chosen with ``bench/rollout_stats.py`` so that a drop of a 0.8 rate to
0.72 at a 10 % canary is caught within 6,000 requests in 95 % of rollouts.

Strata and pooled variance
--------------------------
Observations are stratified by rollout step: each :class:`Stratum` holds one step's samples of
both arms, so the arms are always compared over the same period (never a recent candidate
against an old baseline). The per-stratum differences are combined with weights
``w_k = n_b n_c / (n_b + n_c)`` (the Cochran–Mantel–Haenszel weights, which do not depend on
noisy variance estimates). The variance is pooled within strata over both arms, i.e.
estimated under the null of equal means, so a metric with a low event rate (1 % errors at a
10 % canary) is not judged on the candidate's own near-zero variance; then
``Var(d) = sigma**2 / W``. A minimum number of samples per arm is required before any test
may reject, because the normal approximation is poor for a handful of rare events.

All inputs are sufficient statistics (count, sum, sum of squares per arm per stratum). The
rollout machine tests means with the cluster-robust form in :mod:`.clustered` (units, not
requests, are independent) and error rates with the exact test in :mod:`.rates`; the
functions here are the mixture core, the sample-ratio check and the absolute error test.
The ``*_arrays`` functions are vectorised over any leading axes (the last axis is the
stratum) for simulations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from scipy import special, stats

FloatArray = npt.NDArray[np.float64]
Alternative = Literal["two-sided", "greater", "less"]

DEFAULT_MDE_SD: Final = 0.2
"""Default mixture scale ``tau`` in standard deviations of the metric (see module doc)."""

SRM_TAU: Final = 0.05
"""Mixture scale for the SRM test, in standard deviations of a unit's arm indicator."""

_TINY: Final = 1e-12


@dataclass(frozen=True, slots=True)
class Moments:
    """Sufficient statistics of one arm: ``n`` samples, their ``total`` and ``total_sq``.

    For a Bernoulli metric (success, error) ``total_sq == total``; for latency pass the sums
    of ``ln(latency)`` and ``ln(latency)**2``.
    """

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    @classmethod
    def of(cls, values: Sequence[float]) -> Moments:
        """Moments of a list of observations (convenience for tests and small inputs)."""
        arr = np.asarray(values, dtype=np.float64)
        return cls(int(arr.size), float(arr.sum()), float((arr * arr).sum()))

    @property
    def mean(self) -> float:
        """Sample mean, 0.0 when empty."""
        return self.total / self.n if self.n else 0.0


@dataclass(frozen=True, slots=True)
class Stratum:
    """One rollout step's samples of both arms; ``step`` is the step index it belongs to."""

    baseline: Moments
    candidate: Moments
    step: int = 0


@dataclass(frozen=True, slots=True)
class SequentialResult:
    """Outcome of one always-valid comparison of candidate against baseline.

    ``estimate`` is candidate − baseline (combined over strata), ``lower``/``upper`` the
    two-sided confidence sequence at the test's alpha, ``reject`` whether the null
    (difference ≤/≥/= ``margin`` as per the alternative) is rejected, ``enough_samples``
    whether both arms reached the minimum (no rejection without it).
    """

    estimate: float
    se: float
    z: float
    log_lr: float
    lower: float
    upper: float
    n_baseline: int
    n_candidate: int
    enough_samples: bool
    reject: bool

    @property
    def p_value(self) -> float:
        """Always-valid p-value at this look, ``min(1, 1 / Lambda)``."""
        return float(min(1.0, math.exp(-self.log_lr)))


@dataclass(frozen=True, slots=True)
class SrmResult:
    """Sample ratio mismatch check of one step's unit counts against the intended split."""

    chi2: float
    log_lr: float
    enough_samples: bool
    mismatch: bool

    @property
    def fixed_p_value(self) -> float:
        """The fixed-horizon chi-square p-value (1 dof), for reference only."""
        return math.erfc(math.sqrt(max(self.chi2, 0.0) / 2.0))


def msprt_z2_threshold(x: FloatArray | float, alpha: float) -> FloatArray:
    """Two-sided mSPRT bound on ``Z**2``: ``(1+x)/x * (ln(1+x) + 2 ln(1/alpha))``."""
    xa = np.maximum(np.asarray(x, dtype=np.float64), _TINY)
    return np.asarray((1.0 + xa) / xa * (np.log1p(xa) + 2.0 * math.log(1.0 / alpha)))


def mixture_log_lr(
    z: FloatArray | float, x: FloatArray | float, alternative: Alternative = "two-sided"
) -> FloatArray:
    """Log of the normal-mixture likelihood ratio at standardized statistic ``z``.

    ``"greater"`` mixes over a half-normal on positive effects, ``"less"`` on negative ones.
    """
    za = np.asarray(z, dtype=np.float64)
    xa = np.maximum(np.asarray(x, dtype=np.float64), 0.0)
    shrink = xa / (1.0 + xa)
    log_lr = -0.5 * np.log1p(xa) + 0.5 * za * za * shrink
    if alternative == "two-sided":
        return np.asarray(log_lr)
    signed = za if alternative == "greater" else -za
    return np.asarray(log_lr + math.log(2.0) + special.log_ndtr(signed * np.sqrt(shrink)))


def mixture_log_lr_scalar(z: float, x: float, alternative: Alternative = "two-sided") -> float:
    """:func:`mixture_log_lr` for one look (plain floats: a tenth of the numpy call's cost)."""
    shrink = max(x, 0.0) / (1.0 + max(x, 0.0))
    log_lr = -0.5 * math.log1p(max(x, 0.0)) + 0.5 * z * z * shrink
    if alternative == "two-sided":
        return log_lr
    signed = z if alternative == "greater" else -z
    return log_lr + math.log(2.0) + _log_ndtr(signed * math.sqrt(shrink))


def _log_ndtr(x: float) -> float:
    """``ln Φ(x)``; erfc is exact to far in the tail, scipy takes over beyond it."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    return float(special.log_ndtr(x))


def msprt_z2_threshold_scalar(x: float, alpha: float) -> float:
    """:func:`msprt_z2_threshold` for one look."""
    xa = max(x, _TINY)
    return (1.0 + xa) / xa * (math.log1p(xa) + 2.0 * math.log(1.0 / alpha))


def combine_strata_arrays(
    baseline: tuple[FloatArray, FloatArray, FloatArray],
    candidate: tuple[FloatArray, FloatArray, FloatArray],
    *,
    pooled: bool = True,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Combined difference, its variance and effective size ``W`` from per-stratum moments.

    ``baseline`` and ``candidate`` are ``(n, sum, sum_sq)`` arrays whose last axis is the
    stratum. ``pooled`` estimates the variance around the stratum's pooled mean (null of
    equal means, right for Bernoulli metrics); otherwise around each arm's own mean.
    Returns arrays over the leading axes; the variance is ``inf`` when ``W == 0``.
    """
    nb, sb, qb = (np.asarray(a, dtype=np.float64) for a in baseline)
    nc, sc, qc = (np.asarray(a, dtype=np.float64) for a in candidate)
    n = nb + nc
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where((nb > 0) & (nc > 0), nb * nc / np.where(n > 0, n, 1.0), 0.0)
        d_k = np.where(w > 0, sc / np.maximum(nc, 1.0) - sb / np.maximum(nb, 1.0), 0.0)
        if pooled:
            ss = (qb + qc) - (sb + sc) ** 2 / np.maximum(n, 1.0)
            dof = n - (n > 0)
        else:
            ss = qb - sb**2 / np.maximum(nb, 1.0) + qc - sc**2 / np.maximum(nc, 1.0)
            dof = n - (nb > 0) - (nc > 0)
        big_w = w.sum(axis=-1)
        sigma2 = np.maximum(ss, 0.0).sum(axis=-1) / np.maximum(dof.sum(axis=-1), 1.0)
        d = np.where(big_w > 0, (w * d_k).sum(axis=-1) / np.where(big_w > 0, big_w, 1.0), 0.0)
        var = np.where(big_w > 0, np.maximum(sigma2, _TINY) / big_w, np.inf)
    return d, var, big_w


def sequential_reject_arrays(
    d: FloatArray,
    var: FloatArray,
    big_w: FloatArray,
    *,
    alpha: float,
    mde_sd: float = DEFAULT_MDE_SD,
    margin: FloatArray | float = 0.0,
    alternative: Alternative = "two-sided",
) -> tuple[FloatArray, FloatArray]:
    """Vectorised mSPRT: returns ``(z, log_lr)``; reject where ``log_lr >= ln(1/alpha)``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(np.isfinite(var), (d - margin) / np.sqrt(var), 0.0)
    x = mde_sd * mde_sd * big_w
    return z, mixture_log_lr(z, x, alternative)


def compare_means(
    strata: Sequence[Stratum],
    *,
    alpha: float,
    min_samples: int,
    mde_sd: float = DEFAULT_MDE_SD,
    margin: float = 0.0,
    alternative: Alternative = "two-sided",
    pooled: bool = True,
) -> SequentialResult:
    """Always-valid test of candidate − baseline against ``margin`` over step strata.

    ``alternative="greater"`` tests H0: difference ≤ margin (e.g. the candidate is slower by
    more than the margin), ``"less"`` the mirror image, ``"two-sided"`` H0: difference = margin.
    """

    def column(arm: str, field: str) -> FloatArray:
        return np.array([getattr(getattr(s, arm), field) for s in strata], dtype=np.float64)

    base = (column("baseline", "n"), column("baseline", "total"), column("baseline", "total_sq"))
    cand = (
        column("candidate", "n"),
        column("candidate", "total"),
        column("candidate", "total_sq"),
    )
    d, var, big_w = combine_strata_arrays(base, cand, pooled=pooled)
    z, log_lr = sequential_reject_arrays(
        d, var, big_w, alpha=alpha, mde_sd=mde_sd, margin=margin, alternative=alternative
    )
    n_b, n_c = int(base[0].sum()), int(cand[0].sum())
    enough = min(n_b, n_c) >= min_samples and float(big_w) > 0
    se = float(np.sqrt(var))
    half = se * float(np.sqrt(msprt_z2_threshold(mde_sd * mde_sd * big_w, alpha)))
    return SequentialResult(
        estimate=float(d),
        se=se,
        z=float(z),
        log_lr=float(log_lr),
        lower=float(d) - half,
        upper=float(d) + half,
        n_baseline=n_b,
        n_candidate=n_c,
        enough_samples=enough,
        reject=bool(enough and float(log_lr) >= math.log(1.0 / alpha)),
    )


def srm_arrays(
    baseline_units: FloatArray,
    candidate_units: FloatArray,
    weight: float,
    *,
    tau: float = SRM_TAU,
) -> tuple[FloatArray, FloatArray]:
    """Vectorised SRM statistic: returns ``(chi2, log_lr)`` for the intended ``weight``.

    ``chi2`` is Pearson's statistic with one degree of freedom, i.e. ``Z**2`` with
    ``Z = (n_c - N w) / sqrt(N w (1 - w))``; it is judged against the two-sided mixture
    bound with ``x = N * tau**2`` instead of the fixed quantile, because it is checked on
    every tick.
    """
    nb = np.asarray(baseline_units, dtype=np.float64)
    nc = np.asarray(candidate_units, dtype=np.float64)
    total = nb + nc
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(
            total > 0,
            (nc - total * weight) / np.sqrt(np.maximum(total * weight * (1 - weight), _TINY)),
            0.0,
        )
    return z * z, mixture_log_lr(z, total * tau * tau)


def srm_test(
    baseline_units: int,
    candidate_units: int,
    weight: float,
    *,
    alpha: float = 0.001,
    min_expected: int = 50,
    tau: float = SRM_TAU,
) -> SrmResult:
    """Sample ratio mismatch of one step: always-valid chi-square against ``weight``.

    Needs at least ``min_expected`` expected units in each arm before it may flag; a
    weight of 0 or 1 has nothing to check.
    """
    total = baseline_units + candidate_units
    expected_min = total * min(weight, 1.0 - weight)
    enough = 0.0 < weight < 1.0 and expected_min >= min_expected
    if total > 0 and 0.0 < weight < 1.0:
        z = (candidate_units - total * weight) / math.sqrt(total * weight * (1 - weight))
    else:
        z = 0.0
    log_lr = mixture_log_lr_scalar(z, total * tau * tau)
    return SrmResult(
        chi2=z * z,
        log_lr=log_lr,
        enough_samples=enough,
        mismatch=bool(enough and log_lr >= math.log(1.0 / alpha)),
    )


def fixed_horizon_total_n(
    p_baseline: float,
    p_candidate: float,
    weight: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
) -> float:
    """Total requests for a fixed-horizon z-test at a candidate share ``weight``.

    Uses ``Var = p_b q_b / n_b + p_c q_c / n_c`` (unpooled, normal approximation) with
    ``n_c = weight * N``: ``N = (z_{1-a/2} + z_{power})**2 (p_b q_b/(1-w) + p_c q_c/w) / d**2``.
    """
    za = float(stats.norm.ppf(1 - alpha / 2))
    zb = float(stats.norm.ppf(power))
    var_unit = (
        p_baseline * (1 - p_baseline) / (1 - weight) + p_candidate * (1 - p_candidate) / weight
    )
    return (za + zb) ** 2 * var_unit / (p_baseline - p_candidate) ** 2
