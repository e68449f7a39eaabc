"""The rollout controller: the asyncio shell around the pure state machine.

On a fixed tick (``rollout.tick_interval_s``) it turns each live rollout's aggregates into
an :class:`Observation`, asks :func:`machine.step` for a decision, persists the new state
and its audit entries (and, for promotion or rollback, the registry change) in one
transaction, and only then executes the effects: routing served over HTTP changes with
the transaction, routing on the ``promptd.routing`` topic follows (retried every tick
until it goes through), metrics and one canonical ``rollout_decision`` log line per
decision. Manual commands take the same path under the same lock, so they always win
over a tick in flight and no transition is ever applied twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from promptd._aio import wait_event
from promptd.replacement import machine
from promptd.replacement.machine import RolloutState, Status
from promptd.replacement.observations import PrimaryMetric, RolloutAccumulator
from promptd.replacement.profiles import RolloutProfile
from promptd.replacement.registry import Conflict, NotFound, Registry, RegistryError
from promptd.routing import Routing
from promptd.storage.database import Database
from promptd.storage.repository import BatchOutcome, EventRepository
from promptd.storage.rollouts import Decision, RolloutStore, StoredRollout

log = structlog.get_logger("promptd.rollout")

RoutingPublisher = Callable[[Routing], Awaitable[None]]
AlertHook = Callable[[str, str, str], Awaitable[None]]
ProfileLookup = Callable[[str], RolloutProfile]


DECISION_KINDS = ("start", "advance", "hold", "promote", "rollback", "pause", "resume")


class RolloutMetrics:
    """Prometheus metrics of rollouts."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.weight = Gauge(
            "promptd_rollout_candidate_weight",
            "Share of traffic (0..1) routed to the candidate of the prompt's live rollout.",
            ["prompt"],
            registry=registry,
        )
        self.step = Gauge(
            "promptd_rollout_step",
            "Index of the current step of the prompt's live rollout.",
            ["prompt"],
            registry=registry,
        )
        self.decisions = Counter(
            "promptd_rollout_decisions_total",
            "Rollout decisions by kind (start, advance, promote, rollback, pause, …).",
            ["prompt", "kind"],
            registry=registry,
        )
        self.live = Gauge("promptd_rollouts_live", "Rollouts running or paused.", registry=registry)
        self.routing_publish_failures = Counter(
            "promptd_routing_publish_failures_total",
            "Failed publications to the routing topic (retried next tick).",
            registry=registry,
        )


@dataclass(slots=True)
class _Live:
    row: StoredRollout
    state: RolloutState
    acc: RolloutAccumulator
    last_hold: str | None = None
    last_stats: dict[str, Any] = field(default_factory=dict)


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
    ) -> None:
        self.db = db
        self.registry = registry
        self.store = RolloutStore(db)
        self.profiles = profiles
        self.metrics = metrics
        self.publish = publish
        self.alert = alert
        self.routing_ttl_s = routing_ttl_s
        # Two routing TTLs plus a second: every SDK has refreshed its cache by then.
        self.srm_settle_s = 2 * routing_ttl_s + 1.0
        self.clock = clock
        self._live: dict[str, _Live] = {}
        self._by_prompt: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._dirty_routing: set[str] = set()

    # -- start-up ------------------------------------------------------------------

    async def resume(self) -> None:
        """Load live rollouts and replay their stored events (before ingestion starts)."""
        for row in await self.store.live():
            state = RolloutState.from_dict(row.state)
            acc = RolloutAccumulator(
                row.baseline,
                row.candidate,
                _primary(state.primary_metric),
                step_starts=list(row.step_starts),
                srm_settle_s=self.srm_settle_s,
            )
            await self._replay(row, acc)
            self._add_live(_Live(row, state, acc))
            log.info(
                "rollout_resumed",
                rollout_id=row.id,
                prompt=row.prompt,
                step=state.step_index,
                weight=state.weight,
                status=state.status.value,
            )
        for prompt in await self._all_prompts():
            self._dirty_routing.add(prompt)

    async def _replay(self, row: StoredRollout, acc: RolloutAccumulator) -> None:
        if not row.step_starts:
            return
        since = row.step_starts[0]
        variants = (row.baseline, row.candidate)
        events = EventRepository(self.db)
        floor = await events.first_id_since("metric_events", since)
        async with self.db.reader.execute(
            "SELECT ts, variant, coalesce(unit_id, request_id), latency_ms, success, quality, "
            "cost_usd FROM metric_events "
            "WHERE id >= ? AND ts >= ? AND prompt = ? AND variant IN (?, ?)",
            (floor, since, row.prompt, *variants),
        ) as cur:
            async for r in cur:
                acc.add_metric(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6])
        floor = await events.first_id_since("feedback_events", since)
        async with self.db.reader.execute(
            "SELECT ts, variant, score FROM feedback_events "
            "WHERE id >= ? AND ts >= ? AND prompt = ? AND variant IN (?, ?)",
            (floor, since, row.prompt, *variants),
        ) as cur:
            async for r in cur:
                acc.add_feedback(r[0], r[1], r[2])

    async def _all_prompts(self) -> list[str]:
        return [p.name for p in await self.registry.list_prompts()]

    # -- event feed ----------------------------------------------------------------

    async def on_batch(self, outcome: BatchOutcome) -> None:
        """Ingestion listener: add newly stored events of live rollouts' prompts."""
        if not self._by_prompt:
            return
        for m in outcome.metrics:
            rid = self._by_prompt.get(m.prompt)
            if rid is not None:
                self._live[rid].acc.add_metric(
                    m.ts,
                    m.variant,
                    m.unit_id or m.request_id,
                    m.latency_ms,
                    m.success,
                    m.quality,
                    m.cost_usd,
                )
        for f in outcome.feedback:
            rid = self._by_prompt.get(f.prompt)
            if rid is not None:
                self._live[rid].acc.add_feedback(f.ts, f.variant, f.score)

    # -- the loop ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        """Tick every ``interval_s`` until ``stop``."""
        while not stop.is_set():
            await self.tick()
            await wait_event(stop, interval_s)

    async def tick(self) -> None:
        """Evaluate every running rollout once; publish pending routing."""
        for rid in list(self._live):
            live = self._live.get(rid)
            if live is None or live.state.status is not Status.RUNNING:
                continue
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
    ) -> StoredRollout:
        """Start a rollout of ``candidate`` against the active version of ``prompt``."""
        async with self._lock:
            info = await self.registry.get_prompt(prompt)
            version = await self.registry.get_version(prompt, candidate)
            if info.active_version is None:
                raise Conflict(f"prompt {prompt!r} has no active version to compare against")
            if version.version == info.active_version:
                raise Conflict(f"{candidate!r} is already the active version of {prompt!r}")
            if prompt in self._by_prompt or await self.store.live_for(prompt):
                raise Conflict(
                    f"prompt {prompt!r} already has a live rollout "
                    f"({self._by_prompt.get(prompt, '?')}); finish it first"
                )
            profile_name = profile or info.profile
            chosen = self.profiles(profile_name)
            now = self.clock()
            state = RolloutState(
                rollout_id=f"ro-{uuid.uuid4().hex[:12]}",
                prompt=prompt,
                baseline_version=info.active_version,
                candidate_version=candidate,
                salt=uuid.uuid4().hex,
                profile=chosen.name,
                primary_metric=_primary(primary_metric),
            )
            new_state, actions = machine.step(state, machine.Start(), now, chosen)
            decisions = self._decisions(new_state, actions, now)
            row_state = new_state.to_dict()
            try:
                await self.store.create(
                    state.rollout_id,
                    prompt,
                    candidate,
                    info.active_version,
                    row_state,
                    [now],
                    decisions,
                )
            except Exception as exc:
                if "UNIQUE" in str(exc):
                    raise Conflict(f"prompt {prompt!r} already has a live rollout") from None
                raise
            row = await self.store.get(state.rollout_id)
            assert row is not None
            acc = RolloutAccumulator(
                info.active_version,
                candidate,
                _primary(primary_metric),
                step_starts=[now],
                srm_settle_s=self.srm_settle_s,
            )
            self._add_live(_Live(row, new_state, acc))
            self._after(row, state, new_state, decisions)
        await self.flush_routing()
        return row

    async def command(self, rollout_id: str, event: machine.Event) -> StoredRollout:
        """Apply a manual command (pause, resume, promote, rollback)."""
        if rollout_id not in self._live:
            row = await self.store.get(rollout_id)
            if row is None:
                raise NotFound(f"rollout {rollout_id!r} does not exist")
            raise Conflict(f"rollout {rollout_id!r} is {row.status}: it takes no more commands")
        try:
            await self._apply(rollout_id, event)
        except machine.IllegalTransition as exc:
            raise Conflict(str(exc)) from None
        await self.flush_routing()
        row = await self.store.get(rollout_id)
        assert row is not None
        return row

    # -- the transition ------------------------------------------------------------

    async def _apply(self, rollout_id: str, event: machine.Event | None) -> None:
        async with self._lock:
            live = self._live.get(rollout_id)
            if live is None:
                return
            now = self.clock()
            profile = self.profiles(live.state.profile)
            if event is None:
                event = machine.Tick(live.acc.observation(live.state))
            old = live.state
            new, actions = machine.step(old, event, now, profile)
            decisions = self._decisions(new, actions, now, live)
            if new.step_index > old.step_index:
                live.acc.start_step(new.step_index, now)
            if new == old and not decisions:
                return
            outcome = None
            if any(isinstance(a, machine.PromoteCandidate) for a in actions):
                outcome = "promoted"
            elif any(isinstance(a, machine.RollbackCandidate) for a in actions):
                outcome = "rolled_back"
            await self.store.transition(
                live.row, new.to_dict(), live.acc.step_starts, decisions, outcome
            )
            live.state = new
            self._after(live.row, old, new, decisions)
            for action in actions:
                if isinstance(action, machine.RaiseAlert) and self.alert is not None:
                    await self.alert(live.row.prompt, live.row.id, action.reason)
            if new.status in (Status.PROMOTED, Status.ROLLED_BACK):
                self._drop_live(rollout_id)

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
            if live is not None:
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
        self.metrics.weight.labels(prompt=row.prompt).set(
            new.weight if new.status in (Status.RUNNING, Status.PAUSED) else 0.0
        )
        self.metrics.step.labels(prompt=row.prompt).set(new.step_index)
        if old.weight != new.weight or old.status != new.status:
            self._dirty_routing.add(row.prompt)

    def _add_live(self, live: _Live) -> None:
        # Every decision series exists from the start at 0, so Prometheus' increase()
        # sees the first rollback as an increase rather than a new series.
        for kind in DECISION_KINDS:
            self.metrics.decisions.labels(prompt=live.row.prompt, kind=kind)
        self._live[live.row.id] = live
        self._by_prompt[live.row.prompt] = live.row.id
        self.metrics.live.set(len(self._live))
        self.metrics.weight.labels(prompt=live.row.prompt).set(live.state.weight)
        self.metrics.step.labels(prompt=live.row.prompt).set(live.state.step_index)

    def _drop_live(self, rollout_id: str) -> None:
        live = self._live.pop(rollout_id)
        self._by_prompt.pop(live.row.prompt, None)
        self.metrics.live.set(len(self._live))

    # -- routing -------------------------------------------------------------------

    async def routing(self, prompt: str) -> Routing:
        """Current routing of ``prompt`` (raises :class:`NotFound` for unknown prompts)."""
        info = await self.registry.get_prompt(prompt)
        active = await self.registry.active(prompt)
        rid = self._by_prompt.get(prompt)
        live = self._live.get(rid) if rid else None
        candidate_version = candidate_template = None
        weight, salt = 0.0, ""
        if live is not None and live.state.status in (Status.RUNNING, Status.PAUSED):
            cand = await self.registry.get_version(prompt, live.row.candidate)
            candidate_version, candidate_template = cand.version, cand.template
            weight, salt = live.state.weight, live.state.salt
        return Routing(
            prompt=prompt,
            active_version=info.active_version,
            active_template=active.template if active else None,
            candidate_version=candidate_version,
            candidate_template=candidate_template,
            weight=weight,
            salt=salt,
            rollout_id=live.row.id if live else None,
            ttl_seconds=self.routing_ttl_s,
            updated_at=self.clock(),
        )

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
        """Everything about one rollout: state, arms, last statistics and the decision log."""
        row = await self.store.get(rollout_id)
        if row is None:
            raise NotFound(f"rollout {rollout_id!r} does not exist")
        live = self._live.get(rollout_id)
        state = live.state.to_dict() if live else row.state
        body: dict[str, Any] = {
            "id": row.id,
            "prompt": row.prompt,
            "baseline_version": row.baseline,
            "candidate_version": row.candidate,
            "status": state["status"],
            "step": state["step_index"],
            "weight": state["weight"] if state["status"] in ("running", "paused") else 0.0,
            "salt": state["salt"],
            "profile": state["profile"],
            "primary_metric": state["primary_metric"],
            "state": state,
            "step_starts": live.acc.step_starts if live else row.step_starts,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "decisions": [d.model_dump() for d in await self.store.decisions(rollout_id)],
        }
        if live is not None:
            body["arms"] = live.acc.arm_summary()
            body["statistics"] = live.last_stats
            profile = self.profiles(live.state.profile)
            obs = live.acc.observation(live.state)
            higher = live.state.higher_is_better
            # The experiment view (a fixed split is a one-step rollout): always valid.
            body["winner"] = machine.winner(obs, profile, higher_is_better=higher)
            body["has_significant_result"] = body["winner"] is not None
        return body

    async def list(self) -> list[dict[str, Any]]:
        """Summaries of recent rollouts, newest first."""
        out = []
        for row in await self.store.all():
            live = self._live.get(row.id)
            state = live.state.to_dict() if live else row.state
            out.append(
                {
                    "id": row.id,
                    "prompt": row.prompt,
                    "baseline_version": row.baseline,
                    "candidate_version": row.candidate,
                    "status": state["status"],
                    "step": state["step_index"],
                    "weight": state["weight"] if state["status"] in ("running", "paused") else 0.0,
                    "created_at": row.created_at,
                    "updated_at": row.updated_at,
                }
            )
        return out

    def live_prompts(self) -> set[str]:
        """Prompts with a live rollout (the optimizer does not run on them)."""
        return set(self._by_prompt)


def _primary(name: str) -> PrimaryMetric:
    if name not in ("feedback_score", "success_rate", "quality"):
        raise RegistryError(
            f"unknown primary metric {name!r}; use feedback_score, success_rate or quality"
        )
    return name  # type: ignore[return-value]
