"""The optimizer's asyncio shell: triggers in, runs out, candidates to the registry and rollouts.

:class:`OptimizationRunner` consumes :class:`OptimizationTrigger` objects (from the
monitor's queue, the schedule and the HTTP route), asks the pure policy
(:mod:`optimize_policy`) whether to run, and runs each accepted trigger as its own task:
examples → strategies → gate → hand-off, under the run's timeout and budget. Every run is
a row of ``optimization_runs`` from start to end; a run that fails is recorded with its
error and never takes the daemon down. Each step is logged with a stable event name,
counted in Prometheus and published on the optimization topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter as TallyCounter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from promptd.daemon import optimize_policy as policy
from promptd.daemon.optimize_config import OptimizationSettings
from promptd.daemon.optimize_gate import Gate, seed_for
from promptd.daemon.optimize_llm import (
    Budget,
    BudgetExceeded,
    LiteLLMClient,
    LLMClient,
    close_litellm,
)
from promptd.daemon.optimize_strategies import (
    Candidate,
    StrategyContext,
    StrategyResult,
    get_strategy,
)
from promptd.monitoring.triggers import OptimizationTrigger
from promptd.replacement.registry import NewVersion, PromptVersion, Registry, RegistryError
from promptd.storage.database import Database
from promptd.storage.examples import ExampleStore, split_held_out

log = structlog.get_logger("promptd.optimizer")

Publish = Callable[[dict[str, Any]], Awaitable[None]]
# Examples rated at most this are "poorly rated": the proposer learns from them.
WORST_MAX_SCORE = 0.5
RUN_COLUMNS = (
    "id, prompt, trigger_kind, trigger_reason, strategies, status, outcome, parent_version, "
    "started_at, finished_at, cost_usd, llm_calls, candidates, discarded, deployed_version, "
    "rollout_id, error"
)


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
    ) -> Any:
        """Start a rollout; returns the stored rollout (with ``id``)."""
        ...


class OptimizationMetrics:
    """Prometheus metrics of the optimizer, on the daemon's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.triggers = Counter(
            "promptd_optimization_triggers_total",
            "Optimization triggers by kind and policy decision",
            ["kind", "decision"],
            registry=registry,
        )
        self.runs = Counter(
            "promptd_optimization_runs_total",
            "Finished optimization runs by status and outcome",
            ["status", "outcome"],
            registry=registry,
        )
        self.candidates = Counter(
            "promptd_optimization_candidates_total",
            "Candidates by strategy and result (generated, discarded, passed, rejected)",
            ["strategy", "result"],
            registry=registry,
        )
        self.llm_calls = Counter(
            "promptd_optimization_llm_calls_total", "LLM calls by the optimizer", registry=registry
        )
        self.cost = Counter(
            "promptd_optimization_cost_usd_total", "LLM spend by the optimizer", registry=registry
        )
        self.running = Gauge(
            "promptd_optimization_running", "Optimization runs in progress", registry=registry
        )


@dataclass
class CandidateRecord:
    """A candidate as recorded in the run row."""

    index: int
    strategy: str
    rationale: str
    template: str
    status: str = "generated"  # passed | rejected | not_evaluated
    confidence: float | None = None
    candidate_mean: float | None = None
    baseline_mean: float | None = None
    n_examples: int | None = None
    version: str | None = None


@dataclass
class RunState:
    """What one run accumulates while it works."""

    run_id: str
    prompt: str
    active: PromptVersion
    budget: Budget
    candidates: list[CandidateRecord] = field(default_factory=list)
    discarded: TallyCounter[str] = field(default_factory=TallyCounter)
    notes: list[str] = field(default_factory=list)


class RunError(Exception):
    """A manual trigger cannot start (unknown prompt, no active version, policy says no)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class OptimizationRunner:
    """Policy, runs and hand-off; one per daemon."""

    def __init__(
        self,
        db: Database,
        registry: Registry,
        rollouts: Rollouts,
        settings: OptimizationSettings,
        metrics: OptimizationMetrics,
        publish: Publish,
        primary_metric: str = "feedback_score",
        llm_factory: Callable[[Budget], LLMClient] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.registry = registry
        self.rollouts = rollouts
        self.settings = settings
        self.metrics = metrics
        self.publish = publish
        self.primary_metric = primary_metric
        self.llm_factory = llm_factory or (
            lambda budget: LiteLLMClient(budget, settings.max_retries, settings.retry_backoff_s)
        )
        self.clock = clock
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

    # -- lifecycle -----------------------------------------------------------------

    async def resume(self) -> None:
        """Mark runs cut short by a restart, and load the policy's memory."""
        now = self.clock()
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE optimization_runs SET status = 'interrupted', finished_at = ?, "
                "error = 'the daemon stopped during the run' WHERE status = 'running'",
                (now,),
            )
            if cur.rowcount:
                log.warning("optimization_runs_interrupted", count=cur.rowcount)
        async with self.db.reader.execute(
            "SELECT prompt, last_started_at, last_finished_at FROM optimization_policy"
        ) as cur:
            rows = await cur.fetchall()
        self.state = policy.PolicyState({r[0]: policy.PromptRunState(r[1], r[2]) for r in rows})

    async def run(self, stop: asyncio.Event, queue: Any) -> None:
        """Consume triggers and check the schedule until ``stop``; then end running runs."""
        next_schedule = self.clock() + self.settings.schedule_check_interval_s
        try:
            while not stop.is_set():
                trigger = None
                # asyncio.timeout, not wait_for: see promptd._aio.wait_event.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        trigger = await queue.get()
                if trigger is not None:
                    await self.submit(trigger)
                if self.clock() >= next_schedule:
                    next_schedule = self.clock() + self.settings.schedule_check_interval_s
                    await self._schedule()
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
            get_strategy(name)  # KeyError names the known ones
        trigger = OptimizationTrigger(prompt, "manual", self.clock(), reason)
        decision, run_id = await self._submit(trigger, strategies)
        if run_id is None:
            status = 404 if decision.reason in ("unknown_prompt", "no_active_version") else 409
            raise RunError(status, decision.reason, decision.detail)
        return decision, run_id

    async def _submit(
        self, trigger: OptimizationTrigger, strategies: Sequence[str] | None
    ) -> tuple[policy.Decision, str | None]:
        async with self._lock:
            now = self.clock()
            decision = policy.decide(
                self.state, trigger, now, self.limits, self.rollouts.live_prompts()
            )
            active = await self._active(trigger.prompt) if decision.run else None
            if decision.run and active is None:
                decision = policy.Decision(
                    False, "no_active_version", f"{trigger.prompt!r} has no active version"
                )
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
            if not decision.run or active is None:
                return decision, None
            names = tuple(strategies or self.settings.strategies)
            run_id = f"opt-{uuid.uuid4().hex[:12]}"
            await self._record_start(run_id, trigger, names, active, now)
            self.state = policy.started(self.state, trigger.prompt, now)
            self.metrics.running.inc()
        task = asyncio.create_task(self._execute(run_id, trigger, names, active))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return decision, run_id

    async def _active(self, prompt: str) -> PromptVersion | None:
        try:
            return await self.registry.active(prompt)
        except RegistryError:
            return None

    async def _record_start(
        self,
        run_id: str,
        trigger: OptimizationTrigger,
        names: Sequence[str],
        active: PromptVersion,
        now: float,
    ) -> None:
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO optimization_runs (id, prompt, trigger_kind, trigger_reason, "
                "strategies, status, parent_version, started_at) "
                "VALUES (?, ?, ?, ?, ?, 'running', ?, ?)",
                (
                    run_id,
                    trigger.prompt,
                    trigger.kind,
                    trigger.reason,
                    json.dumps(list(names)),
                    active.version,
                    now,
                ),
            )
            await conn.execute(
                "INSERT INTO optimization_policy (prompt, last_started_at, updated_at) "
                "VALUES (?, ?, ?) ON CONFLICT (prompt) DO UPDATE SET "
                "last_started_at = excluded.last_started_at, updated_at = excluded.updated_at",
                (trigger.prompt, now, now),
            )

    # -- one run -------------------------------------------------------------------

    async def _execute(
        self,
        run_id: str,
        trigger: OptimizationTrigger,
        names: Sequence[str],
        active: PromptVersion,
    ) -> None:
        budget = Budget(self.settings.max_llm_calls, self.settings.max_cost_usd)
        run = RunState(run_id, trigger.prompt, active, budget)
        status, outcome, error = "completed", "no_candidate", None
        deployed: tuple[str | None, str | None] = (None, None)
        await self._emit(
            "optimization_start",
            run,
            trigger=trigger.kind,
            reason=trigger.reason,
            strategies=list(names),
            parent_version=active.version,
        )
        try:
            llm = self.llm_factory(budget)
            async with asyncio.timeout(self.settings.timeout_s):
                held_out = await self._generate(run, names, llm)
                await self._evaluate(run, held_out, llm)
            outcome, deployed = await self._hand_off(run)
        except TimeoutError:
            status, error = "timed_out", f"timed out after {self.settings.timeout_s:g}s"
        except asyncio.CancelledError:
            status, error = "interrupted", "the daemon stopped during the run"
            await self._finish(run, status, "none", error, deployed)
            raise
        except Exception as exc:
            log.exception("optimization_failed", run_id=run_id, prompt=run.prompt)
            status, error = "failed", f"{type(exc).__name__}: {exc}"
        if status != "completed":
            outcome = "none"
        await self._finish(run, status, outcome, error, deployed)

    async def _generate(self, run: RunState, names: Sequence[str], llm: LLMClient) -> list[Any]:
        """Pool the strategies' candidates; returns the held-out examples for the gate."""
        now = self.clock()
        pool = await self.examples.recent(run.prompt, now)
        train, held_out = split_held_out(pool, run.run_id, self.settings.evaluation.held_out_size)
        held_ids = {e.request_id for e in held_out}
        best = [
            e
            for e in await self.examples.best_rated(
                run.prompt, now, self.settings.fewshot.min_score
            )
            if e.request_id not in held_ids
        ]
        worst = [
            e
            for e in await self.examples.worst_rated(run.prompt, now, WORST_MAX_SCORE)
            if e.request_id not in held_ids
        ]
        existing = {v.template.strip() for v in await self.registry.versions(run.prompt)}
        ctx = StrategyContext(
            prompt=run.prompt,
            run_id=run.run_id,
            template=run.active.template,
            existing_templates=existing,
            best=best,
            worst=worst,
            settings=self.settings,
            llm=llm,
        )
        log.info(
            "optimization_examples",
            run_id=run.run_id,
            examples=len(pool),
            train=len(train),
            held_out=len(held_out),
        )
        for name in names:
            result = await get_strategy(name).propose(ctx)
            await self._collect(run, name, result, ctx)
            if result.stopped:
                break
        return held_out

    async def _collect(
        self, run: RunState, name: str, result: StrategyResult, ctx: StrategyContext
    ) -> None:
        for reason, count in result.discarded.items():
            run.discarded[f"{name}:{reason}"] += count
            self.metrics.candidates.labels(name, "discarded").inc(count)
        for note in (result.note, result.stopped):
            if note:
                run.notes.append(f"{name}: {note}")
                log.info("optimization_strategy_note", run_id=run.run_id, strategy=name, note=note)
        for cand in result.candidates:
            ctx.existing_templates.add(cand.template)
            record = self._record(run, cand)
            self.metrics.candidates.labels(name, "generated").inc()
            await self._emit(
                "candidate_generated",
                run,
                candidate=record.index,
                strategy=name,
                rationale=cand.rationale,
                template=cand.template,
            )

    @staticmethod
    def _record(run: RunState, cand: Candidate) -> CandidateRecord:
        record = CandidateRecord(len(run.candidates), cand.strategy, cand.rationale, cand.template)
        run.candidates.append(record)
        return record

    async def _evaluate(self, run: RunState, held_out: list[Any], llm: LLMClient) -> None:
        """Run the gate (or apply ``without_evaluation``) on every candidate."""
        if not run.candidates:
            return
        evaluation = self.settings.evaluation
        if evaluation.model is None:
            verdict = "passed" if self.settings.without_evaluation != "reject" else "rejected"
            for record in run.candidates:
                await self._verdict(run, record, verdict)
            return
        gate = Gate(evaluation, llm, seed_for(run.run_id))
        usable = gate.usable(held_out, [run.active.template] + [c.template for c in run.candidates])
        if len(usable) < 2:
            run.notes.append(f"gate: {len(usable)} usable held-out examples; need 2")
            for record in run.candidates:
                await self._verdict(run, record, "not_evaluated")
            return
        try:
            baseline = await gate.scores(run.active.template, usable)
        except BudgetExceeded as exc:
            run.notes.append(f"gate: {exc}")
            baseline = None
        for record in run.candidates:
            if baseline is None:
                await self._verdict(run, record, "not_evaluated")
                continue
            try:
                scores = await gate.scores(record.template, usable)
            except BudgetExceeded as exc:
                run.notes.append(f"gate: {exc}")
                baseline = None
                await self._verdict(run, record, "not_evaluated")
                continue
            result = gate.compare(scores, baseline)
            record.confidence = result.confidence
            record.candidate_mean = result.candidate_mean
            record.baseline_mean = result.baseline_mean
            record.n_examples = result.n_examples
            passed = result.confidence >= self.settings.min_confidence_for_deployment
            await self._verdict(run, record, "passed" if passed else "rejected")

    async def _verdict(self, run: RunState, record: CandidateRecord, status: str) -> None:
        record.status = status
        self.metrics.candidates.labels(record.strategy, status).inc()
        await self._emit(
            "candidate_evaluated",
            run,
            candidate=record.index,
            strategy=record.strategy,
            result=status,
            confidence=record.confidence,
            candidate_mean=record.candidate_mean,
            baseline_mean=record.baseline_mean,
            n_examples=record.n_examples,
        )

    async def _hand_off(self, run: RunState) -> tuple[str, tuple[str | None, str | None]]:
        """Register the best passing candidate; start its rollout with ``auto_deploy``."""
        passed = sorted(
            (c for c in run.candidates if c.status == "passed"),
            key=lambda c: (-(c.confidence or 0.0), -(c.candidate_mean or 0.0), c.index),
        )
        for record in passed:
            try:
                version = await self.registry.register(
                    run.prompt,
                    NewVersion(
                        template=record.template,
                        parent_version=run.active.version,
                        origin=f"optimizer:{record.strategy}",
                        run_id=run.run_id,
                        rationale=record.rationale[:10_000],
                    ),
                )
            except RegistryError as exc:
                run.notes.append(f"register candidate {record.index}: {exc}")
                continue
            record.version = version.version
            if not self.settings.auto_deploy:
                return "candidate_waiting", (version.version, None)
            return await self._deploy(run, version.version)
        return "no_candidate", (None, None)

    async def _deploy(
        self, run: RunState, version: str
    ) -> tuple[str, tuple[str | None, str | None]]:
        # Without offline evaluation the online A/B test is the only validation, so it
        # runs with the cautious profile.
        profile = (
            self.settings.conservative_profile if self.settings.evaluation.model is None else None
        )
        try:
            rollout = await self.rollouts.start_rollout(
                run.prompt, version, profile=profile, primary_metric=self.primary_metric
            )
        except RegistryError as exc:
            run.notes.append(f"rollout not started: {exc}")
            return "candidate_waiting", (version, None)
        log.info(
            "optimization_rollout_started",
            run_id=run.run_id,
            prompt=run.prompt,
            version=version,
            rollout_id=rollout.id,
        )
        return "deployed", (version, str(rollout.id))

    async def _finish(
        self,
        run: RunState,
        status: str,
        outcome: str,
        error: str | None,
        deployed: tuple[str | None, str | None],
    ) -> None:
        now = self.clock()
        notes = "; ".join(run.notes) or None
        try:
            async with self.db.transaction() as conn:
                await conn.execute(
                    "UPDATE optimization_runs SET status = ?, outcome = ?, finished_at = ?, "
                    "cost_usd = ?, llm_calls = ?, candidates = ?, discarded = ?, "
                    "deployed_version = ?, rollout_id = ?, error = ? WHERE id = ?",
                    (
                        status,
                        outcome,
                        now,
                        run.budget.cost_usd,
                        run.budget.calls,
                        json.dumps([asdict(c) for c in run.candidates]),
                        json.dumps(dict(run.discarded)),
                        deployed[0],
                        deployed[1],
                        error if error is not None else notes,
                        run.run_id,
                    ),
                )
                await conn.execute(
                    "UPDATE optimization_policy SET last_finished_at = ?, updated_at = ? "
                    "WHERE prompt = ?",
                    (now, now, run.prompt),
                )
        except Exception:
            log.exception("optimization_record_failed", run_id=run.run_id)
        self.state = policy.finished(self.state, run.prompt, now)
        self.metrics.running.dec()
        self.metrics.runs.labels(status, outcome).inc()
        self.metrics.llm_calls.inc(run.budget.calls)
        self.metrics.cost.inc(run.budget.cost_usd)
        summary = {
            "status": status,
            "outcome": outcome,
            "cost_usd": round(run.budget.cost_usd, 6),
            "llm_calls": run.budget.calls,
            "candidates": len(run.candidates),
            "discarded": sum(run.discarded.values()),
            "deployed_version": deployed[0],
            "rollout_id": deployed[1],
            "error": error,
            "notes": notes,
        }
        await self._emit("optimization_complete", run, **summary)

    async def _emit(self, event: str, run: RunState, **fields: Any) -> None:
        """One optimization event: to the log (without template text) and to the topic."""
        log.info(
            event,
            run_id=run.run_id,
            prompt=run.prompt,
            **{k: v for k, v in fields.items() if k != "template"},
        )
        body = {"event": event, "run_id": run.run_id, "prompt": run.prompt, "ts": self.clock()}
        try:
            await self.publish({**body, **fields})
        except Exception as exc:
            # The topic is a notification channel; a run never fails because Kafka is down.
            log.warning("optimization_publish_failed", event_name=event, error=repr(exc))

    # -- views ---------------------------------------------------------------------

    async def list_runs(self, prompt: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Runs, newest first."""
        where, params = ("WHERE prompt = ?", [prompt]) if prompt else ("", [])
        sql = (
            f"SELECT {RUN_COLUMNS} FROM optimization_runs {where} ORDER BY started_at DESC LIMIT ?"
        )
        async with self.db.reader.execute(sql, (*params, limit)) as cur:
            rows = await cur.fetchall()
        return [_run_row(r) for r in rows]

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        """One run, or ``None``."""
        async with self.db.reader.execute(
            f"SELECT {RUN_COLUMNS} FROM optimization_runs WHERE id = ?", (run_id,)
        ) as cur:
            row = await cur.fetchone()
        return _run_row(row) if row else None


def _run_row(row: Sequence[Any]) -> dict[str, Any]:
    out = dict(zip([c.strip() for c in RUN_COLUMNS.split(",")], row, strict=True))
    for key in ("strategies", "candidates", "discarded"):
        out[key] = json.loads(out[key])
    return out
