"""A run as the optimizer's task: execute its plan, hand off, record, learn.

One task for a prompt and a pipeline alike. It executes the plan
(:mod:`promptd.optimization.run`) under the run's time budget, hands the selected
candidate off (:mod:`promptd.optimization.handoff`), and records the end: the run row,
the bandit's gate evidence, metrics, the ``optimization_complete`` event and tracking.

A stop (daemon shutdown) cancels the task: the row keeps its last checkpoint and stays
``running``, and the next start resumes the plan. Every answer is in the call cache and
the hand-off is idempotent, so a resumed run ends as an uninterrupted one would have,
wherever the stop fell.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from promptd.optimization.handoff import HandOff, hand_off
from promptd.optimization.llm import Budget
from promptd.optimization.outcomes import HANDED_OFF, Outcome, RunStatus, gate_success
from promptd.optimization.plan import RunPlan
from promptd.optimization.program import program_of, seen_key
from promptd.optimization.run import RunExecution, RunProgress
from promptd.optimization.services import RunServices
from promptd.replacement.registry import RegistryError

log = structlog.get_logger("promptd.optimizer")

# (target, now, status, outcome, budget): what the runner learns when a run ends.
Ended = Callable[[str, float, RunStatus, Outcome, Budget], None]


class RunTask:
    """Executes, hands off and records one run (see the module docstring)."""

    def __init__(self, plan: RunPlan, services: RunServices, ended: Ended) -> None:
        self.plan = plan
        self.services = services
        self.ended = ended
        self.started = time.monotonic()

    async def run(self) -> None:
        """The task's body."""
        plan, services = self.plan, self.services
        execution = RunExecution(
            plan,
            services,
            checkpoint=self._checkpoint,
            notify=lambda event, fields: services.emit(event, plan, **fields),
            known=await self._known(),
        )
        if plan.resumes:
            await services.store.update_run(plan.run_id, resumes=plan.resumes)
        await services.emit(
            "optimization_resume" if plan.resumes else "optimization_start",
            plan,
            trigger=plan.trigger_kind,
            reason=plan.trigger_reason,
            strategies=list(plan.strategies),
            selection=plan.selection,
            versions=plan.versions,
            pipeline=plan.pipeline.to_dict() if plan.pipeline else None,
            budget=plan.budget.to_dict(),
        )
        status, error = RunStatus.COMPLETED, None
        handed = HandOff(Outcome.NONE)
        progress = execution.progress
        try:
            async with asyncio.timeout(max(plan.remaining_s, 1.0)):
                progress = await execution.execute()
            if progress.outcome in HANDED_OFF:
                progress.phase = "hand_off"
                await self._checkpoint(progress, execution.budget)
            handed = await hand_off(plan, progress, services)
        except TimeoutError:
            status, error = RunStatus.TIMED_OUT, f"timed out after {plan.budget.timeout_s:g}s"
        except asyncio.CancelledError:
            # Not finished: the row stays 'running' and the next start resumes it.
            with contextlib.suppress(Exception):
                await self._checkpoint(progress, execution.budget)
            services.metrics.running.dec()
            log.info("optimization_suspended", run_id=plan.run_id, phase=progress.phase)
            raise
        except Exception as exc:
            log.exception("optimization_failed", run_id=plan.run_id, prompt=plan.prompt)
            status, error = RunStatus.FAILED, f"{type(exc).__name__}: {exc}"
        await self._finish(execution, progress, status, error, handed)

    async def _known(self) -> dict[str, set[str]]:
        """Per step: programs registered before, by anyone but this run (a resumed run
        must find its own candidate again, not discard it as known)."""
        known: dict[str, set[str]] = {}
        for step in self.plan.steps:
            try:
                versions = await self.services.registry.versions(step.prompt)
            except RegistryError:
                versions = []
            known[step.prompt] = {
                seen_key(program_of(v)) for v in versions if v.run_id != self.plan.run_id
            }
        return known

    def _elapsed(self) -> float:
        return self.plan.elapsed_s + (time.monotonic() - self.started)

    async def _checkpoint(self, progress: RunProgress, budget: Budget) -> None:
        plan = self.plan
        await self.services.store.update_run(
            plan.run_id,
            phase=progress.phase,
            progress=progress.progress_json(plan),
            candidates=[c.summary(plan.active) for c in progress.candidates],
            discarded=dict(progress.discarded),
            llm_calls=budget.calls,
            cost_usd=budget.cost_usd,
            tokens=budget.tokens,
            elapsed_s=self._elapsed(),
        )

    async def _finish(
        self,
        execution: RunExecution,
        progress: RunProgress,
        status: RunStatus,
        error: str | None,
        handed: HandOff,
    ) -> None:
        plan, services = self.plan, self.services
        now = services.clock()
        outcome = handed.outcome if status == RunStatus.COMPLETED else Outcome.NONE
        budget = execution.budget
        notes = "; ".join([*progress.notes, *handed.notes]) or None
        gate = progress.gate.to_dict() if progress.gate else None
        if progress.unscored and outcome == Outcome.DEPLOYED:
            log.warning(
                "optimization_unscored_candidate_deployed",
                run_id=plan.run_id,
                rollout_id=handed.rollout_id,
                note=progress.notes[0],
            )
        try:
            await services.store.finish_run(
                plan.run_id,
                plan.prompt,
                now,
                status=str(status),
                outcome=str(outcome),
                phase="done",
                progress=progress.progress_json(plan),
                candidates=[c.summary(plan.active) for c in progress.candidates],
                discarded=dict(progress.discarded),
                gate=gate,
                llm_calls=budget.calls,
                cost_usd=budget.cost_usd,
                tokens=budget.tokens,
                elapsed_s=self._elapsed(),
                deployed_version=handed.deployed_version,
                rollout_id=handed.rollout_id,
                error=error if error is not None else notes,
            )
            await self._learn_gate(progress)
        except Exception:
            log.exception("optimization_record_failed", run_id=plan.run_id)
        self.ended(plan.prompt, now, status, outcome, budget)
        self._count(execution, progress)
        await services.emit(
            "optimization_complete",
            plan,
            status=str(status),
            outcome=str(outcome),
            cost_usd=round(budget.cost_usd, 6),
            llm_calls=budget.calls,
            cache_hits=execution.llm.hits if execution.llm else 0,
            candidates=len(progress.candidates),
            selected=progress.selected,
            gate=gate,
            equilibrium=progress.equilibrium,
            deployed_version=handed.deployed_version,
            deployed_versions=handed.registered,
            rollout_id=handed.rollout_id,
            error=error,
            notes=notes,
        )
        row = await services.store.get_run(plan.run_id)
        if row is not None:
            await services.tracker.run_finished(row)

    async def _learn_gate(self, progress: RunProgress) -> None:
        """The bandit's evidence from the gate (see :func:`gate_success`)."""
        success = gate_success(progress.outcome, progress.gate.passed if progress.gate else None)
        if success is None:
            return
        chosen = progress.chosen
        strategy = chosen.strategy if chosen else self.plan.strategies[0]
        await self.services.store.record_outcome(
            self.plan.run_id,
            self.plan.prompt,
            strategy,
            "gate",
            success,
            1.0 - success,
            str(progress.outcome),
        )

    def _count(self, execution: RunExecution, progress: RunProgress) -> None:
        metrics = self.services.metrics
        if execution.llm is not None:
            metrics.cache.labels("hit").inc(execution.llm.hits)
            metrics.cache.labels("miss").inc(execution.llm.misses)
        for cand in progress.candidates:
            metrics.candidates.labels(cand.strategy, "scored").inc()
        for key, count in progress.discarded.items():
            metrics.candidates.labels(key.split(":", 1)[0], "discarded").inc(count)
        if progress.gate is not None and progress.chosen is not None:
            metrics.gate.labels(progress.chosen.strategy, progress.gate.reason).inc()
