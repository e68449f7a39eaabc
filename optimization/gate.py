"""The gate: does the one selected candidate beat the active version on the test split?

Only one candidate reaches the gate: the search selected it on the validation split,
and the test split is one no search has seen (see :mod:`promptd.optimization.examples`).
Testing a single candidate on fresh examples is what keeps the false-pass rate at the
test's level; testing a pool and keeping the best (what promptd did before) passes a
no-better candidate about half the time.

The test is paired: each test example is answered under both templates, and ``d_i`` is
the candidate's score minus the active version's. The gate asks whether the mean gain
exceeds ``min_gain``: it tests ``H0: E[d] <= min_gain`` one-sided, and rejects only when
**both** of two tests of ``d_i - min_gain`` do (the p-value is the larger of the two):

* a **sign-flip randomization test**: the observed mean is compared with the means of
  randomly sign-flipped differences, ``p = (1 + #{flipped >= observed}) / (1 + B)`` (all
  ``2^n`` sign patterns when that is at most ``B``). It needs no normality and is exact
  when the differences are symmetric under the null (two templates whose answers are
  exchangeable). The code compares t statistics; under sign flips the t statistic is an
  increasing function of the mean (the sum of squares does not change), so this is the
  same test;
* a **bootstrap-t test**: the observed t statistic of ``d_i - min_gain`` against the t
  statistics of resamples of the differences centred on their mean. Studentizing is
  what makes it second-order accurate for one-sided tests of skewed differences (Hall,
  *The Bootstrap and Edgeworth Expansion*, 1992): a candidate slightly better on most
  examples and much worse on a few. The sign-flip test assumes symmetry and passes such
  a candidate, sitting exactly at ``min_gain``, 7.2 % of the time at 40 examples and
  still 7 % at 100; the bootstrap-t alone is slightly liberal on the many tied
  differences of exchangeable answers (6.6 % at the boundary). Each resample's spread
  counts as at least a quarter of the sample's (:data:`SPREAD_FLOOR`): scores in 0..1
  make resamples that miss a candidate's few failures nearly spread-free, and their
  exploding t statistics failed an excellent candidate. Together they pass at most
  5 % in both cases (``tests/unit/test_optimize_gate.py``, ``bench/optimize_quality.py``), at
  almost no cost in power.

The gate passes when the confidence ``1 - p`` that the gain exceeds ``min_gain`` reaches
``min_confidence_for_deployment`` (0.95 by default: a candidate no better than the active
version plus ``min_gain`` passes at most about 5 % of the time). The gain is reported
with a two-sided 95 % percentile-bootstrap interval.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np

INTERVAL_LEVEL = 0.95


@dataclass(frozen=True, slots=True)
class GateResult:
    """The gate's decision with every figure it rests on."""

    passed: bool
    reason: str  # passed | low_confidence | small_gain | too_few_examples
    n: int
    candidate_mean: float
    baseline_mean: float
    gain: float
    ci_low: float
    ci_high: float
    interval_level: float
    confidence: float
    p_value: float
    min_confidence: float
    min_gain: float
    # The two tests' p-values (``p_value`` is the larger).
    p_sign_flip: float = 1.0
    p_bootstrap_t: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the run row, events and the API."""
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


# Spreads and means below this (in the metric's 0..1 units) are rounding, not data: a
# resampled row of one repeated difference minus the mean is a few ulps off zero.
_TINY = 1e-12


def _t(x: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """Row-wise t statistics, each row's spread taken as at least ``floor``. Without a
    floor, a row without spread has none: +inf when its mean is positive, else -inf
    (never "as extreme")."""
    sd = x.std(axis=-1, ddof=1)
    mean = x.mean(axis=-1)
    root_n = np.sqrt(x.shape[-1])
    if floor > 0.0:
        return np.asarray(mean / np.maximum(sd, floor) * root_n)
    spread = sd > _TINY
    safe = np.where(spread, sd, 1.0)
    flat = np.where(mean > _TINY, np.inf, -np.inf)
    return np.where(spread, mean / safe * root_n, flat)


def sign_flip_p_value(
    diffs: Sequence[float], samples: int, seed: int, margin: float = 0.0
) -> float:
    """One-sided p-value of ``H0: E[d] <= margin`` by studentized sign-flip randomization."""
    d = np.asarray(diffs, dtype=float) - margin
    n = len(d)
    if n < 2:
        return 1.0
    observed = _t(d[None, :])[0]
    if 2**n <= samples:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        # The identity pattern is among them: an exact p-value.
        return float((_t(signs * d) >= observed - 1e-9).mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(samples, n))
    return float((1 + (_t(signs * d) >= observed - 1e-9).sum()) / (1 + samples))


#: A resample's spread counts as at least this share of the sample's (bootstrap-t).
SPREAD_FLOOR: Final = 0.25


def bootstrap_t_p_value(
    diffs: Sequence[float], samples: int, seed: int, margin: float = 0.0
) -> float:
    """One-sided p-value of ``H0: E[d] <= margin`` by the bootstrap-t (resamples of the
    differences, centred on their mean, studentized).

    Each resample's spread is taken as at least :data:`SPREAD_FLOOR` of the sample's.
    Scores in 0..1 make the differences a lattice: a candidate right on all but two of 37
    examples gives resamples that missed those two, whose spread is only the small
    differences left and whose t statistic is then larger than the observed one however
    good the candidate (measured on SmolLM2: a gain of 0.945 failed at p = 0.07). Such a
    resample says nothing about the mean's uncertainty; floored, it is not "as extreme".
    The floor leaves the test's calibration on skewed differences (the reason for the
    bootstrap-t, see module doc) within its level: tests/unit/test_optimize_gate.py.
    Differences that are one repeated value have no spread at all: only their sign
    against the margin decides.
    """
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n < 2:
        return 1.0
    sd = float(d.std(ddof=1))
    if sd <= _TINY:
        return 1.0 / (1 + samples) if d.mean() - margin > _TINY else 1.0
    floor = SPREAD_FLOOR * sd
    observed = _t((d - margin)[None, :], floor)[0]
    rng = np.random.default_rng(seed + 2)
    resampled = d[rng.integers(0, n, size=(samples, n))] - d.mean()
    extreme = (_t(resampled, floor) >= observed - 1e-9).sum()
    return float((1 + extreme) / (1 + samples))


def bootstrap_interval(
    diffs: Sequence[float], samples: int, seed: int, level: float = INTERVAL_LEVEL
) -> tuple[float, float]:
    """Two-sided percentile-bootstrap interval of the mean difference."""
    d = np.asarray(diffs, dtype=float)
    if len(d) == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed + 1)
    idx = rng.integers(0, len(d), size=(samples, len(d)))
    means = d[idx].mean(axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def decide(
    candidate: Sequence[float],
    baseline: Sequence[float],
    *,
    min_confidence: float,
    min_gain: float,
    samples: int,
    seed: int,
    min_examples: int = 2,
) -> GateResult:
    """The gate's decision on paired per-example scores (same examples, same order)."""
    if len(candidate) != len(baseline):
        raise ValueError("paired scores must have the same length")
    n = len(candidate)
    c = np.asarray(candidate, dtype=float)
    b = np.asarray(baseline, dtype=float)
    diffs = c - b
    if n < min_examples:
        return GateResult(
            False,
            "too_few_examples",
            n,
            float(c.mean()) if n else 0.0,
            float(b.mean()) if n else 0.0,
            float(diffs.mean()) if n else 0.0,
            0.0,
            0.0,
            INTERVAL_LEVEL,
            0.0,
            1.0,
            min_confidence,
            min_gain,
        )
    p_flip = sign_flip_p_value(diffs, samples, seed, margin=min_gain)
    p_boot = bootstrap_t_p_value(diffs, samples, seed, margin=min_gain)
    p = max(p_flip, p_boot)
    low, high = bootstrap_interval(diffs, samples, seed)
    gain = float(diffs.mean())
    confidence = 1.0 - p
    if gain < min_gain:
        passed, reason = False, "small_gain"
    elif confidence < min_confidence:
        passed, reason = False, "low_confidence"
    else:
        passed, reason = True, "passed"
    return GateResult(
        passed,
        reason,
        n,
        float(c.mean()),
        float(b.mean()),
        gain,
        low,
        high,
        INTERVAL_LEVEL,
        confidence,
        p,
        min_confidence,
        min_gain,
        p_flip,
        p_boot,
    )


def seed_for(run_id: str) -> int:
    """A stable seed from the run id (same run, same randomization, same decision)."""
    return int.from_bytes(run_id.encode()[-8:].rjust(8, b"\0"), "big") % (2**32)
