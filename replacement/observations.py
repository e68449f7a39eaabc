"""Per-rollout running aggregates that become the state machine's :class:`Observation`.

Pure and incremental: every stored event of a rollout's prompt whose variant is the
baseline or the candidate is added to the stratum of the step its *timestamp* falls in,
so both arms are always compared over the same periods (the baseline's traffic mix and
time-of-day drift hit both arms alike). The controller feeds new events from ingestion
and, at start, replays the rollout's stored events through the same methods.

Memory: a few numbers per (step, arm), plus the set of distinct unit ids of the current
step per arm for the sample-ratio-mismatch check (bounded by the step's distinct users).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Final, Literal

from promptd.replacement.machine import ArmCounts, Observation, RolloutState
from promptd.replacement.stats import Moments, Stratum

PrimaryMetric = Literal["feedback_score", "success_rate", "quality"]
PRIMARY_METRICS: Final = ("feedback_score", "success_rate", "quality")
Arm = Literal["baseline", "candidate"]

# Latencies below 1 µs are clamped before the log so a 0 ms call does not yield -inf.
_MIN_LATENCY_MS: Final = 1e-3


@dataclass(slots=True)
class _Sums:
    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, value: float) -> None:
        self.n += 1
        self.total += value
        self.total_sq += value * value

    def moments(self) -> Moments:
        return Moments(self.n, self.total, self.total_sq)


@dataclass(slots=True)
class _ArmStep:
    primary: _Sums = field(default_factory=_Sums)
    log_latency: _Sums = field(default_factory=_Sums)
    errors: _Sums = field(default_factory=_Sums)
    cost: _Sums = field(default_factory=_Sums)
    requests: int = 0
    units: set[str] = field(default_factory=set)


@dataclass(slots=True)
class RolloutAccumulator:
    """Aggregates of one rollout, stratified by step (see the module docstring)."""

    baseline_version: str
    candidate_version: str
    primary_metric: PrimaryMetric
    step_starts: list[float] = field(default_factory=list)
    # Units are counted for the sample-ratio check only this long after a step starts:
    # SDKs cache routing for its TTL, so right after a weight change some still route
    # with the old weight, and counting them would look like a mismatch.
    srm_settle_s: float = 0.0
    _steps: dict[tuple[int, Arm], _ArmStep] = field(default_factory=dict)

    def arm_of(self, variant: str) -> Arm | None:
        """Which arm a variant belongs to, if any."""
        if variant == self.candidate_version:
            return "candidate"
        if variant == self.baseline_version:
            return "baseline"
        return None

    def step_of(self, ts: float) -> int | None:
        """Index of the step whose time range holds ``ts`` (None before the rollout)."""
        index = bisect.bisect_right(self.step_starts, ts) - 1
        return index if index >= 0 else None

    def start_step(self, index: int, at: float) -> None:
        """Record that step ``index`` began at ``at`` (steps only move forward)."""
        while len(self.step_starts) <= index:
            self.step_starts.append(at)

    def _cell(self, ts: float, variant: str) -> tuple[int, _ArmStep] | None:
        arm = self.arm_of(variant)
        step = self.step_of(ts)
        if arm is None or step is None:
            return None
        key = (step, arm)
        cell = self._steps.get(key)
        if cell is None:
            cell = self._steps[key] = _ArmStep()
        return step, cell

    def add_metric(
        self,
        ts: float,
        variant: str,
        unit: str,
        latency_ms: float,
        success: bool,
        quality: float | None,
        cost_usd: float | None,
    ) -> None:
        """Add one LLM call."""
        found = self._cell(ts, variant)
        if found is None:
            return
        step, cell = found
        cell.requests += 1
        if step == len(self.step_starts) - 1 and ts >= self.step_starts[step] + self.srm_settle_s:
            cell.units.add(unit)
        log_latency = math.log(max(latency_ms, _MIN_LATENCY_MS))
        cell.log_latency.add(log_latency)
        cell.errors.add(0.0 if success else 1.0)
        if cost_usd is not None:
            cell.cost.add(cost_usd)
        if self.primary_metric == "success_rate":
            cell.primary.add(1.0 if success else 0.0)
        elif self.primary_metric == "quality" and quality is not None:
            cell.primary.add(quality)

    def add_feedback(self, ts: float, variant: str, score: float) -> None:
        """Add one feedback score (the primary metric when it is ``feedback_score``)."""
        if self.primary_metric != "feedback_score":
            return
        found = self._cell(ts, variant)
        if found is not None:
            found[1].primary.add(score)

    def _strata(self, attr: str) -> tuple[Stratum, ...]:
        out = []
        for step in range(len(self.step_starts)):
            base = self._steps.get((step, "baseline"))
            cand = self._steps.get((step, "candidate"))
            if base is None and cand is None:
                continue
            out.append(
                Stratum(
                    baseline=getattr(base, attr).moments() if base else Moments(),
                    candidate=getattr(cand, attr).moments() if cand else Moments(),
                    step=step,
                )
            )
        return tuple(out)

    def observation(self, state: RolloutState) -> Observation:
        """The machine's input for ``state`` (its current step gives SRM counts)."""
        current = state.step_index
        base = self._steps.get((current, "baseline"))
        cand = self._steps.get((current, "candidate"))
        return Observation(
            primary=self._strata("primary"),
            log_latency=self._strata("log_latency"),
            errors=self._strata("errors"),
            cost=self._strata("cost"),
            units=ArmCounts(
                baseline=len(base.units) if base else 0,
                candidate=len(cand.units) if cand else 0,
            ),
            requests=ArmCounts(
                baseline=base.requests if base else 0,
                candidate=cand.requests if cand else 0,
            ),
        )

    def arm_summary(self) -> dict[str, dict[str, float | int | None]]:
        """Per-arm totals over all steps, for ``GET /v1/rollouts/{id}``."""
        out: dict[str, dict[str, float | int | None]] = {}
        for arm in ("baseline", "candidate"):
            cells = [c for (_s, a), c in self._steps.items() if a == arm]
            primary = _merge([c.primary for c in cells])
            latency = _merge([c.log_latency for c in cells])
            errors = _merge([c.errors for c in cells])
            cost = _merge([c.cost for c in cells])
            out[arm] = {
                "requests": sum(c.requests for c in cells),
                "primary_samples": primary.n,
                "primary_mean": primary.total / primary.n if primary.n else None,
                "error_rate": errors.total / errors.n if errors.n else None,
                "latency_geomean_ms": math.exp(latency.total / latency.n) if latency.n else None,
                "cost_per_request": cost.total / cost.n if cost.n else None,
            }
        return out


def _merge(parts: list[_Sums]) -> _Sums:
    out = _Sums()
    for p in parts:
        out.n += p.n
        out.total += p.total
        out.total_sq += p.total_sq
    return out
