"""Sticky hashing of units to rollout arms (``promptd.routing``)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from promptd.routing import BUCKETS, bucket, in_candidate, threshold

# Computed once with the documented formula written independently:
# int(hashlib.sha256(f"{salt}:{unit}".encode()).hexdigest()[:16], 16) % 10000
GOLDEN = [
    ("salt", "unit", 3664),
    ("r-2026-01", "user-42", 7284),
    ("", "", 4368),
    ("abc", "é", 310),
]


@pytest.mark.parametrize(("salt", "unit", "expected"), GOLDEN)
def test_golden_vectors(salt: str, unit: str, expected: int) -> None:
    """bucket() reproduces hard-coded cross-language golden vectors."""
    assert bucket(salt, unit) == expected


def test_monotone_under_ramp_up() -> None:
    """Every unit in the candidate at 10 % stays there at 25, 50 and 75 %."""
    units = [f"u{i}" for i in range(20_000)]
    previous: set[str] = set()
    for weight in (0.10, 0.25, 0.50, 0.75, 1.0):
        current = {u for u in units if in_candidate("ramp", u, weight)}
        assert previous <= current
        assert abs(len(current) / len(units) - weight) < 0.02
        previous = current
    assert not any(in_candidate("ramp", u, 0.0) for u in units[:1000])


def test_threshold_clamps() -> None:
    """Weights outside 0..1 clamp to the bucket range."""
    assert threshold(-0.5) == 0
    assert threshold(1.5) == BUCKETS
    assert threshold(0.1) == 1000


def test_uniform_over_buckets() -> None:
    """One million ids spread uniformly over the 10,000 buckets (chi-square p > 0.001)."""
    buckets = [bucket("uniform", str(i)) for i in range(1_000_000)]
    counts = np.bincount(buckets, minlength=BUCKETS)
    assert counts.size == BUCKETS
    assert stats.chisquare(counts).pvalue > 0.001
