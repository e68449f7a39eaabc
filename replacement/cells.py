"""A rollout's running aggregates per cell, (step, arm), for every metric of the catalog
with cells (pure, no I/O): what :class:`~.observations.RolloutAccumulator` adds to, what
its snapshots encode, and how they are read as the input of the statistics.

A metric in a cell keeps moments over its observations and, when its spec is clustered,
sums per unit bucket: units (users, sessions) are grouped into :data:`DEFAULT_BUCKETS`
hash buckets, a fixed memory whatever the number of users; a bucket is a sum of
independent units, hence itself an independent cluster (see :mod:`.clustered`). A metric
adjusted on ``k`` covariates (:mod:`.adjustment`) also keeps their sums, squares and
products with the value in the cell, and their sums per bucket.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from promptd.replacement.catalog import CELL_METRICS
from promptd.replacement.clustered import ClusteredSample, Covariates
from promptd.replacement.stats import FloatArray, Moments, Stratum

Arm = Literal["baseline", "candidate"]
ARMS: Final[tuple[Arm, Arm]] = ("baseline", "candidate")

DEFAULT_BUCKETS: Final = 1024
"""Hash buckets of units for the cluster-robust variance (16 KB per metric and cell)."""


def unit_bucket(unit: str, buckets: int = DEFAULT_BUCKETS) -> int:
    """The cluster bucket of a unit: CRC-32 of its UTF-8 bytes modulo ``buckets``."""
    return zlib.crc32(unit.encode()) % buckets


COVARIATE_FOLD: Final = 256
"""Covariate values kept as they came before they are folded into the sums with numpy."""

_Pending = tuple[float, int, tuple[float, ...], float]


@dataclass(slots=True)
class CovariateSums:
    """A metric's ``k`` covariates in one cell: ``sx`` (``Σx``), ``sxx`` (``Σx xᵀ``),
    ``sxy`` (``Σx y``) and ``x`` (per bucket ``Σx``).

    Adding is once per call and metric on the ingest path, so an observation is only
    appended to :attr:`pending` (value, bucket or -1, covariates, sign); every
    :data:`COVARIATE_FOLD` of them are folded into the sums with numpy. Folding after a
    fixed count, never at a read, makes the sums the same floats however often they are
    read: the replay after a restart gives exactly what the live feed gave.
    """

    k: int
    sx: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    sxx: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros((0, 0)))
    sxy: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    x: npt.NDArray[np.float64] | None = None
    pending: list[_Pending] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.sx.size != self.k:
            self.sx, self.sxx, self.sxy = (
                np.zeros(self.k),
                np.zeros((self.k, self.k)),
                np.zeros(self.k),
            )

    def add(
        self, value: float, bucket: int | None, buckets: int, xs: tuple[float, ...], sign: float
    ) -> None:
        """One observation's covariates (``sign`` -1: take it back)."""
        self.pending.append((value, -1 if bucket is None else bucket, xs, sign))
        if bucket is not None and self.x is None:
            self.x = np.zeros((buckets, self.k))
        if len(self.pending) >= COVARIATE_FOLD:
            sx, sxx, sxy, x = self._sums(self.pending)
            self.sx, self.sxx, self.sxy = self.sx + sx, self.sxx + sxx, self.sxy + sxy
            if x is not None and self.x is not None:
                self.x += x
            self.pending = []

    def _sums(
        self, pending: list[_Pending]
    ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray | None]:
        value = np.array([p[0] for p in pending])
        bucket = np.array([p[1] for p in pending], dtype=np.int64)
        xs = np.array([p[2] for p in pending], dtype=np.float64).reshape(-1, self.k)
        signed = xs * np.array([p[3] for p in pending])[:, None]
        x = None
        if self.x is not None:
            x = np.zeros_like(self.x)
            used = bucket >= 0
            np.add.at(x, bucket[used], signed[used])
        return signed.sum(axis=0), signed.T @ xs, signed.T @ value, x

    def totals(self, buckets: int) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """``(Σx, Σx xᵀ, Σx y, per-bucket Σx)`` over every observation (nothing folded)."""
        x = self.x if self.x is not None else np.zeros((buckets, self.k))
        if not self.pending:
            return self.sx, self.sxx, self.sxy, x
        sx, sxx, sxy, px = self._sums(self.pending)
        return self.sx + sx, self.sxx + sxx, self.sxy + sxy, x + px if px is not None else x

    def state(self) -> list[Any]:
        """As plain values (a snapshot's)."""
        x = None if self.x is None else self.x.tobytes()
        arrays = (self.sx.tobytes(), self.sxx.tobytes(), self.sxy.tobytes(), x)
        return [self.k, *arrays, [[v, b, list(xs), s] for v, b, xs, s in self.pending]]

    @classmethod
    def from_state(cls, values: list[Any]) -> CovariateSums:
        """Inverse of :meth:`state`."""
        k, sx, sxx, sxy, x, pending = values
        return cls(
            k,
            np.frombuffer(sx, dtype=np.float64).copy(),
            np.frombuffer(sxx, dtype=np.float64).reshape(k, k).copy(),
            np.frombuffer(sxy, dtype=np.float64).copy(),
            None if x is None else np.frombuffer(x, dtype=np.float64).reshape(-1, k).copy(),
            [(v, b, tuple(xs), s) for v, b, xs, s in pending],
        )


@dataclass(slots=True)
class RunningMetric:
    """One metric in one cell: moments over observations and sums per unit bucket, and
    the sums of its ``k`` covariates (:class:`CovariateSums`, none when ``k`` is 0)."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    y: npt.NDArray[np.float64] | None = None
    m: npt.NDArray[np.float64] | None = None
    k: int = 0
    covariates: CovariateSums | None = None

    def __post_init__(self) -> None:
        if self.k and self.covariates is None:
            self.covariates = CovariateSums(self.k)

    def add(
        self,
        value: float,
        bucket: int | None = None,
        buckets: int = 0,
        covariates: tuple[float, ...] = (),
        sign: float = 1.0,
    ) -> None:
        """Add one observation (``sign`` -1: take it back); with a ``bucket``, also to its
        unit bucket's sums; ``covariates`` are its ``k`` covariate values."""
        self.n += 1 if sign > 0 else -1
        self.total += sign * value
        self.total_sq += sign * value * value
        if covariates and self.covariates is not None:
            self.covariates.add(value, bucket, buckets, covariates, sign)
        if bucket is None:
            return
        if self.y is None or self.m is None:
            self.y, self.m = np.zeros(buckets), np.zeros(buckets)
        self.y[bucket] += sign * value
        self.m[bucket] += sign

    def remove(
        self, value: float, bucket: int | None = None, covariates: tuple[float, ...] = ()
    ) -> None:
        """Take back one observation added with the same ``value``, ``bucket`` and
        ``covariates``."""
        self.add(value, bucket, 0, covariates, sign=-1.0)

    def moments(self) -> Moments:
        """The moments over every observation."""
        return Moments(self.n, self.total, self.total_sq)

    def state(self) -> list[Any]:
        """As plain values (a snapshot's)."""
        y = None if self.y is None else self.y.tobytes()
        m = None if self.m is None else self.m.tobytes()
        cov = None if self.covariates is None else self.covariates.state()
        return [self.n, self.total, self.total_sq, y, m, cov]

    @classmethod
    def from_state(cls, values: list[Any]) -> RunningMetric:
        """Inverse of :meth:`state`."""
        n, total, total_sq, y, m, cov = values
        sums = None if cov is None else CovariateSums.from_state(cov)
        metric = cls(n, total, total_sq, k=0 if sums is None else sums.k, covariates=sums)
        if y is not None and m is not None:
            metric.y = np.frombuffer(y, dtype=np.float64).copy()
            metric.m = np.frombuffer(m, dtype=np.float64).copy()
        return metric


Layout = Mapping[str, tuple[str, ...]]
"""The covariates each metric with cells is adjusted on (by metric name; none: ``()``)."""


def _metrics(layout: Layout) -> dict[str, RunningMetric]:
    return {name: RunningMetric(k=len(layout.get(name, ()))) for name in CELL_METRICS}


@dataclass(slots=True)
class Cell:
    """One (step, arm): a running aggregate per metric, its requests and its units (the
    distinct units of the current step, for the sample-ratio check)."""

    metrics: dict[str, RunningMetric] = field(default_factory=lambda: _metrics({}))
    requests: int = 0
    units: set[str] = field(default_factory=set)

    @classmethod
    def new(cls, layout: Layout) -> Cell:
        """An empty cell whose metrics keep the covariates ``layout`` names."""
        return cls(_metrics(layout))

    def state(self) -> list[Any]:
        """As plain values: the metrics in catalog order (the snapshot's configuration
        names them), the requests and the sorted units."""
        metrics = [self.metrics[name].state() for name in CELL_METRICS]
        return [*metrics, self.requests, sorted(self.units)]

    @classmethod
    def from_state(cls, values: list[Any]) -> Cell:
        """Inverse of :meth:`state` (the layout is the snapshot's own)."""
        *metrics, requests, units = values
        parts = dict(zip(CELL_METRICS, map(RunningMetric.from_state, metrics), strict=True))
        return cls(parts, requests=requests, units=set(units))


Cells = Mapping[tuple[int, Arm], Cell]


def merge(parts: list[RunningMetric]) -> Moments:
    """The moments of several cells' metric together."""
    return Moments(
        sum(p.n for p in parts), sum(p.total for p in parts), sum(p.total_sq for p in parts)
    )


def _metric(cells: Cells, step: int, arm: Arm, name: str, k: int = 0) -> RunningMetric:
    cell = cells.get((step, arm))
    return cell.metrics[name] if cell is not None else RunningMetric(k=k)


def _steps_with(cells: Cells, steps: int, name: str) -> list[int]:
    """The steps where either arm has an observation of the metric."""
    return [step for step in range(steps) if any(_metric(cells, step, arm, name).n for arm in ARMS)]


def _no_covariates(k: int, buckets: int) -> tuple[FloatArray, ...]:
    return np.zeros(k), np.zeros((k, k)), np.zeros(k), np.zeros((buckets, k))


def clustered(
    cells: Cells, steps: int, name: str, buckets: int, covariates: tuple[str, ...] = ()
) -> ClusteredSample:
    """The metric ``name`` over the first ``steps`` steps, clustered by unit bucket, with
    the sums of its ``covariates`` (the names its cells keep)."""
    used = _steps_with(cells, steps, name)
    if not used:
        return ClusteredSample.empty()
    k = len(covariates)
    metrics = [_metric(cells, s, arm, name, k) for s in used for arm in ARMS]
    zeros = np.zeros(buckets)
    values = np.stack([m.y if m.y is not None else zeros for m in metrics], axis=1)
    counts = np.stack([m.m if m.m is not None else zeros for m in metrics], axis=1)
    moments = [(metrics[2 * i].moments(), metrics[2 * i + 1].moments()) for i in range(len(used))]
    extra = None
    if k:
        sums = [
            m.covariates.totals(buckets) if m.covariates is not None else _no_covariates(k, buckets)
            for m in metrics
        ]
        extra = Covariates.from_clusters(
            covariates,
            np.array([t[0] for t in sums]),
            np.array([t[1] for t in sums]),
            np.array([t[2] for t in sums]),
            np.stack([t[3] for t in sums], axis=1),
            values,
            counts,
        )
    return ClusteredSample.from_clusters(used, moments, values, counts, extra)


def strata(cells: Cells, steps: int, name: str) -> tuple[Stratum, ...]:
    """The metric ``name`` over the first ``steps`` steps, as independent samples."""
    return tuple(
        Stratum(
            _metric(cells, step, "baseline", name).moments(),
            _metric(cells, step, "candidate", name).moments(),
            step=step,
        )
        for step in _steps_with(cells, steps, name)
    )
