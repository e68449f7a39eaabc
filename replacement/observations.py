"""Per-rollout running aggregates that become the state machine's :class:`Observation`.

Pure and incremental. The controller feeds every newly stored event of a rollout's prompt
(and, at start, replays the stored ones through the same methods, in the order they were
stored), and asks for an :class:`Observation` on every tick.

Cells
-----
A *call* (metric event) whose variant is the baseline or the candidate and whose event
time falls in the rollout counts in the cell (step of its event time, arm of its
variant), so both arms are always compared over the same periods. Every metric of
:data:`.catalog.CATALOG` that is observed per call gets its value there (latency, errors,
cost, and the primary metric when it is per call: success, quality).

Event time
----------
A call belongs to the step of its timestamp, except that a timestamp later than the
moment the daemon stored the call is taken as that moment (a call cannot have been made
after it was stored: the app's clock is ahead), and a call stamped more than
``max_future_s`` after it was stored is left out of the rollout and counted in
``future_calls``. The rule uses only the call and its stored ingestion time, never the
clock of the moment the accumulator sees it, so the replay after a restart files every
call in the step the live feed did: a step that starts later cannot take a call stored
before it began. The same holds for the sample-ratio check, which counts the distinct
units of the current step only (those of an earlier step are dropped when the next
starts).

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

Signals, and the judge-drift pairs
----------------------------------
Feedback has a source: ``None`` for people's, ``eval:<name>`` for an evaluator's. The
primary metric ``feedback_score`` counts the feedback of the rollout's ``signals`` (chosen
per prompt, stored with the rollout: ``"human"``, ``"eval:<name>"`` or several, whose scores
then all count). When the signals name an evaluator (the first one named), every call
scored by both people and that evaluator within the join window also gives the
judge-drift metric one value in its cell: the evaluator's score minus people's (the first
score of each on the call; feedback on a whole episode is not paired). Feedback of other
sources is ignored.

Clusters
--------
Units (``unit_id``, else ``episode_id``, else ``request_id``: the routing key of the SDK)
are what routing randomises, so the variance is
cluster-robust by unit (:mod:`.clustered`). Units are grouped into :data:`DEFAULT_BUCKETS`
hash buckets, a fixed memory whatever the number of users; a bucket is a sum of independent
units, hence itself an independent cluster. The variance estimate's relative noise is about
``sqrt(2 / buckets)`` (4 % with 1,024; with 128 buckets the noise measurably raised false
rollbacks and cost power). The sample-ratio check counts distinct units of the current step.

Covariates
----------
Each metric carries the covariates its spec is adjusted on (``adjust`` in
:data:`.catalog.CATALOG`; none when the accumulator is built with ``adjust=False``): the
unit's pre-period figure from :attr:`RolloutAccumulator.history` (a :class:`.history.History`,
given before any event; the ``history`` covariate is left out when no unit has history)
and the call's own pre-treatment fields (its input size), centred on the history's
pre-period means. A feedback score carries its call's covariates. Their sums go into the
metric's cells next to its values (see :mod:`.cells` and :mod:`.adjustment`).
"""

from __future__ import annotations

import bisect
import gc
import math
import operator
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple

from promptd.evaluation.signals import HUMAN, source_of
from promptd.replacement import cells
from promptd.replacement.catalog import (
    CATALOG,
    CELL_METRICS,
    COVARIATES,
    ArmCounts,
    CallFacts,
    Metric,
    MetricSpec,
    Observation,
    Observe,
)
from promptd.replacement.cells import DEFAULT_BUCKETS, Arm, Cell, Layout, merge, unit_bucket
from promptd.replacement.history import FIGURES, History
from promptd.replacement.state import RolloutState

__all__ = [
    "DEFAULT_BUCKETS",
    "PENDING_WINDOW_S",
    "Arm",
    "FeedbackCounts",
    "PrimaryMetric",
    "RolloutAccumulator",
    "unit_bucket",
]

PrimaryMetric = Literal["feedback_score", "success_rate", "quality"]
PRIMARY_METRICS: Final = ("feedback_score", "success_rate", "quality")

PENDING_WINDOW_S: Final = 600.0
"""Feedback stored before its call waits this long for it (topics read out of order)."""

DEFAULT_MAX_FUTURE_S: Final = 300.0
"""A call stamped further than this after it was stored is left out (see module doc)."""

_CLUSTERED: Final = frozenset(spec.name for spec in CATALOG if spec.clustered)
_PAIRED: Final = tuple(spec.name for spec in CATALOG if spec.paired)
_NO_PAST: Final = (0.0,) * len(FIGURES)

Covariates = tuple[float, ...]
#: A metric's covariate values from a call's *atoms*: the unit's centred figures
#: (:data:`.history.FIGURES` order, zeros without history) followed by the call's own
#: covariates less their centres (see ``RolloutAccumulator._plan``).
_Pick = Callable[[tuple[float, ...]], Covariates]


class _Call(NamedTuple):
    # A named tuple, not a dataclass: one is made per call (and per call of the join
    # window when a snapshot is loaded), and a tuple is several times cheaper to build.
    cell: tuple[int, Arm]
    bucket: int
    ingested_at: float
    episode: str | None = None
    # The call's covariates for each metric fed by feedback (feedback carries them).
    covariates: tuple[Covariates, ...] = ()


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
    max_future_s: float = DEFAULT_MAX_FUTURE_S
    #: The units' pre-period figures (None: no history, e.g. while it loads).
    history: History | None = None
    #: Whether metrics carry the covariates of their regression adjustment.
    adjust: bool = True
    feedback: FeedbackCounts = field(default_factory=FeedbackCounts)
    #: Calls of the rollout left out for a timestamp too far ahead (see module doc).
    future_calls: int = 0
    _cells: dict[tuple[int, Arm], Cell] = field(default_factory=dict)
    _calls: dict[str, _Call] = field(default_factory=dict)
    _call_order: deque[tuple[float, str]] = field(default_factory=deque)
    _pending: dict[str, list[tuple[float, float, str | None]]] = field(default_factory=dict)
    _pending_order: deque[tuple[float, str]] = field(default_factory=deque)
    # Request ids of each episode's calls in the join window, in storage order.
    _episodes: dict[str, list[str]] = field(default_factory=dict)
    # Episode feedback kept for late calls, by episode and in storage order.
    _episode_fb: dict[str, list[_EpisodeFeedback]] = field(default_factory=dict)
    _episode_fb_order: deque[_EpisodeFeedback] = field(default_factory=deque)
    # What each call and each joined feedback adds to, from the catalog (see _plan()):
    # the metric, how a call gives its value, whether it is clustered, its covariates.
    _per_call: tuple[tuple[str, Observe, bool, _Pick | None], ...] = ()
    _per_feedback: tuple[tuple[str, bool, _Pick | None], ...] = ()
    _layout: Layout = field(default_factory=dict)
    _units: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # The call's own covariates (function, centre), and whether any metric has one.
    _of_call: tuple[tuple[Callable[[CallFacts], float | None], float], ...] = ()
    _covaried: bool = False
    #: The quality signals whose feedback feeds the primary metric (see module doc).
    signals: tuple[str, ...] = (HUMAN,)
    _sources: frozenset[str | None] = frozenset({None})
    #: The evaluator whose scores are paired with people's (judge drift), if any.
    _drift_source: str | None = None
    # Per call of the join window that has one of the two: [people's score, evaluator's].
    _pairs: dict[str, list[float | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._sources = frozenset(source_of(signal) for signal in self.signals)
        self._drift_source = next((s for s in self.signals if s != HUMAN), None)
        self._plan()

    def _plan(self) -> None:
        primary = self.primary_metric
        history = self.history
        self._units = dict(history.units) if history is not None else {}
        layout: dict[str, tuple[str, ...]] = {}
        sources: dict[str, _Pick | None] = {}
        self._of_call = tuple(
            (c.of_call, history.centre(c.name) if history is not None else 0.0)
            for c in COVARIATES.values()
            if c.of_call is not None
        )
        for spec in CATALOG:
            if spec.has_cells:
                layout[spec.name], sources[spec.name] = self._covariates(spec)
        self._layout = layout
        self._covaried = any(layout.values())
        self._per_call = tuple(
            (spec.name, observe, spec.clustered, sources[spec.name])
            for spec in CATALOG
            if spec.observe is not None and (observe := spec.observe(primary)) is not None
        )
        self._per_feedback = tuple(
            (spec.name, spec.clustered, sources[spec.name])
            for spec in CATALOG
            if spec.feedback is not None and spec.feedback(primary)
        )

    def _covariates(self, spec: MetricSpec) -> tuple[tuple[str, ...], _Pick | None]:
        """The covariates ``spec``'s cells keep here, and how they are picked from a
        call's atoms."""
        if not self.adjust:
            return (), None
        history = self.history
        of_call = [name for name, c in COVARIATES.items() if c.of_call is not None]
        names: list[str] = []
        at: list[int] = []
        for name in spec.adjust:
            if name in of_call:
                names.append(name)
                at.append(len(FIGURES) + of_call.index(name))
            elif history is not None and history.units and spec.history is not None:
                figure = spec.history(self.primary_metric)
                if figure is not None:
                    names.append(name)
                    at.append(FIGURES.index(figure))
        if not at:
            return (), None
        if len(at) == 1:
            (only,) = at
            return tuple(names), lambda atoms: (atoms[only],)
        return tuple(names), operator.itemgetter(*at)

    def set_history(self, history: History) -> None:
        """Give the units' pre-period figures (before any event: a value's covariates are
        fixed when it is added)."""
        if self._cells or self._calls or self._pending:
            raise RuntimeError("a rollout's history must be set before its events")
        self.history = history
        self._plan()

    @property
    def layout(self) -> Layout:
        """The covariates each metric's cells keep."""
        return self._layout

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

    @property
    def feedback_floor(self) -> float:
        """Feedback stamped before this is not the rollout's (nor read by its replay): its
        call would be older than the rollout by more than the join window."""
        if not self.step_starts:
            return -math.inf
        return self.step_starts[0] - max(self.feedback_max_delay_s, PENDING_WINDOW_S)

    def start_step(self, index: int, at: float) -> None:
        """Record that step ``index`` began at ``at`` (steps only move forward)."""
        while len(self.step_starts) <= index:
            self.step_starts.append(at)
        self._drop_old_units()

    def _drop_old_units(self) -> None:
        """Units count for the sample-ratio check of the current step only."""
        current = len(self.step_starts) - 1
        for (step, _), cell in self._cells.items():
            if step < current:
                cell.units.clear()

    def _cell(self, key: tuple[int, Arm]) -> Cell:
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = Cell.new(self._layout)
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
        input_chars: int | None = None,
    ) -> None:
        """Add one LLM call (``ingested_at`` defaults to ``ts``); ``unit`` is its routing
        key (``unit_id``, else ``episode_id``, else ``request_id``). ``prompt`` matters
        only to rollouts of several prompts; ``input_chars`` is the call's input size
        (a covariate). The call counts at its event time (see module doc)."""
        stored = ts if ingested_at is None else ingested_at
        # Only the calls a replay reads (the rollout's, stamped since it began) may move
        # the eviction horizon: otherwise live and rebuilt state differ in what they keep.
        if not self.step_starts or ts < self.step_starts[0] or not self._serves(variant, prompt):
            return
        self._evict(stored)
        # Event time (see module doc): a timestamp after the call was stored is taken as
        # its storage time; stamped more than max_future_s after it, the call is left out.
        if ts - stored > self.max_future_s:
            self._left_out_future(stored, variant, prompt)
            return
        at = ts if ts <= stored else stored
        step = self.step_of(at)
        if step is None:
            return
        arm = self._arm(variant, prompt, unit, at, step, episode_id, stored)
        if arm is None:
            return
        key = (step, arm)
        cell = self._cells.get(key) or self._cell(key)
        bucket = unit_bucket(unit, self.buckets)
        cell.requests += 1
        if step == len(self.step_starts) - 1 and at >= self.step_starts[step] + self.srm_settle_s:
            cell.units.add(unit)
        facts = CallFacts(latency_ms, success, quality, cost_usd, input_chars)
        atoms = self._atoms(unit, facts) if self._covaried else ()
        for name, observe, clustered, pick in self._per_call:
            value = observe(facts)
            if value is not None:
                xs = pick(atoms) if pick is not None else ()
                cell.metrics[name].add(value, bucket if clustered else None, self.buckets, xs)
        if request_id is None or request_id in self._calls:
            return  # a repeated request id keeps its first call
        if episode_id is not None and not self._joins_episode(episode_id):
            episode_id = None
        carried = tuple(pick(atoms) if pick else () for _, _, pick in self._per_feedback)
        self._remember(request_id, _Call(key, bucket, stored, episode_id, carried))

    def _atoms(self, unit: str, facts: CallFacts) -> tuple[float, ...]:
        """The unit's centred figures (zeros without history) and the call's covariates
        less their centres (0 when the call does not report one)."""
        past = self._units.get(unit) or _NO_PAST
        own = []
        for of_call, centre in self._of_call:
            value = of_call(facts)
            own.append(0.0 if value is None else value - centre)
        return (*past, *own)

    def _left_out_future(self, stored: float, variant: str, prompt: str | None) -> None:
        """A call stamped too far ahead: counted when the replay reads it too (stored
        since the rollout began)."""
        if self.step_of(stored) is not None and self._serves(variant, prompt):
            self.future_calls += 1

    def _remember(self, request_id: str, call: _Call) -> None:
        """Keep a call for the feedback that may join it, and join what waited for it."""
        self._calls[request_id] = call
        self._call_order.append((call.ingested_at, request_id))
        for score, at, source in self._pending.pop(request_id, ()):
            self.feedback.waiting -= 1
            self._join(request_id, call, score, at, source)
        if call.episode is not None:
            self._episodes.setdefault(call.episode, []).append(request_id)
            for entry in self._episode_fb.get(call.episode, ()):
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

    def _serves(self, variant: str, prompt: str | None) -> bool:
        """Whether a call of ``variant`` (of ``prompt``) is one of the rollout's."""
        return self.arm_of(variant) is not None

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
            "max_future_s": self.max_future_s,
            "metrics": list(CELL_METRICS),
            "covariates": {name: list(names) for name, names in self._layout.items()},
            "history": self.history.digest() if self.history is not None else None,
            "signals": list(self.signals),
        }

    def read_signals(self) -> tuple[str, ...]:
        """The signals whose feedback this rollout reads (its own, and people's when the
        drift check pairs them with its evaluator's)."""
        extra = (HUMAN,) if self._drift_source is not None else ()
        return tuple(dict.fromkeys((*self.signals, *extra)))

    def accepts(self, source: str | None) -> bool:
        """Whether feedback of ``source`` (``None``: people's) matters to this rollout:
        one of its signals, or people's and its evaluator's paired for the drift check."""
        return source in self._sources or (
            self._drift_source is not None and source in (None, self._drift_source)
        )

    def add_feedback(
        self,
        request_id: str | None,
        score: float,
        ingested_at: float,
        episode_id: str | None = None,
        ts: float | None = None,
        source: str | None = None,
    ) -> None:
        """Add one feedback score: on a call (``request_id``) it counts in that call's
        cell; on a whole episode (``episode_id`` only) in the cell of each of the
        episode's calls (see module doc). Feedback stamped (``ts``) before
        :attr:`feedback_floor` is not the rollout's and is ignored, and so is feedback of
        a ``source`` the rollout does not read (:meth:`accepts`)."""
        if not self.accepts(source) or (ts is not None and ts < self.feedback_floor):
            return
        self._evict(ingested_at)
        if request_id is None:
            if episode_id is not None and source in self._sources:
                self._add_episode_feedback(episode_id, score, ingested_at)
            return
        call = self._calls.get(request_id)
        if call is not None:
            self._join(request_id, call, score, ingested_at, source)
            return
        self._pending.setdefault(request_id, []).append((score, ingested_at, source))
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
        self._add_feedback_score(call, entry.score)

    def _add_feedback_score(self, call: _Call, score: float) -> None:
        """A feedback score joined to ``call``: a value of every metric fed by feedback,
        with the call's covariates."""
        metrics = self._cell(call.cell).metrics
        for i, (name, clustered, _) in enumerate(self._per_feedback):
            xs = call.covariates[i] if call.covariates else ()
            metrics[name].add(score, call.bucket if clustered else None, self.buckets, xs)

    def _remove_feedback_score(self, call: _Call, score: float) -> None:
        """Take back what :meth:`_add_feedback_score` added."""
        metrics = self._cell(call.cell).metrics
        for i, (name, clustered, _) in enumerate(self._per_feedback):
            xs = call.covariates[i] if call.covariates else ()
            metrics[name].remove(score, call.bucket if clustered else None, xs)

    def _joinable(self, call: _Call, at: float) -> bool:
        """Whether feedback stored at ``at`` is within the join window of ``call``."""
        lag = at - call.ingested_at
        return -PENDING_WINDOW_S <= lag <= self.feedback_max_delay_s

    def _join(
        self, request_id: str, call: _Call, score: float, at: float, source: str | None
    ) -> None:
        # Eviction already enforces the window when events come in storage order; the
        # explicit check keeps the rule exact when they do not.
        if not self._joinable(call, at):
            self.feedback.unmatched += 1
            return
        self.feedback.joined += 1
        if source in self._sources:
            self._add_feedback_score(call, score)
        if self._drift_source is not None and source in (None, self._drift_source):
            self._pair(request_id, call, score, source is not None)

    def _pair(self, request_id: str, call: _Call, score: float, by_evaluator: bool) -> None:
        """People's or the evaluator's score of a call: once the call has both (the first
        of each), their difference (evaluator − people) is a value of its cell."""
        pair = self._pairs.get(request_id)
        if pair is None:
            pair = self._pairs[request_id] = [None, None]
        slot = 1 if by_evaluator else 0
        if pair[slot] is not None:
            return
        pair[slot] = score
        human, judged = pair
        if human is None or judged is None:
            return
        metrics = self._cell(call.cell).metrics
        for name in _PAIRED:
            metrics[name].add(judged - human, call.bucket, self.buckets)

    def _evict(self, now: float) -> None:
        """Forget calls no feedback may join any more, and feedback that waited in vain."""
        horizon = now - self.feedback_max_delay_s
        calls, order = self._calls, self._call_order
        while order and order[0][0] < horizon:
            _, rid = order.popleft()
            call = calls.pop(rid, None)
            self._pairs.pop(rid, None)
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
            "future_calls": self.future_calls,
            "cells": [[step, arm, *cell.state()] for (step, arm), cell in self._cells.items()],
            # Columns rather than rows: a rollout keeps every call of its join window.
            "calls": [
                list(self._calls),
                [c.cell[0] for c in self._calls.values()],
                [c.cell[1] for c in self._calls.values()],
                [c.bucket for c in self._calls.values()],
                [c.ingested_at for c in self._calls.values()],
                [c.episode for c in self._calls.values()],
                [[list(x) for x in c.covariates] for c in self._calls.values()],
            ],
            "call_order": [[at for at, _ in self._call_order], [r for _, r in self._call_order]],
            "pending": [
                [rid, [list(e) for e in entries]] for rid, entries in self._pending.items()
            ],
            "pending_order": [list(item) for item in self._pending_order],
            "episode_feedback": [
                [e.episode, e.score, e.at, e.joined] for e in self._episode_fb_order
            ],
            "pairs": [[rid, *pair] for rid, pair in self._pairs.items()],
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
        self.future_calls = state.get("future_calls", 0)
        self._cells = {(step, arm): Cell.from_state(rest) for step, arm, *rest in state["cells"]}
        self._drop_old_units()  # the snapshot may predate the start of a later step
        columns = state["calls"]
        if len(columns) == 5:
            # A state from before episodes: no call had one.
            columns = [*columns, [None] * len(columns[0])]
        if len(columns) == 6:
            # From before covariates: no call carried any.
            columns = [*columns, [()] * len(columns[0])]
        self._calls = {
            rid: _Call((step, arm), bucket, at, episode, tuple(map(tuple, covariates)))
            for rid, step, arm, bucket, at, episode, covariates in zip(*columns, strict=True)
        }
        self._call_order = deque(zip(*state["call_order"], strict=True))
        self._pending = {
            rid: [(a, b, c) for a, b, c in entries] for rid, entries in state["pending"]
        }
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
        self._pairs = {rid: [human, judged] for rid, human, judged in state.get("pairs", ())}

    # -- views ---------------------------------------------------------------------

    def observation(self, state: RolloutState) -> Observation:
        """The machine's input for ``state`` (its current step gives SRM counts)."""
        current = state.step_index
        base = self._cells.get((current, "baseline"))
        cand = self._cells.get((current, "candidate"))
        return Observation(
            metrics={name: self._data(name) for name in CELL_METRICS},
            units=ArmCounts(
                baseline=len(base.units) if base else 0,
                candidate=len(cand.units) if cand else 0,
            ),
            requests=ArmCounts(
                baseline=base.requests if base else 0,
                candidate=cand.requests if cand else 0,
            ),
        )

    def _data(self, name: str) -> Metric:
        steps = len(self.step_starts)
        if name in _CLUSTERED:
            return cells.clustered(
                self._cells, steps, name, self.buckets, self._layout.get(name, ())
            )
        return cells.strata(self._cells, steps, name)

    def arm_summary(self) -> dict[str, dict[str, float | int | None]]:
        """Per-arm totals over all steps, for ``GET /v1/rollouts/{id}``: the requests and
        what each metric of the catalog shows."""
        out: dict[str, dict[str, float | int | None]] = {}
        for arm in ("baseline", "candidate"):
            chosen = [c for (_s, a), c in self._cells.items() if a == arm]
            shown: dict[str, float | int | None] = {"requests": sum(c.requests for c in chosen)}
            for spec in CATALOG:
                if spec.has_cells and spec.show is not None:
                    shown |= spec.show(merge([c.metrics[spec.name] for c in chosen]))
            out[arm] = shown
        return out
