"""A rollout's running aggregates per cell, (step, arm), for every metric of the catalog
with cells (pure, no I/O): what :class:`~.observations.RolloutAccumulator` adds to, what
its snapshots encode, and how they are read as the input of the statistics.

A metric in a cell keeps moments over its observations and, when its spec is clustered,
sums per unit bucket: units (users, sessions) are grouped into :data:`DEFAULT_BUCKETS`
hash buckets, a fixed memory whatever the number of users; a bucket is a sum of
independent units, hence itself an independent cluster (see :mod:`.clustered`).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from promptd.replacement.catalog import CELL_METRICS
from promptd.replacement.clustered import ClusteredSample
from promptd.replacement.stats import Moments, Stratum

Arm = Literal["baseline", "candidate"]
ARMS: Final[tuple[Arm, Arm]] = ("baseline", "candidate")

DEFAULT_BUCKETS: Final = 1024
"""Hash buckets of units for the cluster-robust variance (16 KB per metric and cell)."""


def unit_bucket(unit: str, buckets: int = DEFAULT_BUCKETS) -> int:
    """The cluster bucket of a unit: CRC-32 of its UTF-8 bytes modulo ``buckets``."""
    return zlib.crc32(unit.encode()) % buckets


@dataclass(slots=True)
class RunningMetric:
    """One metric in one cell: moments over observations and sums per unit bucket."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    y: npt.NDArray[np.float64] | None = None
    m: npt.NDArray[np.float64] | None = None

    def add(self, value: float, bucket: int | None = None, buckets: int = 0) -> None:
        """Add one observation; with a ``bucket``, also to its unit bucket's sums."""
        self.n += 1
        self.total += value
        self.total_sq += value * value
        if bucket is None:
            return
        if self.y is None or self.m is None:
            self.y, self.m = np.zeros(buckets), np.zeros(buckets)
        self.y[bucket] += value
        self.m[bucket] += 1.0

    def remove(self, value: float, bucket: int | None = None) -> None:
        """Take back one observation added with the same ``value`` and ``bucket``."""
        self.n -= 1
        self.total -= value
        self.total_sq -= value * value
        if bucket is not None and self.y is not None and self.m is not None:
            self.y[bucket] -= value
            self.m[bucket] -= 1.0

    def moments(self) -> Moments:
        """The moments over every observation."""
        return Moments(self.n, self.total, self.total_sq)

    def state(self) -> list[Any]:
        """As plain values (a snapshot's)."""
        y = None if self.y is None else self.y.tobytes()
        m = None if self.m is None else self.m.tobytes()
        return [self.n, self.total, self.total_sq, y, m]

    @classmethod
    def from_state(cls, values: list[Any]) -> RunningMetric:
        """Inverse of :meth:`state`."""
        n, total, total_sq, y, m = values
        metric = cls(n, total, total_sq)
        if y is not None and m is not None:
            metric.y = np.frombuffer(y, dtype=np.float64).copy()
            metric.m = np.frombuffer(m, dtype=np.float64).copy()
        return metric


def _metrics() -> dict[str, RunningMetric]:
    return {name: RunningMetric() for name in CELL_METRICS}


@dataclass(slots=True)
class Cell:
    """One (step, arm): a running aggregate per metric, its requests and its units (the
    distinct units of the current step, for the sample-ratio check)."""

    metrics: dict[str, RunningMetric] = field(default_factory=_metrics)
    requests: int = 0
    units: set[str] = field(default_factory=set)

    def state(self) -> list[Any]:
        """As plain values: the metrics in catalog order (the snapshot's configuration
        names them), the requests and the sorted units."""
        metrics = [self.metrics[name].state() for name in CELL_METRICS]
        return [*metrics, self.requests, sorted(self.units)]

    @classmethod
    def from_state(cls, values: list[Any]) -> Cell:
        """Inverse of :meth:`state`."""
        *metrics, requests, units = values
        parts = dict(zip(CELL_METRICS, map(RunningMetric.from_state, metrics), strict=True))
        return cls(parts, requests=requests, units=set(units))


Cells = Mapping[tuple[int, Arm], Cell]


def merge(parts: list[RunningMetric]) -> Moments:
    """The moments of several cells' metric together."""
    return Moments(
        sum(p.n for p in parts), sum(p.total for p in parts), sum(p.total_sq for p in parts)
    )


def _metric(cells: Cells, step: int, arm: Arm, name: str) -> RunningMetric:
    cell = cells.get((step, arm))
    return cell.metrics[name] if cell is not None else RunningMetric()


def _steps_with(cells: Cells, steps: int, name: str) -> list[int]:
    """The steps where either arm has an observation of the metric."""
    return [step for step in range(steps) if any(_metric(cells, step, arm, name).n for arm in ARMS)]


def clustered(cells: Cells, steps: int, name: str, buckets: int) -> ClusteredSample:
    """The metric ``name`` over the first ``steps`` steps, clustered by unit bucket."""
    used = _steps_with(cells, steps, name)
    if not used:
        return ClusteredSample.empty()
    metrics = [_metric(cells, s, arm, name) for s in used for arm in ARMS]
    zeros = np.zeros(buckets)
    values = np.stack([m.y if m.y is not None else zeros for m in metrics], axis=1)
    counts = np.stack([m.m if m.m is not None else zeros for m in metrics], axis=1)
    moments = [(metrics[2 * i].moments(), metrics[2 * i + 1].moments()) for i in range(len(used))]
    return ClusteredSample.from_clusters(used, moments, values, counts)


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
