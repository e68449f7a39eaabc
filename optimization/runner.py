"""The optimizer's asyncio shell: triggers in, runs out, the winner to the registry and a rollout.

:class:`OptimizationRunner` consumes :class:`OptimizationTrigger` objects (from the
monitor's queue, the schedule and the HTTP route), asks the pure policy
(:mod:`~promptd.optimization.policy`) whether to run, picks the run's strategy with the
bandit (:mod:`~promptd.optimization.selection`), persists the run's plan and executes it
(:mod:`~promptd.optimization.run`) as its own task under the run's timeout. A run that
passes the gate registers its candidate and starts a rollout that promotes it only on a
significant online win. Runs a restart cut short are resumed from their plan and the
call cache. The bandit learns from every gate and every optimizer rollout's end. Every
step is logged with a stable event name, counted in Prometheus and published on the
optimization topic; a run that fails is recorded with its error and never takes the
daemon down.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import structlog

from promptd.monitoring.triggers import OptimizationTrigger
from promptd.optimization import policy
from promptd.optimization.config import OptimizationSettings
from promptd.optimization.examples import ExampleStore
from promptd.optimization.gate import seed_for
from promptd.optimization.llm import Budget, LiteLLMClient, LLMClient, close_litellm
from promptd.optimization.metrics import OptimizationMetrics
from promptd.optimization.pipeline_run import EpisodeSource, PipelinePlan
from promptd.optimization.pipeline_runs import PIPELINE_STRATEGIES, PipelineRuns
from promptd.optimization.program import program_of
from promptd.optimization.prompt_runs import PromptRuns, plan_row
from promptd.optimization.run import RunPlan
from promptd.optimization.selection import Choice, choose, posterior
from promptd.optimization.store import OptimizationStore
from promptd.optimization.strategies import available, get_strategy
from promptd.optimization.tracking import NoTracker, Tracker
from promptd.replacement.pipelines import Pipeline, PipelineRegistry
from promptd.replacement.registry import PromptVersion, Registry, RegistryError
from promptd.storage.database import Database

log = structlog.get_logger("promptd.optimizer")

Publish = Callable[[dict[str, Any]], Awaitable[None]]
# How often deployed runs' rollouts are checked for the bandit's online evidence.
ONLINE_CHECK_S = 15.0
# Paid answers are kept this long for reuse (the active version's, mostly).
CALL_CACHE_DAYS = 30.0
LIVE_ROLLOUT_STATES = frozenset({"pending", "running", "paused"})


class Rollouts(Protocol):
    """The part of the rollout controller the optimizer uses."""

    def live_prompts(self) -> set[str]:
        """Prompts with a live rollout."""
        ...

    async def start_rollout(
        self,
        prompt: str,
        candidate: str,
        profile: str | None = None,
        primary_metric: str = "feedback_score",
        require_win: bool = False,
    ) -> Any:
        """Start a rollout; returns the stored rollout (with ``id``)."""
        ...

    async def describe(self, rollout_id: str) -> dict[str, Any]:
        """A rollout as the API shows it (with ``status``)."""
        ...


class RunError(Exception):
    """A manual trigger cannot start (unknown prompt, no active version, policy says no)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class OptimizationRunner:
    """Policy, strategy selection, runs, hand-off and learning; one per daemon."""

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
    ) -> None:
        self.db = db
        self.registry = registry
        self.rollouts = rollouts
        self.settings = settings
        self.metrics = metrics
        self.publish = publish
        self.primary_metric = primary_metric
        self.client_factory = client_factory or (
            lambda: LiteLLMClient(settings.max_retries, settings.retry_backoff_s)
        )
        self.clock = clock
        self.tracker = tracker or NoTracker()
        self.store = OptimizationStore(db)
        self.examples = ExampleStore(
            db, settings.example_max_age_days * 86_400, settings.max_examples
        )
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
        self._to_resume: list[RunPlan | PipelinePlan] = []
        self.prompt_runs = PromptRuns(self)
        self.pipeline_runs = (
            PipelineRuns(self, pipelines, episodes)
            if pipelines is not None and episodes is not None
            else None
        )

    # -- lifecycle -----------------------------------------------------------------

    async def resume(self) -> None:
        """Load the policy's memory and the runs a stop cut short (started by :meth:`run`)."""
        rows = await self.store.policy_rows()
        self.state = policy.PolicyState({r[0]: policy.PromptRunState(r[1], r[2]) for r in rows})
        for row in await self.store.running():
            plan: RunPlan | PipelinePlan | None
            if (row.get("target") or {}).get("kind") == "pipeline" and self.pipeline_runs:
                plan = await self.pipeline_runs.plan_from_row(row)
            else:
                plan = await self.prompt_runs.plan_from_row(row)
            if plan is None:
                await self.store.finish_run(
                    row["id"],
                    row["prompt"],
                    self.clock(),
                    status="interrupted",
                    outcome="none",
                    error="the daemon stopped during the run, which cannot be resumed",
                )
                log.warning("optimization_run_not_resumable", run_id=row["id"])
                continue
            self._to_resume.append(plan)
            self.state = policy.started(self.state, plan.prompt, plan.started_at)

    async def run(self, stop: asyncio.Event, queue: Any) -> None:
        """Resume cut-short runs, then consume triggers, run the schedule and learn from
        rollouts until ``stop``; then end the runs in progress (they resume next start)."""
        for plan in self._to_resume:
            self.metrics.resumed.inc()
            log.info("optimization_resumed", run_id=plan.run_id, resumes=plan.resumes)
            await self.store.update_run(plan.run_id, resumes=plan.resumes)
            self.metrics.running.inc()
            self._spawn(plan)
        self._to_resume = []
        next_schedule = self.clock() + self.settings.schedule_check_interval_s
        next_online = 0.0
        try:
            while not stop.is_set():
                trigger = None
                # asyncio.timeout, not wait_for: see promptd._aio.wait_event.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
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

    async def wait_idle(self) -> None:
        """Wait until no run is in progress (tests and the one-shot mode)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _schedule(self) -> None:
        if not self.limits.automatic:
            return
        try:
            prompts = await self.registry.list_prompts()
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
            return await self._submit(trigger, strategies)
        except Exception as exc:
            log.exception("optimization_submit_failed", prompt=trigger.prompt)
            return policy.Decision(False, "error", repr(exc)), None

    async def start_manual(
        self, prompt: str, strategies: Sequence[str] | None, reason: str
    ) -> tuple[policy.Decision, str]:
        """A manual run; raises :class:`RunError` when it cannot start."""
        for name in strategies or ():
            try:
                get_strategy(name)
            except KeyError as exc:
                raise RunError(400, "unknown_strategy", str(exc.args[0])) from None
        if strategies:
            why = {n: r for n, r in available(tuple(strategies), self.settings).items() if r}
            if len(why) == len(set(strategies)):
                detail = "; ".join(f"{n}: {r}" for n, r in why.items())
                raise RunError(422, "no_strategy_available", f"no strategy can run: {detail}")
        trigger = OptimizationTrigger(prompt, "manual", self.clock(), reason)
        decision, run_id = await self._submit(trigger, strategies)
        if run_id is None:
            status = {"no_active_version": 404, "no_strategy_available": 422}.get(
                decision.reason, 409
            )
            raise RunError(status, decision.reason, decision.detail)
        return decision, run_id

    async def _submit(
        self, trigger: OptimizationTrigger, strategies: Sequence[str] | None
    ) -> tuple[policy.Decision, str | None]:
        pipeline = None
        if self.pipeline_runs is not None:
            pipeline = await self.pipeline_runs.pipeline_of(trigger.prompt)
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
            prepared = None
            if decision.run:
                decision, prepared = await self._prepare(trigger, strategies, pipeline, run_id, now)
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
            if prepared is None:
                return decision, None
            plan, row, choice = prepared
            base = {
                "id": run_id,
                "prompt": trigger.prompt,
                "trigger_kind": trigger.kind,
                "trigger_reason": trigger.reason,
                "status": "running",
                "started_at": now,
                "phase": "examples",
            }
            await self.store.create_run({**base, **row}, now)
            self.state = policy.started(self.state, trigger.prompt, now)
            self.metrics.running.inc()
            self.metrics.selected.labels(choice.strategy, choice.method).inc()
        self._spawn(plan)
        return decision, run_id

    async def _prepare(
        self,
        trigger: OptimizationTrigger,
        strategies: Sequence[str] | None,
        pipeline: Pipeline | None,
        run_id: str,
        now: float,
    ) -> tuple[policy.Decision, Prepared | None]:
        """The plan, the row and the strategy choice of a run the policy accepted."""
        accepted = policy.Decision(True, trigger.kind, trigger.reason)
        choice, why_not = await self._choose(trigger.prompt, run_id, strategies, pipeline)
        if choice is None:
            return policy.Decision(False, "no_strategy_available", why_not), None
        if pipeline is not None:
            assert self.pipeline_runs is not None
            made = await self.pipeline_runs.plan(
                pipeline, run_id, choice.strategy, choice.to_dict(), now
            )
            if isinstance(made, str):
                return policy.Decision(False, "no_active_version", made), None
            return accepted, (made[0], made[1], choice)
        active = await self._active(trigger.prompt)
        if active is None:
            reason = f"{trigger.prompt!r} has no active version"
            return policy.Decision(False, "no_active_version", reason), None
        plan = RunPlan(
            run_id=run_id,
            prompt=trigger.prompt,
            trigger_kind=trigger.kind,
            trigger_reason=trigger.reason,
            strategies=tuple(strategies) if strategies else (choice.strategy,),
            selection=choice.to_dict(),
            seed=seed_for(run_id),
            snapshot=await self.examples.snapshot(now),
            parent_version=active.version,
            baseline=program_of(active),
            started_at=now,
        )
        return accepted, (plan, plan_row(plan), choice)

    async def _choose(
        self,
        prompt: str,
        run_id: str,
        strategies: Sequence[str] | None,
        pipeline: Pipeline | None = None,
    ) -> tuple[Choice | None, str]:
        names = tuple(strategies) if strategies else self.settings.strategies
        why = available(names, self.settings)
        if pipeline is not None:
            for name in names:
                if name not in PIPELINE_STRATEGIES and why[name] is None:
                    why[name] = "not for pipelines (its search reads one prompt's examples)"
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

    async def _active(self, prompt: str) -> PromptVersion | None:
        try:
            return await self.registry.active(prompt)
        except RegistryError:
            return None

    def _spawn(self, plan: RunPlan | PipelinePlan) -> None:
        if isinstance(plan, PipelinePlan):
            assert self.pipeline_runs is not None
            job = self.pipeline_runs.run(plan)
        else:
            job = self.prompt_runs.run(plan)
        task = asyncio.create_task(job, name=f"promptd:optimize:{plan.run_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one run -------------------------------------------------------------------

    def run_ended(self, target: str, now: float, status: str, outcome: str, budget: Budget) -> None:
        """The policy and metrics after any run of ``target`` ended."""
        self.state = policy.finished(self.state, target, now)
        self.metrics.running.dec()
        self.metrics.runs.labels(status, outcome).inc()
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

    # -- events and views ----------------------------------------------------------

    async def emit(self, event: str, plan: RunPlan | PipelinePlan, **fields: Any) -> None:
        """One optimization event: to the log (without template text) and to the topic."""
        log.info(
            event,
            run_id=plan.run_id,
            prompt=plan.prompt,
            **{k: v for k, v in fields.items() if k not in ("template", "details")},
        )
        body = {"event": event, "run_id": plan.run_id, "prompt": plan.prompt, "ts": self.clock()}
        try:
            await self.publish({**body, **fields})
        except Exception as exc:
            # The topic is a notification channel; a run never fails because Kafka is down.
            log.warning("optimization_publish_failed", event_name=event, error=repr(exc))

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


Prepared = tuple["RunPlan | PipelinePlan", dict[str, Any], Choice]
