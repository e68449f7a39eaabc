"""The optimizer's asyncio shell: triggers in, runs out, the winner to the registry and a rollout.

:class:`OptimizationRunner` consumes :class:`OptimizationTrigger` objects (from the
monitor's queue, the schedule and the HTTP route), asks the pure policy
(:mod:`~promptd.optimization.policy`) whether to run, picks the run's strategy with the
bandit (:mod:`~promptd.optimization.selection`), persists the run's plan
(:mod:`~promptd.optimization.planning`) and starts its task
(:mod:`~promptd.optimization.task`), which executes the plan, hands the selected
candidate to the registry and a rollout that promotes it only on a significant online
win, and records the end. Runs a restart cut short are resumed from their plan and the
call cache once the daemon is ready. The bandit learns from every gate and every
optimizer rollout's end. Every step is logged with a stable event name, counted in
Prometheus and published on the optimization topic; a run that fails is recorded with
its error and never takes the daemon down.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import structlog

from promptd.monitoring.triggers import OptimizationTrigger
from promptd.optimization import policy
from promptd.optimization.config import OptimizationSettings
from promptd.optimization.examples import ExampleStore
from promptd.optimization.gate import seed_for
from promptd.optimization.llm import Budget, LiteLLMClient, LLMClient, close_litellm
from promptd.optimization.metrics import OptimizationMetrics
from promptd.optimization.outcomes import Outcome, RunStatus
from promptd.optimization.plan import BudgetRequest, BudgetTooLarge, RunBudget, RunPlan
from promptd.optimization.planning import Planner
from promptd.optimization.selection import Choice, choose, posterior
from promptd.optimization.services import Publish, Rollouts, RunServices
from promptd.optimization.store import OptimizationStore
from promptd.optimization.strategies import available, get_strategy
from promptd.optimization.targets import EpisodeSource
from promptd.optimization.task import RunTask
from promptd.optimization.tracking import NoTracker, Tracker
from promptd.replacement.pipelines import Pipeline, PipelineRegistry
from promptd.replacement.registry import Registry
from promptd.storage.database import Database

log = structlog.get_logger("promptd.optimizer")

# How often deployed runs' rollouts are checked for the bandit's online evidence.
ONLINE_CHECK_S = 15.0
# Paid answers are kept this long for reuse (the active version's, mostly).
CALL_CACHE_DAYS = 30.0
LIVE_ROLLOUT_STATES = frozenset({"pending", "running", "paused"})

__all__ = ["OptimizationRunner", "Publish", "Rollouts", "RunError"]


class RunError(Exception):
    """A manual trigger cannot start (unknown prompt, no active version, policy says no)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class OptimizationRunner:
    """Policy, strategy selection, runs and learning; one per daemon."""

    def __init__(
        self,
        db: Database,
        registry: Registry,
        rollouts: Rollouts,
        settings: OptimizationSettings,
        metrics: OptimizationMetrics,
        publish: Publish,
        primary_metric: str = "feedback_score",
        client_factory: Callable[[], LLMClient] | None = None,
        clock: Callable[[], float] = time.time,
        tracker: Tracker | None = None,
        pipelines: PipelineRegistry | None = None,
        episodes: EpisodeSource | None = None,
        ready: Callable[[], bool] | None = None,
        signals_of: Callable[[str], tuple[str, ...]] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.rollouts = rollouts
        self.store = OptimizationStore(db)
        self.services = RunServices(
            settings=settings,
            store=self.store,
            registry=registry,
            rollouts=rollouts,
            # The prompt's optimizer signals score its examples (people's by default).
            examples=ExampleStore(
                db, settings.example_max_age_days * 86_400, settings.max_examples, signals_of
            ),
            episodes=episodes,
            client_factory=client_factory
            or (lambda: LiteLLMClient(settings.max_retries, settings.retry_backoff_s)),
            clock=clock,
            publish=publish,
            metrics=metrics,
            tracker=tracker or NoTracker(),
            primary_metric=primary_metric,
        )
        self.planner = Planner(self.services, pipelines)
        # Whether the daemon is ready (/readyz): resumed runs wait for it.
        self.ready = ready or (lambda: True)
        self.state = policy.PolicyState({})
        self.limits = policy.PolicyLimits(
            automatic=settings.enable_automatic_optimization,
            min_interval_s=settings.min_interval_s,
            max_concurrent=settings.max_concurrent_optimizations,
        )
        # The latest trigger per prompt and what the policy made of it (recommendations).
        self.last_triggers: dict[str, tuple[OptimizationTrigger, policy.Decision]] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._to_resume: list[RunPlan] = []
        self._waiting_logged = False

    # -- lifecycle -----------------------------------------------------------------

    async def resume(self) -> None:
        """Load the policy's memory and the runs a stop cut short (started by :meth:`run`
        once the daemon is ready)."""
        rows = await self.store.policy_rows()
        self.state = policy.PolicyState({r[0]: policy.PromptRunState(r[1], r[2]) for r in rows})
        for row in await self.store.running():
            plan = await self.planner.from_row(row)
            if plan is None:
                await self.store.finish_run(
                    row["id"],
                    row["prompt"],
                    self.clock(),
                    status=str(RunStatus.INTERRUPTED),
                    outcome=str(Outcome.NONE),
                    error="the daemon stopped during the run, which cannot be resumed",
                )
                log.warning("optimization_run_not_resumable", run_id=row["id"])
                continue
            self._to_resume.append(plan)
            self.state = policy.started(self.state, plan.prompt, plan.started_at)

    async def run(self, stop: asyncio.Event, queue: Any) -> None:
        """Consume triggers, run the schedule and learn from rollouts until ``stop``;
        resume cut-short runs once the daemon is ready; then end the runs in progress
        (they resume next start)."""
        next_schedule = self.clock() + self.settings.schedule_check_interval_s
        next_online = 0.0
        try:
            while not stop.is_set():
                self._resume_when_ready()
                trigger = None
                # asyncio.timeout, not wait_for: see promptd._aio.wait_event.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5 if not self._to_resume else 0.1):
                        trigger = await queue.get()
                if trigger is not None:
                    await self.submit(trigger)
                now = self.clock()
                if now >= next_schedule:
                    next_schedule = now + self.settings.schedule_check_interval_s
                    await self._schedule()
                    await self._purge_cache()
                if now >= next_online:
                    next_online = now + ONLINE_CHECK_S
                    await self.learn_online()
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await close_litellm()

    def _resume_when_ready(self) -> None:
        """Start the runs a stop cut short, once the daemon is ready: before, they would
        pay for model calls a daemon that cannot ingest may be stopped again during."""
        if not self._to_resume:
            return
        if not self.ready():
            if not self._waiting_logged:
                self._waiting_logged = True
                log.info("optimization_resume_waiting", runs=len(self._to_resume))
            return
        for plan in self._to_resume:
            self.metrics.resumed.inc()
            log.info("optimization_resumed", run_id=plan.run_id, resumes=plan.resumes)
            self.metrics.running.inc()
            self._spawn(plan)
        self._to_resume = []

    async def wait_idle(self) -> None:
        """Wait until no run is in progress (tests and the one-shot mode)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _schedule(self) -> None:
        if not self.limits.automatic:
            return
        try:
            prompts = await self.services.registry.list_prompts()
        except Exception:
            log.exception("optimization_schedule_failed")
            return
        known = {p.name: p.created_at for p in prompts if p.active_version is not None}
        now = self.clock()
        for name in policy.scheduled(self.state, known, now, self.limits):
            await self.submit(
                OptimizationTrigger(name, "schedule", now, "optimization_interval_hours elapsed")
            )

    async def _purge_cache(self) -> None:
        try:
            keep = [r["id"] for r in await self.store.running()]
            deleted = await self.store.purge_calls(self.clock() - CALL_CACHE_DAYS * 86_400, keep)
        except Exception:
            log.exception("optimization_cache_purge_failed")
            return
        if deleted:
            log.info("optimization_cache_purged", deleted=deleted)

    # -- starting a run ------------------------------------------------------------

    async def submit(
        self, trigger: OptimizationTrigger, strategies: Sequence[str] | None = None
    ) -> tuple[policy.Decision, str | None]:
        """Decide on ``trigger``; start a run when the policy says so. Never raises."""
        try:
            return await self._submit(trigger, strategies, RunBudget.configured(self.settings))
        except Exception as exc:
            log.exception("optimization_submit_failed", prompt=trigger.prompt)
            return policy.Decision(False, "error", repr(exc)), None

    async def start_manual(
        self,
        prompt: str,
        strategies: Sequence[str] | None,
        reason: str,
        budget: BudgetRequest | None = None,
    ) -> tuple[policy.Decision, str]:
        """A manual run, with its own budget within the configured one; raises
        :class:`RunError` when it cannot start."""
        for name in strategies or ():
            try:
                get_strategy(name)
            except KeyError as exc:
                raise RunError(400, "unknown_strategy", str(exc.args[0])) from None
        try:
            run_budget = RunBudget.within(self.settings, budget)
        except BudgetTooLarge as exc:
            raise RunError(422, "budget_too_large", str(exc)) from None
        if strategies:
            why = {n: r for n, r in available(tuple(strategies), self.settings).items() if r}
            if len(why) == len(set(strategies)):
                detail = "; ".join(f"{n}: {r}" for n, r in why.items())
                raise RunError(422, "no_strategy_available", f"no strategy can run: {detail}")
        trigger = OptimizationTrigger(prompt, "manual", self.clock(), reason)
        decision, run_id = await self._submit(trigger, strategies, run_budget)
        if run_id is None:
            status = {"no_active_version": 404, "no_strategy_available": 422}.get(
                decision.reason, 409
            )
            raise RunError(status, decision.reason, decision.detail)
        return decision, run_id

    async def _submit(
        self,
        trigger: OptimizationTrigger,
        strategies: Sequence[str] | None,
        budget: RunBudget,
    ) -> tuple[policy.Decision, str | None]:
        pipeline = await self.planner.pipeline_of(trigger.prompt)
        if pipeline is not None:
            # A prompt of a pipeline is optimized with its pipeline.
            trigger = replace(trigger, prompt=pipeline.name)
        async with self._lock:
            now = self.clock()
            live = self.rollouts.live_prompts()
            if pipeline is not None and live & set(pipeline.prompts):
                live = live | {pipeline.name}
            decision = policy.decide(self.state, trigger, now, self.limits, live)
            run_id = f"opt-{uuid.uuid4().hex[:12]}"
            plan = None
            if decision.run:
                decision, plan = await self._plan(trigger, strategies, pipeline, budget, run_id)
            self.metrics.triggers.labels(trigger.kind, decision.reason).inc()
            self.last_triggers[trigger.prompt] = (trigger, decision)
            log.info(
                "optimization_trigger_decided",
                prompt=trigger.prompt,
                kind=trigger.kind,
                run=decision.run,
                reason=decision.reason,
                detail=decision.detail,
            )
            if plan is None:
                return decision, None
            base = {
                "id": run_id,
                "prompt": trigger.prompt,
                "trigger_kind": trigger.kind,
                "trigger_reason": trigger.reason,
                "status": str(RunStatus.RUNNING),
                "started_at": now,
                "phase": "examples",
            }
            await self.store.create_run({**base, **plan.row()}, now)
            self.state = policy.started(self.state, trigger.prompt, now)
            self.metrics.running.inc()
            self.metrics.selected.labels(plan.selection["strategy"], plan.selection["method"]).inc()
        self._spawn(plan)
        return decision, run_id

    async def _plan(
        self,
        trigger: OptimizationTrigger,
        strategies: Sequence[str] | None,
        pipeline: Pipeline | None,
        budget: RunBudget,
        run_id: str,
    ) -> tuple[policy.Decision, RunPlan | None]:
        """The plan of a run the policy accepted, or why it cannot start."""
        choice, why_not = await self._choose(trigger.prompt, run_id, strategies, pipeline)
        if choice is None:
            return policy.Decision(False, "no_strategy_available", why_not), None
        names = (choice.strategy,) if pipeline is not None or not strategies else tuple(strategies)
        made = await self.planner.new(
            run_id,
            trigger.prompt,
            pipeline,
            names,
            choice.to_dict(),
            budget,
            (trigger.kind, trigger.reason),
            self.clock(),
        )
        if isinstance(made, str):
            return policy.Decision(False, "no_active_version", made), None
        return policy.Decision(True, trigger.kind, trigger.reason), made

    async def _choose(
        self,
        prompt: str,
        run_id: str,
        strategies: Sequence[str] | None,
        pipeline: Pipeline | None = None,
    ) -> tuple[Choice | None, str]:
        names = tuple(strategies) if strategies else self.settings.strategies
        why = available(names, self.settings, pipeline=pipeline is not None)
        usable = [n for n in names if why[n] is None]
        if not usable:
            detail = "; ".join(f"{n}: {reason}" for n, reason in why.items())
            return None, f"no strategy can run: {detail}"
        if strategies:
            return Choice(usable[0], "manual", f"requested: {', '.join(strategies)}"), ""
        sel = self.settings.selection
        if not sel.enabled:
            return Choice(usable[0], "fixed", "selection disabled: first available"), ""
        outcomes = await self.store.outcomes()
        return (
            choose(
                usable,
                prompt,
                outcomes,
                random.Random(seed_for(run_id)),
                prior_alpha=sel.prior_alpha,
                prior_beta=sel.prior_beta,
                shared_weight=sel.shared_weight,
            ),
            "",
        )

    def _spawn(self, plan: RunPlan) -> None:
        job = RunTask(plan, self.services, self.run_ended).run()
        task = asyncio.create_task(job, name=f"promptd:optimize:{plan.run_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def run_ended(
        self, target: str, now: float, status: RunStatus, outcome: Outcome, budget: Budget
    ) -> None:
        """The policy and metrics after any run of ``target`` ended."""
        self.state = policy.finished(self.state, target, now)
        self.metrics.running.dec()
        self.metrics.runs.labels(str(status), str(outcome)).inc()
        self.metrics.llm_calls.inc(budget.calls)
        self.metrics.cost.inc(budget.cost_usd)

    # -- the bandit's evidence -----------------------------------------------------

    async def learn_online(self) -> None:
        """Record the online result of every ended optimizer rollout (once per run)."""
        try:
            rows = await self.store.awaiting_online()
        except Exception:
            log.exception("optimization_online_check_failed")
            return
        weight = self.settings.selection.online_weight
        for row in rows:
            try:
                rollout = await self.rollouts.describe(str(row["rollout_id"]))
            except Exception:
                log.warning("optimization_online_rollout_missing", run_id=row["id"])
                continue
            status = str(rollout.get("status"))
            if status in LIVE_ROLLOUT_STATES:
                continue
            won = status == "promoted"
            strategy = (row.get("selection") or {}).get("strategy") or row["strategies"][0]
            await self.store.record_outcome(
                row["id"],
                row["prompt"],
                strategy,
                "online",
                weight if won else 0.0,
                0.0 if won else weight,
                status,
            )
            self.metrics.online.labels(strategy, "win" if won else "no_win").inc()
            log.info(
                "optimization_online_result",
                run_id=row["id"],
                strategy=strategy,
                rollout_status=status,
                won=won,
            )

    # -- views ---------------------------------------------------------------------

    async def list_runs(self, prompt: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Runs, newest first."""
        return await self.store.list_runs(prompt, limit)

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        """One run, or ``None``."""
        return await self.store.get_run(run_id)

    async def strategy_view(self, prompt: str | None) -> dict[str, dict[str, Any]]:
        """Each configured strategy: can it run, and the bandit's posterior (for
        ``prompt``; without one, the evidence of all prompts at full weight)."""
        outcomes = await self.store.outcomes()
        sel = self.settings.selection
        why = available(self.settings.strategies, self.settings)
        out = {}
        for name in self.settings.strategies:
            post = posterior(
                name,
                prompt or "",
                outcomes if prompt else [replace(o, prompt="") for o in outcomes],
                sel.prior_alpha,
                sel.prior_beta,
                sel.shared_weight,
            )
            out[name] = {
                "available": why[name] is None,
                "unavailable_reason": why[name],
                "alpha": round(post.alpha, 3),
                "beta": round(post.beta, 3),
                "mean": round(post.mean, 4),
                "runs": post.runs_here + post.runs_elsewhere,
            }
        return out
