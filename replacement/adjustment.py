"""Regression adjustment on pre-treatment covariates (CUPED), kept always valid (pure).

Much of a metric's variance is predictable from what is known about a call before the
variant could act on it: how a unit (user, session) scored, how slow and how error-prone
its calls were before the rollout began; how long the call's input is. Subtracting the
predictable part leaves the difference between the arms unchanged in expectation and
shrinks its variance by the share the covariates explain, ``ρ²`` for one covariate of
correlation ``ρ``: a decision needs that many fewer samples.

Estimator
---------
Each observation ``y`` (of a metric, in a cell: step × arm) carries ``k`` covariates
``x`` (a missing covariate is 0; see :mod:`.history` for how they are centred, so that a
unit without history sits at the mean). With one slope ``θ`` shared by every cell, the
within-cell least-squares fit (ordinary least squares with a fixed effect per cell)::

    θ = (Σ_c Σ_{i∈c} (x_i − x̄_c)(x_i − x̄_c)ᵀ)⁻¹ Σ_c Σ_{i∈c} (x_i − x̄_c)(y_i − ȳ_c)

and each cell's mean becomes ``ȳ_c − θᵀ(x̄_c − x̄_k)`` with ``x̄_k`` the pooled mean of its
stratum (both arms of the step). Routing is random, so both arms' covariates have the
same expectation and the adjusted contrast estimates the same difference as the raw one,
for any ``θ``; the fitted ``θ`` minimises its variance (Deng, Xu, Kohavi & Walker,
"Improving the sensitivity of online controlled experiments by utilizing pre-experiment
data", WSDM 2013; the regression form and its robustness to a wrong linear model: Lin,
"Agnostic notes on regression adjustments to experimental data", Ann. Appl. Stat. 2013).
For a difference the stratum mean cancels; for a ratio margin (cost: ``μ_c − r μ_b``) it
does not, and each cell takes the slope ``θ f_c`` that makes the two forms equal
(:func:`cell_factors`). The adjusted values ``z = y − θ f_c x`` are linear in the sums the
accumulator keeps, so the adjusted sample is again a :class:`~.clustered.ClusteredSample`
and its cluster-robust (sandwich) variance is computed by :func:`.clustered.estimate`,
with units as clusters across steps and arms, exactly as for the raw metric.

Always valid
------------
The test is the normal-mixture mSPRT of :mod:`.stats` applied, at every look, to the
adjusted contrast and its cluster-robust standard error, with ``θ`` re-estimated from all
data so far. This is the heteroskedasticity-robust asymptotic sequential test for a
regression-adjusted treatment effect of Lindon, Ham, Tingley & Bojinov, "Anytime-valid
linear models and regression adjusted causal inference in randomized experiments"
(arXiv:2210.08589, section on robust asymptotic confidence sequences): the mixture over
the effect is applied to the OLS estimate of the treatment effect with covariates, whose
coefficients are nuisance parameters fitted at each look; its time-uniform validity rests
on the strong invariance principle of Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas,
"Time-uniform central limit theory and asymptotic confidence sequences" (2023), the same
basis as the unadjusted tests (normal-mixture boundary: Howard, Ramdas, McAuliffe &
Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence sequences", 2021). The
mixture scale stays ``τ = mde_sd · σ`` with ``σ`` the *raw* metric's standard deviation:
the effects worth detecting do not change with the adjustment, only the information does
(``x = τ² / Var(d_adjusted)``). ``tests/unit/test_adjustment.py`` checks the type I error
under continuous monitoring (every look, not only the last) by simulation.

A covariate that explains nothing gives ``θ ≈ 0`` and the raw test; one that no
observation has (no unit with history) gives ``θ = 0`` exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np

from .clustered import ClusteredSample, Covariates, estimate, sequential_result
from .stats import Alternative, FloatArray, Moments, SequentialResult

__all__ = ["Adjustment", "adjusted", "cell_factors", "compare", "theta"]

_TINY: Final = 1e-12


@dataclass(frozen=True, slots=True)
class Adjustment:
    """What the regression adjustment did at one look: the covariates and their slopes,
    and ``variance_reduction = 1 − Var(adjusted) / Var(raw)`` of the tested contrast
    (cluster-robust both; 0.25 means a quarter fewer samples for the same precision)."""

    names: tuple[str, ...]
    theta: tuple[float, ...]
    raw_variance: float
    adjusted_variance: float

    @property
    def variance_reduction(self) -> float:
        """``1 − Var(adjusted) / Var(raw)`` (negative when the adjustment cost precision)."""
        if not (self.raw_variance > 0 and math.isfinite(self.raw_variance)):
            return 0.0
        return 1.0 - self.adjusted_variance / self.raw_variance


def theta(sample: ClusteredSample) -> FloatArray:
    """The within-cell least-squares slopes of the metric on its covariates (see module
    doc); a covariate without variation within cells gets 0."""
    cov = sample.covariates
    if cov is None or cov.k == 0:
        return np.zeros(0)
    n = np.array([m.n for pair in sample.moments for m in pair], dtype=np.float64)
    total = np.array([m.total for pair in sample.moments for m in pair])
    # Within-cell centring: Σ_c (Σxxᵀ − Σx Σxᵀ / n_c) and Σ_c (Σxy − Σx Σy / n_c).
    inv = np.divide(1.0, n, out=np.zeros_like(n), where=n > 0)
    sxx = cov.sxx.sum(axis=0) - np.einsum("c,ci,cj->ij", inv, cov.sx, cov.sx)
    sxy = cov.sxy.sum(axis=0) - (cov.sx * (total * inv)[:, None]).sum(axis=0)
    if cov.k == 1:
        # The common case, without a solver's overhead.
        return np.array([sxy[0] / sxx[0, 0] if sxx[0, 0] > _TINY else 0.0])
    scale = np.sqrt(np.maximum(np.diag(sxx), 0.0))
    used = scale > _TINY * max(1.0, float(scale.max(initial=0.0)))
    out = np.zeros(cov.k)
    if not used.any():
        return out
    # Standardised, so that covariates of very different scales are solved alike; the
    # least-squares solution gives 0 along a direction without variation.
    s = scale[used]
    solved, *_ = np.linalg.lstsq(
        sxx[np.ix_(used, used)] / np.outer(s, s), sxy[used] / s, rcond=1e-10
    )
    out[used] = solved / s
    return out


def cell_factors(sample: ClusteredSample, ratio: float) -> FloatArray:
    """Per cell, the multiple ``f_c`` of ``θ`` that centres the covariates on the stratum's
    pooled mean in the contrast ``ȳ_c − ratio · ȳ_b`` (all 1 for a difference).

    With ``s_c`` the contrast's coefficient of cell mean ``c`` and ``S_k`` their sum over
    stratum ``k`` (``w_k (1 − ratio) / W``): ``Σ_c s_c θᵀ(x̄_c − x̄_k) = Σ_c s_c f_c θᵀ x̄_c``
    with ``f_c = 1 − S_k n_c / (s_c n_k)``.
    """
    out = np.ones(2 * len(sample.moments))
    if ratio == 1.0:
        return out
    for k, (base, cand) in enumerate(sample.moments):
        n = base.n + cand.n
        if base.n and cand.n:
            out[2 * k] = 1.0 + (1.0 - ratio) * base.n / (ratio * n)
            out[2 * k + 1] = 1.0 - (1.0 - ratio) * cand.n / n
    return out


def adjusted(sample: ClusteredSample, slopes: FloatArray, ratio: float = 1.0) -> ClusteredSample:
    """The sample of ``z = y − θ f_c x`` (see :func:`cell_factors`), without covariates."""
    cov = sample.covariates
    if cov is None or cov.k == 0 or not np.any(slopes):
        return sample
    f = cell_factors(sample, ratio)
    k, cells = cov.k, f.size
    # Θ maps the cells' covariate sums (index c·k + j) to each cell's adjustment.
    blocks = np.zeros((cells, cells, k))
    blocks[np.arange(cells), np.arange(cells)] = np.outer(f, slopes)
    big = blocks.reshape(cells, cells * k)
    t_xy = big @ cov.xy
    yy = sample.yy - t_xy - t_xy.T + big @ cov.xx @ big.T
    ym = sample.ym - big @ cov.xm
    lin = (f * (cov.sx @ slopes)).tolist()
    cross = (f * (cov.sxy @ slopes)).tolist()
    square = (f * f * np.einsum("j,cjl,l->c", slopes, cov.sxx, slopes)).tolist()
    flat = [m for pair in sample.moments for m in pair]
    moments = [
        Moments(m.n, m.total - lin[c], m.total_sq - 2.0 * cross[c] + square[c])
        for c, m in enumerate(flat)
    ]
    pairs = tuple((moments[2 * i], moments[2 * i + 1]) for i in range(len(sample.moments)))
    return ClusteredSample(sample.steps, pairs, yy, ym, sample.mm, sample.clusters)


def compare(
    sample: ClusteredSample,
    *,
    alpha: float,
    min_samples: int,
    mde_sd: float,
    ratio: float = 1.0,
    margin: float = 0.0,
    alternative: Alternative = "two-sided",
    pooled: bool = False,
) -> tuple[SequentialResult, Adjustment | None]:
    """:func:`.clustered.compare_clustered` on the regression-adjusted metric when the
    sample has covariates (see module doc), with what the adjustment achieved."""
    raw = estimate(sample, ratio=ratio, pooled=pooled)
    cov: Covariates | None = sample.covariates
    used, adjustment = raw, None
    if cov is not None and cov.k and math.isfinite(raw.var):
        slopes = theta(sample)
        used = estimate(adjusted(sample, slopes, ratio), ratio=ratio, pooled=pooled)
        adjustment = Adjustment(cov.names, tuple(map(float, slopes)), raw.var, used.var)
    result = sequential_result(
        used,
        alpha=alpha,
        min_samples=min_samples,
        mde_sd=mde_sd,
        margin=margin,
        alternative=alternative,
        sigma2=raw.sigma2,
    )
    return result, adjustment
