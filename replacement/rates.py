"""A sequential test for rare events (errors) that stays valid at low counts (pure, no I/O).

The normal approximation fails with a handful of events: at a 10 % canary and a 1 % error
rate, 100 candidate requests hold about one expected error, and an always-valid z-test on
them rejected an A/A comparison 6.1 % of the time at a nominal 5 % (issue 10). Here the
error guardrail uses the *conditional binomial* form of the Poisson rate comparison.

Model
-----
In stratum (step) ``k`` the arms served ``n_bk`` and ``n_ck`` requests and saw ``k_bk`` and
``k_ck`` errors. With error counts Poisson in the exposure (rare events), conditionally on
the stratum's total ``K_k`` the candidate's count is binomial::

    k_ck | K_k ~ Binomial(K_k, π_k),   π_k = ρ n_ck / (ρ n_ck + n_bk)

where ``ρ = λ_c / λ_b`` is the rate ratio. The nuisance baseline rate is gone, so the test
is exact at any count. The guardrail's null is non-inferiority at a ratio margin ``ρ0``
(H0: ``λ_c ≤ ρ0 λ_b``); alternatives are ``ρ = ρ0 e^θ`` with ``θ > 0``.

Sequential validity
-------------------
For each ``θ`` the likelihood ratio of the candidate/baseline labels of the errors, against
``θ = 0``, is a non-negative martingale under the null boundary (a supermartingale inside
it). A mixture over ``θ`` with fixed prior weights is again one, so by Ville's inequality
``P(sup_t Λ_t ≥ 1/α) ≤ α`` however often it is looked at. The prior is a discrete half-normal
on a grid of log-ratios (:data:`THETA_GRID`), which keeps the integral exact (a finite sum)
and cheap. Strata multiply, so the comparison is always within a step.

A minimum number of *expected* candidate errors (under equal rates) is required before the
test may reject: evidence from two or three errors is valid but not worth acting on.

Clustered events
----------------
The binomial model treats every request as independent. Routing randomises *units*, and
errors cluster in units: a user whose inputs break the prompt fails again and again. With
5 % of users at a 20 % error rate and the rest at 0.2 %, 20 requests each, the
independent test rejected equal candidates 1.2 % of the time at an allocation of 0.3 %
(issue 23): a few units' repeated errors count as many independent events. The test
therefore takes the *design effect* of the comparison, ``φ = Var_cluster(d) /
Var_independent(d)`` of the difference of error rates (:func:`design_effect`: the
cluster-robust variance with units as clusters, as in :mod:`.clustered`, over the variance
with every request its own cluster, both under the null), and divides every count by it:
``k/φ`` events out of ``n/φ`` requests, the Rao–Scott adjustment for clustered binary data
(Rao & Scott, "A simple method for the analysis of clustered binary data", Biometrics
1992). Each stratum's log likelihood ratio becomes ``ℓ_k(θ)/φ``, the quasi-likelihood
whose score has the variance the clusters give it, and the minimum of expected events
counts effective events (``expected/φ``). ``φ`` is never taken below 1: with independent
errors the test is the exact one above, valid at any count; with clustered errors its
validity, like the cluster-robust mean tests', is asymptotic in the number of units
(``tests/unit/test_rates.py`` measures it under continuous monitoring).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from .clustered import ClusteredSample, estimate
from .stats import FloatArray, Stratum

__all__ = ["THETA_GRID", "RateResult", "design_effect", "prior_weights", "rate_ratio_test"]

THETA_GRID: Final = np.linspace(0.025, 3.0, 120)
"""Log rate-ratio alternatives beyond the margin (ratios 1.02 … 20 times the margin)."""

DEFAULT_THETA_SCALE: Final = 0.75
"""Scale of the half-normal prior on θ: most mass on 1.1–3 times the margin."""


def prior_weights(scale: float = DEFAULT_THETA_SCALE) -> FloatArray:
    """Half-normal prior weights on :data:`THETA_GRID` (they sum to one)."""
    w = np.exp(-0.5 * (THETA_GRID / scale) ** 2)
    return np.asarray(w / w.sum())


@functools.cache
def _log_prior(scale: float) -> FloatArray:
    return np.asarray(np.log(prior_weights(scale)))


@dataclass(frozen=True, slots=True)
class RateResult:
    """Outcome of one look of the error-rate test.

    ``ratio`` is the observed candidate/baseline rate ratio (Mantel–Haenszel over strata),
    ``expected`` the candidate errors expected under equal rates, ``log_lr`` the log of the
    mixture likelihood ratio against the margin, ``dispersion`` the design effect the
    counts were divided by (1: independent requests).
    """

    ratio: float
    rate_baseline: float
    rate_candidate: float
    events: int
    expected: float
    log_lr: float
    enough_events: bool
    reject: bool
    dispersion: float = 1.0

    @property
    def p_value(self) -> float:
        """Always-valid p-value at this look, ``min(1, 1 / Λ)``."""
        return float(min(1.0, math.exp(-self.log_lr)))


def rate_ratio_test(
    strata: Sequence[Stratum],
    *,
    alpha: float,
    margin_ratio: float = 1.0,
    min_expected: float = 5.0,
    scale: float = DEFAULT_THETA_SCALE,
    dispersion: float = 1.0,
) -> RateResult:
    """Always-valid test of H0 ``λ_c ≤ margin_ratio · λ_b`` on per-step event counts.

    Each stratum's ``Moments`` are per request: ``n`` requests and ``total`` events (an
    error is 1, a success 0). ``dispersion`` is the design effect of clustered events
    (see the module doc; values below 1 count as 1).
    """
    phi = max(1.0, dispersion)
    used = [s for s in strata if s.baseline.n > 0 and s.candidate.n > 0]
    nb = [float(s.baseline.n) for s in used]
    nc = [float(s.candidate.n) for s in used]
    kb = [s.baseline.total for s in used]
    kc = [s.candidate.total for s in used]
    totals = [b + c for b, c in zip(kb, kc, strict=True)]
    expected = sum(k * c / (b + c) for k, b, c in zip(totals, nb, nc, strict=True))
    rate_b = sum(kb) / sum(nb) if used else 0.0
    rate_c = sum(kc) / sum(nc) if used else 0.0
    # Mantel–Haenszel rate ratio: Σ k_c n_b / n over Σ k_b n_c / n.
    num = sum(k * b / (b + c) for k, b, c in zip(kc, nb, nc, strict=True))
    den = sum(k * c / (b + c) for k, b, c in zip(kb, nb, nc, strict=True))
    ratio = num / den if den > 0 else (math.inf if num > 0 else 1.0)
    pi0 = [margin_ratio * c / (margin_ratio * c + b) for b, c in zip(nb, nc, strict=True)]
    log_lr = _log_mixture(pi0, totals, sum(kc), scale, phi) if sum(totals) > 0 else 0.0
    enough = expected / phi >= min_expected
    return RateResult(
        ratio=ratio,
        rate_baseline=rate_b,
        rate_candidate=rate_c,
        events=round(sum(totals)),
        expected=expected,
        log_lr=log_lr,
        enough_events=enough,
        reject=bool(enough and log_lr >= math.log(1.0 / alpha)),
        dispersion=phi,
    )


def design_effect(sample: ClusteredSample) -> float:
    """``Var_cluster(d) / Var_independent(d)`` of the stratified difference of rates (see
    the module doc), both under the null of equal rates within a step; 1 without data."""
    clustered = estimate(sample, pooled=True)
    strata = [Stratum(b, c, step=s) for s, (b, c) in zip(sample.steps, sample.moments, strict=True)]
    independent = estimate(ClusteredSample.from_strata(strata), pooled=True)
    if not (math.isfinite(clustered.var) and math.isfinite(independent.var)):
        return 1.0
    if independent.var <= 0:
        return 1.0
    return max(1.0, clustered.var / independent.var)


def _log_mixture(
    pi0: list[float], totals: list[float], kc: float, scale: float, phi: float = 1.0
) -> float:
    """``log Σ_i w_i Π_k LR_k(θ_i)^(1/φ)`` for the binomial likelihood ratios of the strata.

    With ``π_k(θ) = π0_k e^θ / (1 + π0_k (e^θ − 1))`` the log ratio of stratum ``k`` is
    ``k_ck θ − K_k log(1 + π0_k (e^θ − 1))``; ``φ`` the design effect (module doc).
    """
    grow = np.log1p(_EXPM1[:, None] * np.asarray(pi0)[None, :]) @ np.asarray(totals)
    terms = (kc * THETA_GRID - grow) / phi + _log_prior(scale)
    top = float(terms.max())
    # A hand-written log-sum-exp: scipy's costs 60 µs, a tenth of a whole tick.
    return top + math.log(float(np.exp(terms - top).sum()))


_EXPM1: Final = np.expm1(THETA_GRID)
