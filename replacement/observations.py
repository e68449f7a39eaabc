"""Per-rollout running aggregates that become the state machine's :class:`Observation`.

Pure and incremental. The controller feeds every newly stored event of a rollout's prompt
(and, at start, replays the stored ones through the same methods, in the order they were
stored), and asks for an :class:`Observation` on every tick.

Cells
-----
A *call* (metric event) whose variant is the baseline or the candidate and whose
timestamp falls in the rollout counts in the cell (step of its timestamp, arm of its
variant), so both arms are always compared over the same periods. Its latency, error and
cost go there, and so does the primary metric when it is per call (success, quality).

Feedback belongs to its call
----------------------------
Feedback is joined on ``request_id`` to its call and counts in *the call's* cell — its step
and arm — however late it comes within the limit below. Filing feedback by its own
timestamp would compare, after a weight increase, the candidate's feedback on new calls
with the baseline's feedback on older ones (Simpson's paradox under drift; issue 10).
Feedback on calls outside the rollout (another variant, before the start, unknown) is
ignored and counted as ``unmatched``.

Feedback on a whole episode (an ``episode_id`` and no ``request_id``) joins *each* call of
the rollout's prompt in that episode, in that call's cell, under the same window as call
feedback: it counts for the calls stored up to ``feedback_max_delay_s`` before it and up
to :data:`PENDING_WINDOW_S` after it (it is kept that long for late calls). It counts as
``joined`` once it has joined a call; episode feedback that joins none of the rollout's
calls is another prompt's and is not counted.

How late: feedback counts when the daemon stores it at most ``feedback_max_delay_s``
after the call (or up to :data:`PENDING_WINDOW_S` before it, when the two topics are read
out of order). The rule uses the stored ingestion times of both events, so the replay after
a restart makes exactly the same joins as the live feed did. Memory: one entry per call of
the last ``feedback_max_delay_s`` (about 200 bytes each).

Clusters
--------
Units (``unit_id``, else ``episode_id``, else ``request_id``: the routing key of the SDK)
are what routing randomises, so the variance is
cluster-robust by unit (:mod:`.clustered`). Units are grouped into :data:`DEFAULT_BUCKETS`
hash buckets, a fixed memory whatever the number of users; a bucket is a sum of independent
units, hence itself an independent cluster. The variance estimate's relative noise is about
``sqrt(2 / buckets)`` (4 % with 1,024; with 128 buckets the noise measurably raised false
rollbacks and cost power). The sample-ratio check counts distinct units of the current step.
"""

from __future__ import annotations

import bisect
import gc
import math
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from promptd.replacement.clustered import ClusteredSample
from promptd.replacement.decision import ArmCounts, Observation
from promptd.replacement.machine import RolloutState
from promptd.replacement.stats import Moments, Stratum

PrimaryMetric = Literal["feedback_score", "success_rate", "quality"]
PRIMARY_METRICS: Final = ("feedback_score", "success_rate", "quality")
Arm = Literal["baseline", "candidate"]

DEFAULT_BUCKETS: Final = 1024
"""Hash buckets of units for the cluster-robust variance (16 KB per metric and cell)."""

PENDING_WINDOW_S: Final = 600.0
"""Feedback stored before its call waits this long for it (topics read out of order)."""

# Latencies below 1 µs are clamped before the log so a 0 ms call does not yield -inf.
_MIN_LATENCY_MS: Final = 1e-3

_CLUSTERED: Final = ("primary", "log_latency", "cost")


def unit_bucket(unit: str, buckets: int = DEFAULT_BUCKETS) -> int:
    """The cluster bucket of a unit: CRC-32 of its UTF-8 bytes modulo ``buckets``."""
    return zlib.crc32(unit.encode()) % buckets


@dataclass(slots=True)
class _Metric:
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
        return Moments(self.n, self.total, self.total_sq)


@dataclass(slots=True)
class _Cell:
    primary: _Metric = field(default_factory=_Metric)
    log_latency: _Metric = field(default_factory=_Metric)
    errors: _Metric = field(default_factory=_Metric)
    cost: _Metric = field(default_factory=_Metric)
    requests: int = 0
    units: set[str] = field(default_factory=set)


class _Call(NamedTuple):
    # A named tuple, not a dataclass: one is made per call (and per call of the join
    # window when a snapshot is loaded), and a tuple is several times cheaper to build.
    cell: tuple[int, Arm]
    bucket: int
    ingested_at: float
    episode: str | None = None


class _EpisodeFeedback:
    """Feedback on a whole episode, kept for the calls that may still join it."""

    __slots__ = ("at", "episode", "joined", "score")

    def __init__(self, episode: str, score: float, at: float, joined: bool = False) -> None:
        self.episode = episode
        self.score = score
        self.at = at
        self.joined = joined


@dataclass(slots=True)
class FeedbackCounts:
    """What happened to the feedback of the rollout's prompt: ``joined`` to a call of the
    rollout; ``unmatched`` (its call is outside the rollout, never came, or was stored more
    than ``feedback_max_delay_s`` earlier); ``waiting`` for its call (read out of order)."""

    joined: int = 0
    unmatched: int = 0
    waiting: int = 0


@dataclass(slots=True)
class RolloutAccumulator:
    """Aggregates of one rollout, stratified by the step of each call (see module doc)."""

    baseline_version: str
    candidate_version: str
    primary_metric: PrimaryMetric
    step_starts: list[float] = field(default_factory=list)
    # Units are counted for the sample-ratio check only this long after a step starts:
    # SDKs cache routing for its TTL, so right after a weight change some still route
    # with the old weight, and counting them would look like a mismatch.
    srm_settle_s: float = 0.0
    feedback_max_delay_s: float = 3600.0
    buckets: int = DEFAULT_BUCKETS
    feedback: FeedbackCounts = field(default_factory=FeedbackCounts)
    _cells: dict[tuple[int, Arm], _Cell] = field(default_factory=dict)
    _calls: dict[str, _Call] = field(default_factory=dict)
    _call_order: deque[tuple[float, str]] = field(default_factory=deque)
    _pending: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    _pending_order: deque[tuple[float, str]] = field(default_factory=deque)
    # Request ids of each episode's calls in the join window, in storage order.
    _episodes: dict[str, list[str]] = field(default_factory=dict)
    # Episode feedback kept for late calls, by episode and in storage order.
    _episode_fb: dict[str, list[_EpisodeFeedback]] = field(default_factory=dict)
    _episode_fb_order: deque[_EpisodeFeedback] = field(default_factory=deque)

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

    def _cell(self, key: tuple[int, Arm]) -> _Cell:
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = _Cell()
        return cell

    # -- events --------------------------------------------------------------------

    def add_metric(
        self,
        ts: float,
        variant: str,
        unit: str,
        latency_ms: float,
        success: bool,
        quality: float | None,
        cost_usd: float | None,
        request_id: str | None = None,
        ingested_at: float | None = None,
        episode_id: str | None = None,
        prompt: str | None = None,
    ) -> None:
        """Add one LLM call (``ingested_at`` defaults to ``ts``); ``unit`` is its routing
        key (``unit_id``, else ``episode_id``, else ``request_id``). ``prompt`` matters
        only to rollouts of several prompts."""
        stored = ts if ingested_at is None else ingested_at
        self._evict(stored)
        step = self.step_of(ts)
        if step is None:
            return
        arm = self._arm(variant, prompt, unit, ts, step, episode_id, stored)
        if arm is None:
            return
        key = (step, arm)
        cell = self._cell(key)
        bucket = unit_bucket(unit, self.buckets)
        cell.requests += 1
        if step == len(self.step_starts) - 1 and ts >= self.step_starts[step] + self.srm_settle_s:
            cell.units.add(unit)
        cell.log_latency.add(math.log(max(latency_ms, _MIN_LATENCY_MS)), bucket, self.buckets)
        cell.errors.add(0.0 if success else 1.0)
        if cost_usd is not None:
            cell.cost.add(cost_usd, bucket, self.buckets)
        if self.primary_metric == "success_rate":
            cell.primary.add(1.0 if success else 0.0, bucket, self.buckets)
        elif self.primary_metric == "quality" and quality is not None:
            cell.primary.add(quality, bucket, self.buckets)
        if request_id is None or request_id in self._calls:
            return  # a repeated request id keeps its first call
        if episode_id is not None and not self._joins_episode(episode_id):
            episode_id = None
        call = _Call(key, bucket, stored, episode_id)
        self._calls[request_id] = call
        self._call_order.append((stored, request_id))
        for score, at in self._pending.pop(request_id, ()):
            self.feedback.waiting -= 1
            self._join(call, score, at)
        if episode_id is not None:
            self._episodes.setdefault(episode_id, []).append(request_id)
            for entry in self._episode_fb.get(episode_id, ()):
                self._join_episode(call, entry)

    def _arm(
        self,
        variant: str,
        prompt: str | None,
        unit: str,
        ts: float,
        step: int,
        episode: str | None,
        stored: float,
    ) -> Arm | None:
        """The arm of a call (by its variant here; see the pipeline rollouts')."""
        return self.arm_of(variant)

    def _joins_episode(self, episode: str) -> bool:
        """Whether this call joins its episode's feedback: every call does here."""
        return True

    def config(self) -> dict[str, Any]:
        """What the aggregates depend on besides the events (a snapshot must match it)."""
        return {
            "baseline": self.baseline_version,
            "candidate": self.candidate_version,
            "primary": self.primary_metric,
            "buckets": self.buckets,
            "feedback_max_delay_s": self.feedback_max_delay_s,
            "srm_settle_s": self.srm_settle_s,
        }

    def add_feedback(
        self,
        request_id: str | None,
        score: float,
        ingested_at: float,
        episode_id: str | None = None,
    ) -> None:
        """Add one feedback score: on a call (``request_id``) it counts in that call's
        cell; on a whole episode (``episode_id`` only) in the cell of each of the
        episode's calls (see module doc)."""
        self._evict(ingested_at)
        if request_id is None:
            if episode_id is not None:
                self._add_episode_feedback(episode_id, score, ingested_at)
            return
        call = self._calls.get(request_id)
        if call is not None:
            self._join(call, score, ingested_at)
            return
        self._pending.setdefault(request_id, []).append((score, ingested_at))
        self._pending_order.append((ingested_at, request_id))
        self.feedback.waiting += 1

    def _add_episode_feedback(self, episode: str, score: float, at: float) -> None:
        entry = _EpisodeFeedback(episode, score, at)
        for request_id in self._episodes.get(episode, ()):
            self._join_episode(self._calls[request_id], entry)
        self._episode_fb.setdefault(episode, []).append(entry)
        self._episode_fb_order.append(entry)

    def _join_episode(self, call: _Call, entry: _EpisodeFeedback) -> None:
        """One call of an episode with one feedback on it, within the join window."""
        if not self._joinable(call, entry.at):
            return
        if not entry.joined:
            entry.joined = True
            self.feedback.joined += 1
        if self.primary_metric == "feedback_score":
            self._cell(call.cell).primary.add(entry.score, call.bucket, self.buckets)

    def _joinable(self, call: _Call, at: float) -> bool:
        """Whether feedback stored at ``at`` is within the join window of ``call``."""
        lag = at - call.ingested_at
        return -PENDING_WINDOW_S <= lag <= self.feedback_max_delay_s

    def _join(self, call: _Call, score: float, at: float) -> None:
        # Eviction already enforces the window when events come in storage order; the
        # explicit check keeps the rule exact when they do not.
        if not self._joinable(call, at):
            self.feedback.unmatched += 1
            return
        self.feedback.joined += 1
        if self.primary_metric == "feedback_score":
            self._cell(call.cell).primary.add(score, call.bucket, self.buckets)

    def _evict(self, now: float) -> None:
        """Forget calls no feedback may join any more, and feedback that waited in vain."""
        horizon = now - self.feedback_max_delay_s
        calls, order = self._calls, self._call_order
        while order and order[0][0] < horizon:
            _, rid = order.popleft()
            call = calls.pop(rid, None)
            if call is not None and call.episode is not None:
                self._forget_episode_call(call.episode, rid)
        horizon = now - PENDING_WINDOW_S
        episodic = self._episode_fb_order
        while episodic and episodic[0].at < horizon:
            entry = episodic.popleft()
            same = self._episode_fb[entry.episode]
            same.remove(entry)  # the oldest: entries leave in storage order
            if not same:
                del self._episode_fb[entry.episode]
        pending, waiting = self._pending, self._pending_order
        while waiting and waiting[0][0] < horizon:
            at, rid = waiting.popleft()
            entries = pending.get(rid)
            if not entries:
                continue
            kept = [e for e in entries if e[1] != at]
            gone = len(entries) - len(kept)
            self.feedback.unmatched += gone
            self.feedback.waiting -= gone
            if kept:
                pending[rid] = kept
            else:
                del pending[rid]

    def _forget_episode_call(self, episode: str, request_id: str) -> None:
        members = self._episodes.get(episode)
        if members is None:
            return
        members.remove(request_id)  # the oldest: calls leave in storage order
        if not members:
            del self._episodes[episode]

    # -- snapshots -----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything the accumulator holds beyond its configuration, as plain values
        (what a snapshot saves; :meth:`load_state` puts it back)."""
        return {
            "step_starts": list(self.step_starts),
            "feedback": [self.feedback.joined, self.feedback.unmatched, self.feedback.waiting],
            "cells": [[step, arm, *_cell_state(cell)] for (step, arm), cell in self._cells.items()],
            # Columns rather than rows: a rollout keeps every call of its join window.
            "calls": [
                list(self._calls),
                [c.cell[0] for c in self._calls.values()],
                [c.cell[1] for c in self._calls.values()],
                [c.bucket for c in self._calls.values()],
                [c.ingested_at for c in self._calls.values()],
                [c.episode for c in self._calls.values()],
            ],
            "call_order": [[at for at, _ in self._call_order], [r for _, r in self._call_order]],
            "pending": [
                [rid, [list(e) for e in entries]] for rid, entries in self._pending.items()
            ],
            "pending_order": [list(item) for item in self._pending_order],
            "episode_feedback": [
                [e.episode, e.score, e.at, e.joined] for e in self._episode_fb_order
            ],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Replace what the accumulator holds by a :meth:`state` of the same rollout."""
        # Hundreds of thousands of calls are built at once: without the collector's
        # passes over the growing heap this takes a quarter of the time (measured).
        enabled = gc.isenabled()
        gc.disable()
        try:
            self._load_state(state)
        finally:
            if enabled:
                gc.enable()

    def _load_state(self, state: dict[str, Any]) -> None:
        self.feedback = FeedbackCounts(*state["feedback"])
        self._cells = {(step, arm): _cell_from_state(rest) for step, arm, *rest in state["cells"]}
        columns = state["calls"]
        if len(columns) == 5:
            # A snapshot from before episodes: no call had one.
            columns = [*columns, [None] * len(columns[0])]
        self._calls = {
            rid: _Call((step, arm), bucket, at, episode)
            for rid, step, arm, bucket, at, episode in zip(*columns, strict=True)
        }
        self._call_order = deque(zip(*state["call_order"], strict=True))
        self._pending = {rid: [(a, b) for a, b in entries] for rid, entries in state["pending"]}
        self._pending_order = deque((at, rid) for at, rid in state["pending_order"])
        self._episodes = {}
        for _, rid in self._call_order:
            call = self._calls.get(rid)
            if call is not None and call.episode is not None:
                self._episodes.setdefault(call.episode, []).append(rid)
        self._episode_fb, self._episode_fb_order = {}, deque()
        for episode, score, at, joined in state.get("episode_feedback", ()):
            entry = _EpisodeFeedback(episode, score, at, joined)
            self._episode_fb.setdefault(episode, []).append(entry)
            self._episode_fb_order.append(entry)

    # -- views ---------------------------------------------------------------------

    def _steps_with(self, attr: str) -> list[int]:
        return [
            step
            for step in range(len(self.step_starts))
            if any(
                getattr(c, attr).n
                for c in (self._cells.get((step, "baseline")), self._cells.get((step, "candidate")))
                if c is not None
            )
        ]

    def _metric(self, step: int, arm: Arm, attr: str) -> _Metric:
        cell = self._cells.get((step, arm))
        return getattr(cell, attr) if cell is not None else _Metric()

    def _clustered(self, attr: str) -> ClusteredSample:
        steps = self._steps_with(attr)
        if not steps:
            return ClusteredSample.empty()
        metrics = [self._metric(s, arm, attr) for s in steps for arm in ("baseline", "candidate")]
        zeros = np.zeros(self.buckets)
        values = np.stack([m.y if m.y is not None else zeros for m in metrics], axis=1)
        counts = np.stack([m.m if m.m is not None else zeros for m in metrics], axis=1)
        moments = [
            (metrics[2 * i].moments(), metrics[2 * i + 1].moments()) for i in range(len(steps))
        ]
        return ClusteredSample.from_clusters(steps, moments, values, counts)

    def _strata(self, attr: str) -> tuple[Stratum, ...]:
        return tuple(
            Stratum(
                self._metric(step, "baseline", attr).moments(),
                self._metric(step, "candidate", attr).moments(),
                step=step,
            )
            for step in self._steps_with(attr)
        )

    def observation(self, state: RolloutState) -> Observation:
        """The machine's input for ``state`` (its current step gives SRM counts)."""
        current = state.step_index
        base = self._cells.get((current, "baseline"))
        cand = self._cells.get((current, "candidate"))
        return Observation(
            primary=self._clustered("primary"),
            log_latency=self._clustered("log_latency"),
            errors=self._strata("errors"),
            cost=self._clustered("cost"),
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
            cells = [c for (_s, a), c in self._cells.items() if a == arm]
            primary = _merge([c.primary for c in cells])
            latency = _merge([c.log_latency for c in cells])
            errors = _merge([c.errors for c in cells])
            cost = _merge([c.cost for c in cells])
            out[arm] = {
                "requests": sum(c.requests for c in cells),
                "primary_samples": primary.n,
                "primary_mean": primary.mean if primary.n else None,
                "error_rate": errors.mean if errors.n else None,
                "latency_geomean_ms": math.exp(latency.mean) if latency.n else None,
                "cost_per_request": cost.mean if cost.n else None,
            }
        return out


def _metric_state(metric: _Metric) -> list[Any]:
    y = None if metric.y is None else metric.y.tobytes()
    m = None if metric.m is None else metric.m.tobytes()
    return [metric.n, metric.total, metric.total_sq, y, m]


def _metric_from_state(values: list[Any]) -> _Metric:
    n, total, total_sq, y, m = values
    metric = _Metric(n, total, total_sq)
    if y is not None and m is not None:
        metric.y = np.frombuffer(y, dtype=np.float64).copy()
        metric.m = np.frombuffer(m, dtype=np.float64).copy()
    return metric


def _cell_state(cell: _Cell) -> list[Any]:
    metrics = [_metric_state(getattr(cell, name)) for name in _CELL_METRICS]
    return [*metrics, cell.requests, sorted(cell.units)]


def _cell_from_state(values: list[Any]) -> _Cell:
    *metrics, requests, units = values
    parts = dict(zip(_CELL_METRICS, map(_metric_from_state, metrics), strict=True))
    return _Cell(**parts, requests=requests, units=set(units))


_CELL_METRICS: Final = ("primary", "log_latency", "errors", "cost")


def _merge(parts: list[_Metric]) -> Moments:
    return Moments(
        sum(p.n for p in parts), sum(p.total for p in parts), sum(p.total_sq for p in parts)
    )
