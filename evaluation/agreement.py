"""Agreement between two raters of the same calls (people and a judge), with intervals (pure).

- :func:`spearman`: Spearman's rank correlation (average ranks for ties, as
  ``scipy.stats.spearmanr``) with a confidence interval from Fisher's z transform and
  Bonett & Wright's (2000) standard error ``sqrt((1 + rho**2 / 2) / (n - 3))``, which
  covers Spearman's rho better than Pearson's ``1 / sqrt(n - 3)``.
- :func:`cohen_kappa`: Cohen's kappa of two binary ratings with the large-sample
  standard error of Fleiss, Cohen & Everitt (1969), and a normal interval clipped to
  [-1, 1].

Both return ``None`` where the statistic is undefined: too few pairs, or a rater that
gave every call the same score (no ranks to correlate; kappa with chance agreement 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True, slots=True)
class Estimate:
    """A statistic over ``n`` pairs and its two-sided interval at ``confidence``."""

    n: int
    value: float
    low: float
    high: float
    confidence: float

    def as_dict(self) -> dict[str, float | int]:
        """JSON form."""
        return {
            "n": self.n,
            "value": round(self.value, 6),
            "low": round(self.low, 6),
            "high": round(self.high, 6),
            "confidence": self.confidence,
        }


def _z(confidence: float) -> float:
    return float(stats.norm.ppf(0.5 + confidence / 2))


def spearman(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> Estimate | None:
    """Spearman's rho of paired scores with a Fisher-z interval (``None`` if undefined)."""
    n = len(x)
    if n != len(y):
        raise ValueError("x and y must pair up")
    if n < 4:
        return None
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return None
    rho = float(np.corrcoef(rx, ry)[0, 1])
    rho = max(-1.0, min(1.0, rho))
    if abs(rho) == 1.0:
        return Estimate(n, rho, rho, rho, confidence)
    se = math.sqrt((1 + rho * rho / 2) / (n - 3))
    z = math.atanh(rho)
    half = _z(confidence) * se
    return Estimate(n, rho, math.tanh(z - half), math.tanh(z + half), confidence)


def kappa_table(a: Sequence[bool], b: Sequence[bool]) -> np.ndarray:
    """The 2x2 table of proportions: rows are ``a`` (False, True), columns ``b``."""
    if len(a) != len(b):
        raise ValueError("a and b must pair up")
    table = np.zeros((2, 2))
    for i, j in zip(a, b, strict=True):
        table[int(i), int(j)] += 1
    return table / max(len(a), 1)


def kappa_from_table(p: np.ndarray, n: int) -> tuple[float, float] | None:
    """Kappa and its large-sample variance (Fleiss, Cohen & Everitt 1969) from a table of
    proportions ``p`` over ``n`` pairs; ``None`` when chance agreement is 1."""
    rows, cols = p.sum(axis=1), p.sum(axis=0)
    po = float(np.trace(p))
    pe = float(rows @ cols)
    if pe >= 1.0:
        return None
    kappa = (po - pe) / (1 - pe)
    k = p.shape[0]
    a = sum(p[i, i] * (1 - (rows[i] + cols[i]) * (1 - kappa)) ** 2 for i in range(k))
    b = (1 - kappa) ** 2 * sum(
        p[i, j] * (cols[i] + rows[j]) ** 2 for i in range(k) for j in range(k) if i != j
    )
    c = (kappa - pe * (1 - kappa)) ** 2
    variance = max(float(a + b - c), 0.0) / (n * (1 - pe) ** 2)
    return kappa, variance


def cohen_kappa(a: Sequence[bool], b: Sequence[bool], confidence: float = 0.95) -> Estimate | None:
    """Cohen's kappa of two binary ratings of the same items, with a normal interval."""
    n = len(a)
    if n < 4 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    found = kappa_from_table(kappa_table(a, b), n)
    if found is None:
        return None
    kappa, variance = found
    half = _z(confidence) * math.sqrt(variance)
    return Estimate(n, kappa, max(-1.0, kappa - half), min(1.0, kappa + half), confidence)
