"""The rollout controller: the asyncio shell around the pure state machine.

On a fixed tick (``rollout.tick_interval_s``) it turns each live rollout's aggregates into
an :class:`Observation`, asks :func:`machine.step` for a decision, persists the new state
and its audit entries (and, for promotion or rollback, the registry change) in one
transaction, and only then executes the effects: routing served over HTTP changes with
the transaction, routing on the ``promptd.routing`` topic follows (retried every tick
until it goes through), metrics and one canonical ``rollout_decision`` log line per
decision. Manual commands take the same path under the same lock, so they always win
over a tick in flight and no transition is ever applied twice; a command that arrives
after another one ended the rollout gets a :class:`Conflict` (HTTP 409), never a silent
success.

A starting rollout first reads its units' pre-period history (:mod:`.preperiod`, in the
background): until it is in, the rollout's events wait in a buffer and its ticks are
skipped, so that every value enters the aggregates with the covariates a replay after a
restart gives it (``rollout_history_loaded`` logs how long it took). A rollout whose
history cannot be read after a few attempts goes on without it.

An ending transition stores the rollout's final statistics with it (``final``), so the
API keeps showing them. A rollout starved past its grace period raises the
``rollout_starved`` alert through the alert hook (the monitor's sinks), sets
``promptd_rollout_starved`` and shows ``starvation.starved`` in its view.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from promptd._aio import wait_event
from promptd.evaluation.signals import HUMAN
from promptd.replacement import machine, preperiod, snapshots, views
from promptd.replacement.catalog import CATALOG
from promptd.replacement.coordinated import (
    LiveRollout,
    PipelineAccumulator,
    exclusion,
    plan_members,
)
from promptd.replacement.history import History
from promptd.replacement.machine import TERMINAL, RolloutState, Status
from promptd.replacement.metrics import DECISION_KINDS, FEEDBACK_OUTCOMES, RolloutMetrics
from promptd.replacement.observations import (
    DEFAULT_MAX_FUTURE_S,
    PrimaryMetric,
    RolloutAccumulator,
)
from promptd.replacement.pipelines import PipelineRegistry
from promptd.replacement.profiles import RolloutProfile
from promptd.replacement.registry import Conflict, NotFound, Registry, RegistryError
from promptd.replacement.replay import replay
from promptd.routing import Routing
from promptd.storage.database import Database, is_unique_violation
from promptd.storage.repository import BatchOutcome
from promptd.storage.rollouts import Decision, Member, RolloutStore, StoredRollout
from promptd.storage.rows import feedback_views
from promptd.storage.snapshots import SnapshotStore, last_ids

log = structlog.get_logger("promptd.rollout")


@dataclass(frozen=True, slots=True)
class StarvationAlert:
    """The ``rollout_starved`` alert of one rollout, firing or resolved."""

    prompt: str
    rollout_id: str
    reason: str
    firing: bool
    started_at: float
    at: float


RoutingPublisher = Callable[[Routing], Awaitable[None]]
AlertHook = Callable[[StarvationAlert], Awaitable[None]]
ProfileLookup = Callable[[str], RolloutProfile]

#: Waits between attempts to read a starting rollout's history; then it goes without.
HISTORY_RETRIES_S: tuple[float, ...] = (1.0, 5.0, 30.0)

# An event for an accumulator: ("metric", add_metric's arguments) or ("feedback", ...).
_Event = tuple[str, tuple[Any, ...]]


@dataclass(slots=True)
class _Live:
    row: StoredRollout
    state: RolloutState
    acc: RolloutAccumulator
    last_hold: str | None = None
    last_stats: dict[str, Any] = field(default_factory=dict)
    feedback_seen: dict[str, int] = field(default_factory=dict)
    # Events waiting for the rollout's history (None once it is in).
    pending: list[_Event] | None = None

    def feed(self, event: _Event) -> None:
        """Give one event to the accumulator, or keep it until the history is in."""
        if self.pending is not None:
            self.pending.append(event)
        elif event[0] == "metric":
            self.acc.add_metric(*event[1])
        else:
            self.acc.add_feedback(*event[1])

    def settle(self, history: History | None) -> None:
        """The history is in (None: going without): the waiting events follow it."""
        if self.pending is None:
            return
        waiting, self.pending = self.pending, None
        if history is not None:
            self.acc.set_history(history)
        for event in waiting:
            self.feed(event)


class RolloutController:
    """Owns the live rollouts of the daemon."""

    def __init__(
        self,
        db: Database,
        registry: Registry,
        profiles: ProfileLookup,
        metrics: RolloutMetrics,
        publish: RoutingPublisher | None = None,
        alert: AlertHook | None = None,
        routing_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        snapshot_interval_s: float = 0.0,
        pipelines: PipelineRegistry | None = None,
        follower: bool = False,
        max_future_s: float = DEFAULT_MAX_FUTURE_S,
        signals_of: Callable[[str], tuple[str, ...]] | None = None,
    ) -> None:
        self.db = db
        #: A standby's controller (shared store): it never acts, and serves routing and
        #: views from the rollouts as the leader stored them.
        self.follower = follower
        #: The prompt's configured quality signals of rollouts (default: people's).
        self.signals_of = signals_of or (lambda prompt: (HUMAN,))
        self.registry = registry
        #: Pipelines: what a pipeline rollout moves, and which rollouts exclude each other.
        self.pipelines = pipelines
        self.store = RolloutStore(db)
        self.profiles = profiles
        self.metrics = metrics
        self.publish = publish
        self.alert = alert
        self.routing_ttl_s = routing_ttl_s
        # Two routing TTLs plus a second: every SDK has refreshed its cache by then.
        self.srm_settle_s = 2 * routing_ttl_s + 1.0
        # Calls stamped further ahead of their storage are left out (see .observations).
        self.max_future_s = max_future_s
        self.clock = clock
        self._live: dict[str, _Live] = {}
        self._by_prompt: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._dirty_routing: set[str] = set()
        # Snapshots of the live rollouts' accumulators (see .snapshots): every event row
        # up to ``covered`` has been fed to them.
        self.snapshot_interval_s = snapshot_interval_s
        self._store = SnapshotStore(db)
        self._snapshots = self._store if snapshot_interval_s > 0 else None
        self.covered: tuple[int, int] = (0, 0)
        self._ended: set[str] = set()
        # Starting rollouts' history reads, owned here (cancelled at the end of run()).
        self._loading: dict[str, asyncio.Task[None]] = {}

    # -- start-up ------------------------------------------------------------------

    async def resume(self) -> None:
        """Load live rollouts and replay their stored events (before ingestion starts):
        from their snapshot on when there is a usable one, else since they started."""
        self.covered = await last_ids(self.db)
        for row in await self.store.live():
            state = RolloutState.from_dict(row.state)
            acc = self._accumulator(row, state, list(row.step_starts))
            calls = feedback = 0
            history = None
            if row.step_starts and self._wants_history(state):
                history, source = await preperiod.load(
                    self.db, self._store, row.id, row.prompts, row.step_starts[0],
                    self.profiles(state.profile).history_lookback_s, acc.signals,
                )  # fmt: skip
                acc.set_history(history)
                log.info("rollout_history_loaded", rollout_id=row.id, source=source,
                         units=len(history.units))  # fmt: skip
            if row.step_starts:
                after = await self._load_snapshot(row.id, acc)
                if after is None:  # damaged: acc may hold part of it
                    acc = self._accumulator(row, state, list(row.step_starts))
                    if history is not None:
                        acc.set_history(history)
                    after = (0, 0)
                served = _served(row, acc)
                calls, feedback = await replay(self.db, acc, served, row.step_starts[0], after)
            live = _Live(row, state, acc)
            self._add_live(live)
            self._count_feedback(live)
            log.info(
                "rollout_resumed",
                rollout_id=row.id,
                prompt=row.prompt,
                step=state.step_index,
                weight=state.weight,
                status=state.status.value,
                replayed_calls=calls,
                replayed_feedback=feedback,
            )
        for prompt in await self._all_prompts():
            self._dirty_routing.add(prompt)

    async def _load_snapshot(
        self, rollout_id: str, acc: RolloutAccumulator
    ) -> tuple[int, int] | None:
        """Load the rollout's snapshot into ``acc``; the row ids it covers ((0, 0): none;
        ``None``: it did not decode and ``acc`` must be rebuilt)."""
        if self._snapshots is None:
            return (0, 0)
        snap = await self._snapshots.load(snapshots.name(rollout_id))
        if snap is None:
            return (0, 0)
        stored = self.covered
        if stored[0] < snap.metric_id or stored[1] < snap.feedback_id:
            log.warning("rollout_snapshot_ignored", rollout_id=rollout_id, reason="ids went back")
            return (0, 0)
        try:
            loaded = snapshots.load(acc, snap)
        except snapshots.SnapshotDamaged as exc:
            log.warning("rollout_snapshot_ignored", rollout_id=rollout_id, reason=str(exc))
            return None
        if not loaded:
            log.warning("rollout_snapshot_ignored", rollout_id=rollout_id, reason="other config")
            return (0, 0)
        return (snap.metric_id, snap.feedback_id)

    def _accumulator(
        self, row: StoredRollout, state: RolloutState, step_starts: list[float]
    ) -> RolloutAccumulator:
        profile = self.profiles(state.profile)
        primary = _primary(state.primary_metric)
        common: dict[str, Any] = {
            "step_starts": step_starts,
            "srm_settle_s": self.srm_settle_s,
            "feedback_max_delay_s": profile.feedback_max_delay_s,
            "max_future_s": self.max_future_s,
            "adjust": profile.adjust_covariates,
        }
        if not row.members:
            return RolloutAccumulator(
                row.baseline, row.candidate, primary, **common, signals=state.signals
            )
        return PipelineAccumulator(
            row.baseline,
            row.candidate,
            primary,
            **common,
            members={m.prompt: (m.baseline, m.candidate) for m in row.members},
            salt=state.salt,
            weights=tuple(s.weight for s in profile.steps),
        )

    def _wants_history(self, state: RolloutState) -> bool:
        profile = self.profiles(state.profile)
        return profile.adjust_covariates and profile.history_lookback_s > 0

    def _read_history(self, live: _Live) -> None:
        """Start reading a new rollout's history; its events wait until it is in."""
        live.pending = []
        rid = live.row.id
        self._loading[rid] = asyncio.create_task(self._history(live), name=f"history-{rid}")

    async def _history(self, live: _Live) -> None:
        try:
            await self._read(live)
        except Exception:
            # Never left waiting: the events count without history.
            log.exception("rollout_history_failed", rollout_id=live.row.id, retry_in_s=None)
            live.settle(None)
            self._loading.pop(live.row.id, None)

    async def _read(self, live: _Live) -> None:
        row, started = live.row, time.monotonic()
        lookback = self.profiles(live.state.profile).history_lookback_s
        start = live.acc.step_starts[0]
        history, source = History.empty(start - lookback, start), "none"
        for wait in (*HISTORY_RETRIES_S, None):
            try:
                if wait is None:
                    # Saved empty, so that a restart goes on without it too.
                    await preperiod.save(self._store, row.id, history)
                else:
                    history, source = await preperiod.load(
                        self.db, self._store, row.id, row.prompts, start, lookback,
                        live.acc.signals,
                    )  # fmt: skip
                break
            except Exception:
                log.exception("rollout_history_failed", rollout_id=row.id, retry_in_s=wait)
                if wait is not None:
                    await asyncio.sleep(wait)
        async with self._lock:
            waited = len(live.pending or ())
            live.settle(history)
        self._loading.pop(row.id, None)
        log.info(
            "rollout_history_loaded",
            rollout_id=row.id,
            source=source,
            units=len(history.units),
            seconds=round(time.monotonic() - started, 3),
            waited_events=waited,
        )

    async def history_loaded(self) -> None:
        """Return once every starting rollout's history is in (or given up on)."""
        await asyncio.gather(*self._loading.values(), return_exceptions=True)

    async def _all_prompts(self) -> list[str]:
        return [p.name for p in await self.registry.list_prompts()]

    # -- event feed ----------------------------------------------------------------

    async def on_batch(self, outcome: BatchOutcome) -> None:
        """Ingestion listener: add newly stored events of live rollouts' prompts.

        Calls before feedback, as the replay orders them; feedback is joined to its call
        by ``request_id`` (see :mod:`.observations`).
        """
        covered = self.covered
        self.covered = (
            max(covered[0], outcome.last_metric_id),
            max(covered[1], outcome.last_feedback_id),
        )
        if not self._by_prompt:
            return
        at = outcome.ingested_at or self.clock()
        touched: set[str] = set()
        for m in outcome.metrics:
            rid = self._by_prompt.get(m.prompt)
            if rid is not None:
                unit = m.unit_id or m.episode_id or m.request_id
                facts = (m.latency_ms, m.success, m.quality, m.cost_usd, m.request_id, at)
                self._live[rid].feed(
                    (
                        "metric",
                        (m.ts, m.variant, unit, *facts, m.episode_id, m.prompt, m.input_chars),
                    )
                )
        # People's feedback, then the evaluators' results (the replay's order: by row id).
        for f in (*outcome.feedback, *feedback_views(outcome.evaluation_rows)):
            if f.request_id is None:
                # On a whole episode: every rollout may hold calls of it.
                for rid, live in self._live.items():
                    live.feed(("feedback", (None, f.score, at, f.episode_id, f.ts, f.source)))
                    touched.add(rid)
                continue
            rid = self._by_prompt.get(f.prompt or "")
            if rid is not None and self._live[rid].acc.accepts(f.source):
                self._live[rid].feed(
                    ("feedback", (f.request_id, f.score, at, None, f.ts, f.source))
                )
                touched.add(rid)
        for rid in touched:
            self._count_feedback(self._live[rid])

    def _count_feedback(self, live: _Live) -> None:
        counts = live.acc.feedback
        for outcome in FEEDBACK_OUTCOMES:
            value = getattr(counts, outcome)
            delta = value - live.feedback_seen.get(outcome, 0)
            if delta > 0:
                self.metrics.feedback.labels(prompt=live.row.prompt, outcome=outcome).inc(delta)
                live.feedback_seen[outcome] = value

    # -- the loop ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        """Tick every ``interval_s`` until ``stop``, snapshotting the live rollouts every
        ``snapshot_interval_s`` and once more at the end."""
        last_snapshot = time.monotonic()
        try:
            while not stop.is_set():
                await self.tick()
                if time.monotonic() - last_snapshot >= self.snapshot_interval_s:
                    await self.snapshot_once()
                    last_snapshot = time.monotonic()
                await wait_event(stop, interval_s)
        finally:
            # Also when the loop is cancelled (a hard stop): the history reads are this
            # controller's tasks and must not outlive it, holding a connection.
            await self.stop_loading()
        await self.snapshot_once()

    async def stop_loading(self) -> None:
        """Cancel the history reads still in flight (a stop: the next start reads the
        history again, or its saved copy)."""
        tasks = list(self._loading.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def snapshot_once(self) -> int:
        """Save every live rollout's accumulator; returns how many (never raises).

        The state is copied on the loop (where the batch listener mutates it), encoded in
        a worker thread and saved; snapshots of ended rollouts are deleted.
        """
        await self._forget_ended()
        store = self._snapshots
        if store is None:
            return 0
        saved = 0
        try:
            for rid, live in list(self._live.items()):
                if live.pending is not None:
                    continue  # its events wait for the history: nothing to save yet
                header, state = snapshots.take(rid, live.acc, self.covered, self.clock())
                snap = await asyncio.to_thread(snapshots.finish, header, state)
                await store.save(snap)
                saved += 1
        except Exception:
            # The next interval retries; a restart without one only replays more events.
            log.exception("rollout_snapshot_failed")
        return saved

    async def _forget_ended(self) -> None:
        """Delete the saved aggregates and history of ended rollouts."""
        try:
            for rid in list(self._ended):
                await self._store.delete(snapshots.name(rid))
                await self._store.delete(preperiod.name(rid))
                self._ended.discard(rid)
        except Exception:
            log.exception("rollout_snapshot_failed")  # retried on the next call

    async def tick(self) -> None:
        """Evaluate every running rollout once; publish pending routing."""
        for rid in list(self._live):
            live = self._live.get(rid)
            if live is None or live.state.status is not Status.RUNNING:
                continue
            if live.pending is not None:
                continue  # waiting for its history
            try:
                await self._apply(rid, None)
            except Exception:
                # One broken rollout must not stop the others; it is retried next tick.
                log.exception("rollout_tick_failed", rollout_id=rid)
        await self.flush_routing()

    # -- commands ------------------------------------------------------------------

    async def start_rollout(
        self,
        prompt: str,
        candidate: str,
        profile: str | None = None,
        primary_metric: str = "feedback_score",
        *,
        require_win: bool = False,
    ) -> StoredRollout:
        """Start a rollout of ``candidate`` against the active version of ``prompt``.

        ``require_win`` (the optimizer's candidates): promote only on a significant online
        win; without one by the profile's horizon the rollout ends as ``no_improvement``,
        the candidate is retired and the active version stays. Stored with the rollout.

        Refused (:class:`Conflict`, naming the other rollout) while a rollout is live for
        ``prompt``, or for a prompt of its pipeline that it depends on or that depends on
        it: their effects would confound each other.
        """
        async with self._lock:
            info = await self.registry.get_prompt(prompt)
            version = await self.registry.get_version(prompt, candidate)
            if info.active_version is None:
                raise Conflict(f"prompt {prompt!r} has no active version to compare against")
            if version.version == info.active_version:
                raise Conflict(f"{candidate!r} is already the active version of {prompt!r}")
            await self._exclusive([prompt])
            member = Member(prompt=prompt, baseline=info.active_version, candidate=candidate)
            row = await self._create(
                member, (), None, profile or info.profile, primary_metric, require_win
            )
        await self.flush_routing()
        return row

    async def start_pipeline_rollout(
        self,
        pipeline: str,
        candidates: Mapping[str, str],
        *,
        profile: str | None = None,
        primary_metric: str | None = None,
        require_win: bool = False,
    ) -> StoredRollout:
        """Start one coordinated rollout of ``pipeline``: the pipeline variant (each
        changed step's candidate, ``candidates`` maps prompt -> version) against the
        active pipeline, with one state machine and one A/B test (see :mod:`.coordinated`).

        Every step's routing carries the rollout's salt, weight and id, so a unit (or an
        episode) is in the candidate arm for all steps together; unchanged steps keep
        serving their active version in both arms. Promotion and rollback change every
        changed step in one transaction. The profile defaults to the first changed step's,
        the primary metric to ``feedback_score`` (feedback on whole episodes).
        ``require_win`` as for :meth:`start_rollout`. Refused with :class:`Conflict` while
        any step has a live rollout (its own or another pipeline's).
        """
        if self.pipelines is None:
            raise RegistryError("pipelines are not available in this daemon")
        async with self._lock:
            chain = await self.pipelines.get(pipeline)
            members = await plan_members(self.registry, chain, candidates)
            await self._exclusive([m.prompt for m in members])
            lead = next(m for m in members if m.candidate is not None)
            info = await self.registry.get_prompt(lead.prompt)
            row = await self._create(
                lead,
                members,
                chain.name,
                profile or info.profile,
                primary_metric or "feedback_score",
                require_win,
            )
        await self.flush_routing()
        return row

    async def _exclusive(self, prompts: Sequence[str]) -> None:
        """Refuse (409, naming the other rollout) a rollout of ``prompts`` while one of
        them, or a prompt one of them depends on or that depends on it, is in a live
        rollout (see :func:`.coordinated.exclusion`)."""
        live = {
            prompt: LiveRollout(rid, self._live[rid].row.pipeline)
            for prompt, rid in self._by_prompt.items()
        }
        for row in await self.store.live():
            # Not loaded in memory (never the case after resume(), but the rows decide).
            for prompt in row.prompts:
                live.setdefault(prompt, LiveRollout(row.id, row.pipeline))
        related = {}
        if self.pipelines is not None:
            related = {p: await self.pipelines.related(p) for p in prompts}
        why = exclusion(prompts, related, live)
        if why is not None:
            raise Conflict(why)

    async def _create(
        self,
        lead: Member,
        members: Sequence[Member],
        pipeline: str | None,
        profile_name: str,
        primary_metric: str,
        require_win: bool,
    ) -> StoredRollout:
        """Store a new rollout at its first step and make it live (under the lock)."""
        assert lead.candidate is not None
        chosen = self.profiles(profile_name)
        now = self.clock()
        state = RolloutState(
            rollout_id=f"ro-{uuid.uuid4().hex[:12]}",
            prompt=lead.prompt,
            baseline_version=lead.baseline,
            candidate_version=lead.candidate,
            salt=uuid.uuid4().hex,
            profile=chosen.name,
            primary_metric=_primary(primary_metric),
            require_win=require_win,
            # A pipeline's primary metric is people's feedback on whole episodes.
            signals=(HUMAN,) if pipeline is not None else self.signals_of(lead.prompt),
        )
        new_state, actions = machine.step(state, machine.Start(), now, chosen)
        decisions = self._decisions(new_state, actions, now)
        try:
            await self.store.create(
                state.rollout_id,
                lead.prompt,
                lead.candidate,
                lead.baseline,
                new_state.to_dict(),
                [now],
                decisions,
                pipeline=pipeline,
                members=members,
            )
        except Exception as exc:
            if is_unique_violation(exc):
                raise Conflict(f"prompt {lead.prompt!r} already has a live rollout") from None
            raise
        row = await self.store.get(state.rollout_id)
        assert row is not None
        acc = self._accumulator(row, new_state, [now])
        live = _Live(row, new_state, acc)
        self._add_live(live)
        if self._wants_history(new_state):
            self._read_history(live)
        self._after(row, state, new_state, decisions)
        return row

    async def command(self, rollout_id: str, event: machine.Event) -> StoredRollout:
        """Apply a manual command (pause, resume, promote, rollback).

        Raises :class:`Conflict` when the rollout has ended — also when another command or
        a tick ended it while this one waited for the lock: of two conflicting commands one
        wins and the other is refused, never silently dropped.
        """
        if rollout_id not in self._live:
            await self._refuse(rollout_id)
        try:
            await self._apply(rollout_id, event)
        except machine.IllegalTransition as exc:
            raise Conflict(str(exc)) from None
        await self.flush_routing()
        row = await self.store.get(rollout_id)
        assert row is not None
        return row

    # -- the transition ------------------------------------------------------------

    async def _refuse(self, rollout_id: str) -> None:
        row = await self.store.get(rollout_id)
        if row is None:
            raise NotFound(f"rollout {rollout_id!r} does not exist")
        raise Conflict(f"rollout {rollout_id!r} is {row.status}: it takes no more commands")

    async def _apply(self, rollout_id: str, event: machine.Event | None) -> None:
        async with self._lock:
            live = self._live.get(rollout_id)
            if live is None:
                if event is not None:
                    await self._refuse(rollout_id)  # ended while this command waited
                return
            now = self.clock()
            profile = self.profiles(live.state.profile)
            if event is None:
                event = machine.Tick(live.acc.observation(live.state))
            old = live.state
            new, actions = machine.step(old, event, now, profile)
            decisions = self._decisions(new, actions, now, live)
            self._adjustment_gauges(live)
            if new.step_index > old.step_index:
                live.acc.start_step(new.step_index, now)
            self._starvation_gauges(live.row, new, now)
            if new == old and not decisions:
                return
            outcome = _outcome(actions)
            final = None
            if new.status in TERMINAL:
                self._stop_reading_history(live)
                final = views.snapshot(new, live.acc, profile, live.last_stats)
            await self.store.transition(
                live.row, new.to_dict(), live.acc.step_starts, decisions, outcome, final
            )
            live.state = new
            self._after(live.row, old, new, decisions)
            await self._alerts(live.row, old, actions, now)
            if new.status in TERMINAL:
                self._drop_live(rollout_id)

    def _adjustment_gauges(self, live: _Live) -> None:
        """The variance reduction each metric's regression adjustment achieved last tick."""
        for spec in CATALOG:
            value = live.last_stats.get(f"{spec.name}_variance_reduction")
            if isinstance(value, int | float):
                gauge = self.metrics.variance_reduction
                gauge.labels(prompt=live.row.prompt, metric=spec.name).set(value)

    def _starvation_gauges(self, row: StoredRollout, state: RolloutState, now: float) -> None:
        since = state.starving_since
        live = state.status not in TERMINAL
        for prompt in row.prompts:
            self.metrics.starving_seconds.labels(prompt=prompt).set(
                now - since if since is not None and live else 0.0
            )
            self.metrics.starved.labels(prompt=prompt).set(
                1.0 if state.starvation_acted_at is not None and live else 0.0
            )

    async def _alerts(
        self, row: StoredRollout, old: RolloutState, actions: list[machine.Action], now: float
    ) -> None:
        for action in actions:
            if isinstance(action, machine.RaiseAlert):
                alert = StarvationAlert(row.prompt, row.id, action.reason, True, now, now)
            elif isinstance(action, machine.ResolveAlert):
                started = old.starvation_acted_at if old.starvation_acted_at is not None else now
                alert = StarvationAlert(row.prompt, row.id, action.reason, False, started, now)
            else:
                continue
            log.warning(
                "rollout_starved" if alert.firing else "rollout_starvation_resolved",
                rollout_id=row.id,
                prompt=row.prompt,
                reason=alert.reason,
            )
            if self.alert is None:
                continue
            try:
                await self.alert(alert)
            except Exception:
                # The transition is stored; a failing alert path must not undo or repeat it.
                log.exception("rollout_alert_failed", rollout_id=row.id)

    def _decisions(
        self,
        state: RolloutState,
        actions: list[machine.Action],
        now: float,
        live: _Live | None = None,
    ) -> list[Decision]:
        out = []
        for action in actions:
            if not isinstance(action, machine.RecordDecision):
                continue
            if action.kind == "hold" and live is not None:
                # A hold repeats every tick; the audit log keeps it once per reason.
                if live.last_hold == action.reason:
                    live.last_stats = dict(action.details)
                    continue
                live.last_hold = action.reason
            elif live is not None:
                live.last_hold = None
            if live is not None and action.details:
                # A manual command carries no statistics: keep the last tick's.
                live.last_stats = dict(action.details)
            out.append(
                Decision(
                    ts=now,
                    kind=action.kind,
                    reason=action.reason,
                    details=dict(action.details) or None,
                    step=state.step_index,
                    weight=state.weight,
                )
            )
        return out

    def _after(
        self, row: StoredRollout, old: RolloutState, new: RolloutState, decisions: list[Decision]
    ) -> None:
        for d in decisions:
            self.metrics.decisions.labels(prompt=row.prompt, kind=d.kind).inc()
            log.info(
                "rollout_decision",
                rollout_id=row.id,
                prompt=row.prompt,
                decision=d.kind,
                reason=d.reason,
                step=new.step_index,
                weight=new.weight,
                status=new.status.value,
                **{k: v for k, v in (d.details or {}).items() if isinstance(v, int | float | str)},
            )
        self._paused_by_check(row, new, decisions)
        # Gauges and routing for every prompt the rollout routes (a pipeline's steps);
        # counters under the rollout's prompt (a pipeline's first changed step).
        for prompt in row.prompts:
            self.metrics.weight.labels(prompt=prompt).set(
                new.weight if new.status in (Status.RUNNING, Status.PAUSED) else 0.0
            )
            self.metrics.step.labels(prompt=prompt).set(new.step_index)
            if old.weight != new.weight or old.status != new.status:
                self._dirty_routing.add(prompt)
        if new.status in TERMINAL:
            self._starvation_gauges(row, new, 0.0)

    def _paused_by_check(
        self, row: StoredRollout, new: RolloutState, decisions: list[Decision]
    ) -> None:
        """The gauge of a pause asked by a check (judge drift): 1 from that pause on, 0
        once the rollout runs again or ends."""
        for d in decisions:
            check = (d.details or {}).get("paused_by")
            if d.kind == "pause" and isinstance(check, str):
                log.warning(
                    "rollout_paused_by_check", rollout_id=row.id, prompt=row.prompt,
                    check=check, reason=d.reason,
                )  # fmt: skip
                self.metrics.paused_by_check.labels(prompt=row.prompt, check=check).set(1.0)
        if new.status is not Status.PAUSED:
            for spec in CATALOG:
                if spec.action == "pause":
                    self.metrics.paused_by_check.labels(prompt=row.prompt, check=spec.name).set(0)

    def _add_live(self, live: _Live) -> None:
        # Every decision series exists from the start at 0, so Prometheus' increase()
        # sees the first rollback as an increase rather than a new series.
        for kind in DECISION_KINDS:
            self.metrics.decisions.labels(prompt=live.row.prompt, kind=kind)
        for outcome in FEEDBACK_OUTCOMES:
            self.metrics.feedback.labels(prompt=live.row.prompt, outcome=outcome)
        self._starvation_gauges(live.row, live.state, self.clock())
        self._live[live.row.id] = live
        for prompt in live.row.prompts:
            self._by_prompt[prompt] = live.row.id
            self.metrics.weight.labels(prompt=prompt).set(live.state.weight)
            self.metrics.step.labels(prompt=prompt).set(live.state.step_index)
        self.metrics.live.set(len(self._live))

    def _stop_reading_history(self, live: _Live) -> None:
        """An ending rollout stops waiting for its history: its events count without."""
        task = self._loading.pop(live.row.id, None)
        if task is not None:
            task.cancel()
        live.settle(None)

    def _drop_live(self, rollout_id: str) -> None:
        self._ended.add(rollout_id)
        live = self._live.pop(rollout_id)
        for prompt in live.row.prompts:
            self._by_prompt.pop(prompt, None)
        for spec in CATALOG:
            with contextlib.suppress(KeyError):  # never set: no adjustment reported
                self.metrics.variance_reduction.remove(live.row.prompt, spec.name)
        self.metrics.live.set(len(self._live))

    # -- routing -------------------------------------------------------------------

    async def routing(self, prompt: str) -> Routing:
        """Current routing of ``prompt`` (raises :class:`NotFound` for unknown prompts)."""
        info = await self.registry.get_prompt(prompt)
        active = await self.registry.active(prompt)
        live = await self._live_rollout(prompt)
        candidate_version = candidate_template = None
        candidate_config: dict[str, Any] | None = None
        weight, salt = 0.0, ""
        if live is not None and live[1].status in (Status.RUNNING, Status.PAUSED):
            row, state = live
            # A pipeline's unchanged step carries the salt and weight without a candidate.
            change = next((c.candidate for c in row.changes if c.prompt == prompt), None)
            if change is not None:
                cand = await self.registry.get_version(prompt, change)
                candidate_version, candidate_template = cand.version, cand.template
                candidate_config = cand.config
            weight, salt = state.weight, state.salt
        return Routing(
            prompt=prompt,
            active_version=info.active_version,
            active_template=active.template if active else None,
            active_config=active.config if active else None,
            candidate_version=candidate_version,
            candidate_template=candidate_template,
            candidate_config=candidate_config,
            weight=weight,
            salt=salt,
            rollout_id=live[0].id if live else None,
            ttl_seconds=self.routing_ttl_s,
            updated_at=self.clock(),
        )

    async def _live_rollout(self, prompt: str) -> tuple[StoredRollout, RolloutState] | None:
        """The live rollout routing ``prompt``: the leader's own, or (a follower) the one
        stored, read at each call, so routing changes with the leader's transaction."""
        if self.follower:
            for row in await self.store.live():
                if prompt in row.prompts:
                    return row, RolloutState.from_dict(row.state)
            return None
        rid = self._by_prompt.get(prompt)
        live = self._live.get(rid) if rid else None
        return (live.row, live.state) if live else None

    def mark_routing_dirty(self, prompt: str) -> None:
        """Publish ``prompt``'s routing on the next flush (e.g. after a restore)."""
        self._dirty_routing.add(prompt)

    async def flush_routing(self) -> None:
        """Publish routing of every prompt whose routing changed; keep failures for later."""
        if self.publish is None:
            self._dirty_routing.clear()
            return
        for prompt in sorted(self._dirty_routing):
            try:
                routing = await self.routing(prompt)
                await self.publish(routing)
            except NotFound:
                pass
            except Exception as exc:
                self.metrics.routing_publish_failures.inc()
                log.warning("routing_publish_failed", prompt=prompt, error=repr(exc))
                continue
            self._dirty_routing.discard(prompt)

    # -- views ---------------------------------------------------------------------

    async def describe(self, rollout_id: str) -> dict[str, Any]:
        """Everything about one rollout: state, arms, statistics, starvation, decision log.

        ``arms``, ``statistics``, ``winner`` and ``has_significant_result`` are always
        there: from the live aggregates, or from the snapshot stored when it ended.
        """
        row = await self.store.get(rollout_id)
        if row is None:
            raise NotFound(f"rollout {rollout_id!r} does not exist")
        live = self._live.get(rollout_id)
        state = live.state.to_dict() if live else row.state
        profile = self._profile_or_none(state["profile"])
        body: dict[str, Any] = views.summary(row, state) | {
            "salt": state["salt"],
            "profile": state["profile"],
            "primary_metric": state["primary_metric"],
            # The quality signals of its primary metric (older rollouts: people's).
            "signals": list(state.get("signals", ["human"])),
            "state": state,
            "step_starts": live.acc.step_starts if live else row.step_starts,
            "starvation": views.starvation(state, profile, self.clock()),
            "profile_settings": views.profile_view(profile),
            "decisions": [d.model_dump() for d in await self.store.decisions(rollout_id)],
        }
        if live is not None and profile is not None:
            body |= views.snapshot(live.state, live.acc, profile, live.last_stats)
            body["adjustment"]["history_loading"] = live.pending is not None
        else:
            body |= {**views.EMPTY_FINAL, **(row.final or {})}
        return body

    def _profile_or_none(self, name: str) -> RolloutProfile | None:
        """The profile, or None when it is no longer configured (an ended rollout's view)."""
        try:
            return self.profiles(name)
        except KeyError:
            return None

    async def list(self) -> list[dict[str, Any]]:
        """Summaries of recent rollouts, newest first."""
        out = []
        for row in await self.store.all():
            live = self._live.get(row.id)
            out.append(views.summary(row, live.state.to_dict() if live else row.state))
        return out

    def live_prompts(self) -> set[str]:
        """Prompts with a live rollout (the optimizer does not run on them)."""
        return set(self._by_prompt)

    async def live_prompt_names(self) -> set[str]:
        """:meth:`live_prompts`, read from storage on a follower."""
        if not self.follower:
            return self.live_prompts()
        return {prompt for row in await self.store.live() for prompt in row.prompts}


def _served(row: StoredRollout, acc: RolloutAccumulator) -> dict[str, tuple[str, ...]]:
    """The versions each prompt of the rollout serves (what its replay reads)."""
    if isinstance(acc, PipelineAccumulator):
        return acc.served()
    return {row.prompt: (row.baseline, row.candidate)}


def _outcome(actions: list[machine.Action]) -> str | None:
    """The registry change a transition carries, if any."""
    for action in actions:
        if isinstance(action, machine.PromoteCandidate):
            return "promoted"
        if isinstance(action, machine.RollbackCandidate):
            return "rolled_back"
        if isinstance(action, machine.RetireCandidate):
            return "no_improvement"
    return None


def _primary(name: str) -> PrimaryMetric:
    if name not in ("feedback_score", "success_rate", "quality"):
        raise RegistryError(
            f"unknown primary metric {name!r}; use feedback_score, success_rate or quality"
        )
    return name  # type: ignore[return-value]
