"""Log-bucketed latency histogram with a documented relative error bound.

The scheme is the one of DDSketch (Masson et al., VLDB 2019) without bucket collapsing:
a positive value ``v`` goes to bucket ``i = ceil(log(v) / log(gamma))`` with
``gamma = (1 + alpha) / (1 - alpha)``, so bucket ``i`` covers ``(gamma**(i-1), gamma**i]``.
Reporting the bucket's representative ``2 * gamma**i / (gamma + 1)`` is within a relative
error ``alpha`` of every value in the bucket. Hence a quantile read from the histogram is
within ``alpha`` (relative) of the exact order statistic of the same rank
(``numpy.quantile(..., method="lower")``). Values at or below ``MIN_VALUE`` share one
bucket reported as 0 (an absolute error of at most ``MIN_VALUE`` milliseconds).

Live histograms are plain ``dict[int, int]`` (bucket index -> count): sparse, so memory grows
with the number of *distinct* buckets hit (about ``ln(max/min) / (2 * alpha)`` for a spread of
``max/min``), never with the number of samples. Sealed buckets use :class:`DenseHistogram`
(int64 counts over the occupied index range), about ten times smaller. The index math is done
once per event on the ingest path; quantiles are computed only when asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import numpy as np

#: Values at or below this (milliseconds) are recorded as zero.
MIN_VALUE: Final = 1e-3
#: Index of the zero bucket; below every real index for values above ``MIN_VALUE``.
ZERO_INDEX: Final = -(2**31)
#: Default relative accuracy (2 %): plenty for latency alerting, half the buckets of 1 %.
DEFAULT_RELATIVE_ERROR: Final = 0.02


class LogBuckets:
    """The mapping between values and log-spaced bucket indices for one accuracy ``alpha``."""

    __slots__ = ("_gamma", "_inv_log_gamma", "relative_error")

    def __init__(self, relative_error: float = DEFAULT_RELATIVE_ERROR) -> None:
        if not 0.0 < relative_error < 0.5:
            raise ValueError(f"relative_error must be in (0, 0.5), got {relative_error}")
        self.relative_error = relative_error
        self._gamma = (1.0 + relative_error) / (1.0 - relative_error)
        self._inv_log_gamma = 1.0 / math.log(self._gamma)

    def index(self, value: float) -> int:
        """Bucket index of ``value`` (the hot path inlines this formula)."""
        if value <= MIN_VALUE:
            return ZERO_INDEX
        return math.ceil(math.log(value) * self._inv_log_gamma)

    @property
    def inv_log_gamma(self) -> float:
        """``1 / ln(gamma)``, exposed so the ingest path can inline :meth:`index`."""
        return self._inv_log_gamma

    def value(self, index: int) -> float:
        """Representative value of bucket ``index``: within ``relative_error`` of its members."""
        if index == ZERO_INDEX:
            return 0.0
        return 2.0 * self._gamma**index / (self._gamma + 1.0)

    def quantiles(self, hist: Mapping[int, int], qs: Sequence[float]) -> list[float | None]:
        """Quantiles ``qs`` (each in [0, 1]) of ``hist``; ``None`` each when it is empty.

        Rank ``floor(q * (n - 1))`` (0-based) is used, i.e. numpy's ``method="lower"``.
        """
        total = sum(hist.values())
        if total == 0:
            return [None for _ in qs]
        ranks = sorted((math.floor(q * (total - 1)), pos) for pos, q in enumerate(qs))
        out: list[float | None] = [None] * len(qs)
        seen = 0
        it = iter(ranks)
        rank, pos = next(it)
        for index in sorted(hist):
            seen += hist[index]
            # Several quantiles may fall into one bucket, hence the inner loop.
            while rank < seen:
                out[pos] = self.value(index)
                try:
                    rank, pos = next(it)
                except StopIteration:
                    return out
        return out  # pragma: no cover - the last bucket always contains rank total-1


def merge_into(target: dict[int, int], source: Mapping[int, int]) -> None:
    """Add the counts of ``source`` to ``target`` in place."""
    get = target.get
    for index, count in source.items():
        target[index] = get(index, 0) + count


def merged(hists: Iterable[Mapping[int, int]]) -> dict[int, int]:
    """A new histogram with the counts of all ``hists``."""
    out: dict[int, int] = {}
    for hist in hists:
        merge_into(out, hist)
    return out


class DenseHistogram:
    """Compact histogram for sealed (folded) buckets: counts over a contiguous index range.

    A ``dict`` costs ~90 bytes per occupied bucket; this costs 8 bytes per index between the
    smallest and largest occupied one. Sealed buckets are merged rarely (on fold and on
    query), so numpy's vector add is the cheap path here, while the per-event path keeps
    using dicts.
    """

    __slots__ = ("counts", "offset", "zero")

    def __init__(self) -> None:
        self.offset = 0
        self.counts: np.ndarray[Any, np.dtype[np.int64]] = np.zeros(0, dtype=np.int64)
        #: Count of the zero bucket (values at or below ``MIN_VALUE``).
        self.zero = 0

    def _cover(self, lo: int, hi: int) -> None:
        """Grow the range so that indices ``lo..hi`` (inclusive) fit."""
        size = self.counts.size
        if size and self.offset <= lo and hi < self.offset + size:
            return
        new_lo = min(lo, self.offset) if size else lo
        new_hi = max(hi, self.offset + size - 1) if size else hi
        grown = np.zeros(new_hi - new_lo + 1, dtype=np.int64)
        if size:
            grown[self.offset - new_lo : self.offset - new_lo + size] = self.counts
        self.offset = new_lo
        self.counts = grown

    def add_sparse(self, hist: Mapping[int, int]) -> None:
        """Add the counts of a ``dict`` histogram."""
        if not hist:
            return
        zero = hist.get(ZERO_INDEX, 0)
        self.zero += zero
        if zero and len(hist) == 1:
            return
        if len(hist) <= 8:
            # Small dicts (sparse traffic): numpy's per-call overhead would dominate.
            real = [k for k in hist if k != ZERO_INDEX]
            self._cover(min(real), max(real))
            counts, offset = self.counts, self.offset
            for k in real:
                counts[k - offset] += hist[k]
            return
        keys = np.fromiter((k for k in hist if k != ZERO_INDEX), dtype=np.int64)
        values = np.fromiter((v for k, v in hist.items() if k != ZERO_INDEX), dtype=np.int64)
        self._cover(int(keys.min()), int(keys.max()))
        # Keys are unique, so fancy-index += is exact (no need for np.add.at).
        self.counts[keys - self.offset] += values

    def add_dense(self, other: DenseHistogram) -> None:
        """Add the counts of another dense histogram."""
        self.zero += other.zero
        if not other.counts.size:
            return
        self._cover(other.offset, other.offset + other.counts.size - 1)
        start = other.offset - self.offset
        self.counts[start : start + other.counts.size] += other.counts

    def quantiles(self, buckets: LogBuckets, qs: Sequence[float]) -> list[float | None]:
        """Quantiles as in :meth:`LogBuckets.quantiles` (rank ``floor(q * (n - 1))``)."""
        cum = np.cumsum(self.counts)
        total = self.zero + (int(cum[-1]) if cum.size else 0)
        if total == 0:
            return [None for _ in qs]
        out: list[float | None] = []
        for q in qs:
            rank = math.floor(q * (total - 1))
            if rank < self.zero:
                out.append(0.0)
            else:
                pos = int(np.searchsorted(cum, rank - self.zero, side="right"))
                out.append(buckets.value(self.offset + pos))
        return out
