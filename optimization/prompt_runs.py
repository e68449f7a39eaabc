"""A prompt's runs inside the optimizer's shell: execute, hand off, record, resume.

:class:`PromptRuns` holds what a run of one prompt does once the
:class:`~promptd.optimization.runner.OptimizationRunner` (policy, triggers, tasks, events)
has started it: the execution with its checkpoints (:mod:`promptd.optimization.run`),
the hand-off of a gated candidate to the registry and a rollout that must win online,
the run's record and the bandit's evidence from its gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import structlog

from promptd.optimization.examples import Snapshot
from promptd.optimization.program import program_of, seen_key
from promptd.optimization.run import RunExecution, RunPlan, RunProgress
from promptd.replacement.registry import NewVersion, RegistryError

if TYPE_CHECKING:
    from promptd.optimization.llm import Budget
    from promptd.optimization.runner import OptimizationRunner

log = structlog.get_logger("promptd.optimizer")


class PromptRuns:
    """What a prompt's run does (see the module docstring)."""

    def __init__(self, runner: OptimizationRunner) -> None:
        self.runner = runner

    async def plan_from_row(self, row: dict[str, Any]) -> RunPlan | None:
        """The plan of a run a restart cut short (``None`` when it cannot resume)."""
        if row.get("seed") is None or row.get("snapshot") is None or not row.get("selection"):
            return None  # a run from before resumable runs existed
        try:
            parent = await self.runner.registry.get_version(row["prompt"], row["parent_version"])
        except RegistryError:
            return None
        return RunPlan(
            run_id=row["id"],
            prompt=row["prompt"],
            trigger_kind=row["trigger_kind"],
            trigger_reason=row["trigger_reason"],
            strategies=tuple(row["strategies"]),
            selection=row["selection"],
            seed=int(row["seed"]),
            snapshot=Snapshot.from_dict(row["snapshot"]),
            parent_version=parent.version,
            baseline=program_of(parent),
            started_at=float(row["started_at"]),
            elapsed_s=float(row.get("elapsed_s") or 0.0),
            resumes=int(row.get("resumes") or 0) + 1,
        )

    async def run(self, plan: RunPlan) -> None:
        """Execute, hand off and record one run (the runner's task)."""
        started = time.monotonic()
        try:
            known = {
                seen_key(program_of(v)) for v in await self.runner.registry.versions(plan.prompt)
            }
        except RegistryError:
            known = set()
        execution = RunExecution(
            plan,
            self.runner.settings,
            self.runner.store,
            self.runner.examples,
            self.runner.client_factory(),
            checkpoint=lambda progress, budget: self._checkpoint(plan, progress, budget, started),
            notify=lambda event, fields: self.runner.emit(event, plan, **fields),
            known=known,
        )
        await self.runner.emit(
            "optimization_start" if not plan.resumes else "optimization_resume",
            plan,
            trigger=plan.trigger_kind,
            reason=plan.trigger_reason,
            strategies=list(plan.strategies),
            selection=plan.selection,
            parent_version=plan.parent_version,
        )
        status, error = "completed", None
        deployed: tuple[str | None, str | None] = (None, None)
        progress = execution.progress
        try:
            remaining = max(self.runner.settings.timeout_s - plan.elapsed_s, 1.0)
            async with asyncio.timeout(remaining):
                progress = await execution.execute()
            deployed = await self._hand_off(plan, progress)
        except TimeoutError:
            status, error = "timed_out", f"timed out after {self.runner.settings.timeout_s:g}s"
        except asyncio.CancelledError:
            # Not finished: the row stays 'running' and the next start resumes it.
            with contextlib.suppress(Exception):
                await self._checkpoint(plan, progress, execution.budget, started)
            self.runner.metrics.running.dec()
            log.info("optimization_suspended", run_id=plan.run_id, phase=progress.phase)
            raise
        except Exception as exc:
            log.exception("optimization_failed", run_id=plan.run_id, prompt=plan.prompt)
            status, error = "failed", f"{type(exc).__name__}: {exc}"
        await self._finish(plan, progress, execution, status, error, deployed, started)

    async def _checkpoint(
        self, plan: RunPlan, progress: RunProgress, budget: Budget, started: float
    ) -> None:
        await self.runner.store.update_run(
            plan.run_id,
            phase=progress.phase,
            progress=progress.progress_json(plan.baseline),
            candidates=[c.summary() for c in progress.candidates],
            discarded=dict(progress.discarded),
            llm_calls=budget.calls,
            cost_usd=budget.cost_usd,
            tokens=budget.tokens,
            elapsed_s=plan.elapsed_s + (time.monotonic() - started),
        )

    async def _hand_off(
        self, plan: RunPlan, progress: RunProgress
    ) -> tuple[str | None, str | None]:
        """Register the gated (or, without evaluation, proposed) candidate; deploy it."""
        chosen = progress.chosen
        if chosen is None or progress.outcome not in ("gate_passed", "proposed"):
            return None, None
        if progress.outcome == "proposed" and self.runner.settings.without_evaluation == "reject":
            progress.outcome = "rejected_without_evaluation"
            return None, None
        rationale = chosen.rationale
        if progress.gate is not None:
            g = progress.gate
            rationale += (
                f" | gate: gain {g.gain:+.4f} (95% CI {g.ci_low:+.4f}..{g.ci_high:+.4f}), "
                f"confidence {g.confidence:.3f} on {g.n} test examples"
            )
        try:
            program = chosen.program
            body: dict[str, Any] = (
                {"config": program.to_config()} if program.chat else {"template": program.template}
            )
            version = await self.runner.registry.register(
                plan.prompt,
                NewVersion(
                    **body,
                    parent_version=plan.parent_version,
                    origin=f"optimizer:{chosen.strategy}",
                    run_id=plan.run_id,
                    rationale=rationale[:10_000],
                ),
            )
        except RegistryError as exc:
            progress.notes.append(f"register candidate {chosen.index}: {exc}")
            progress.outcome = "register_failed"
            return None, None
        if not self.runner.settings.auto_deploy:
            progress.outcome = "candidate_waiting"
            return version.version, None
        # Without offline evaluation the online A/B test is the only validation, so it
        # runs with the cautious profile; either way it promotes only on a real win.
        profile = self.runner.settings.conservative_profile if progress.gate is None else None
        try:
            rollout = await self.runner.rollouts.start_rollout(
                plan.prompt,
                version.version,
                profile=profile,
                primary_metric=self.runner.primary_metric,
                require_win=True,
            )
        except RegistryError as exc:
            progress.notes.append(f"rollout not started: {exc}")
            progress.outcome = "candidate_waiting"
            return version.version, None
        log.info(
            "optimization_rollout_started",
            run_id=plan.run_id,
            prompt=plan.prompt,
            version=version.version,
            rollout_id=rollout.id,
        )
        progress.outcome = "deployed"
        return version.version, str(rollout.id)

    async def _finish(
        self,
        plan: RunPlan,
        progress: RunProgress,
        execution: RunExecution,
        status: str,
        error: str | None,
        deployed: tuple[str | None, str | None],
        started: float,
    ) -> None:
        now = self.runner.clock()
        outcome = progress.outcome if status == "completed" else "none"
        budget = execution.budget
        notes = "; ".join(progress.notes) or None
        try:
            await self.runner.store.finish_run(
                plan.run_id,
                plan.prompt,
                now,
                status=status,
                outcome=outcome,
                phase="done",
                progress=progress.progress_json(plan.baseline),
                candidates=[c.summary() for c in progress.candidates],
                discarded=dict(progress.discarded),
                gate=progress.gate.to_dict() if progress.gate else None,
                llm_calls=budget.calls,
                cost_usd=budget.cost_usd,
                tokens=budget.tokens,
                elapsed_s=plan.elapsed_s + (time.monotonic() - started),
                deployed_version=deployed[0],
                rollout_id=deployed[1],
                error=error if error is not None else notes,
            )
            await self._learn_gate(plan, progress)
        except Exception:
            log.exception("optimization_record_failed", run_id=plan.run_id)
        self.runner.run_ended(plan.prompt, now, status, outcome, budget)
        if execution.llm is not None:
            self.runner.metrics.cache.labels("hit").inc(execution.llm.hits)
            self.runner.metrics.cache.labels("miss").inc(execution.llm.misses)
        for cand in progress.candidates:
            self.runner.metrics.candidates.labels(cand.strategy, "scored").inc()
        for key, count in progress.discarded.items():
            self.runner.metrics.candidates.labels(key.split(":", 1)[0], "discarded").inc(count)
        if progress.gate is not None and progress.chosen is not None:
            self.runner.metrics.gate.labels(progress.chosen.strategy, progress.gate.reason).inc()
        await self.runner.emit(
            "optimization_complete",
            plan,
            status=status,
            outcome=outcome,
            cost_usd=round(budget.cost_usd, 6),
            llm_calls=budget.calls,
            cache_hits=execution.llm.hits if execution.llm else 0,
            candidates=len(progress.candidates),
            selected=progress.selected,
            gate=progress.gate.to_dict() if progress.gate else None,
            deployed_version=deployed[0],
            rollout_id=deployed[1],
            error=error,
            notes=notes,
        )
        row = await self.runner.store.get_run(plan.run_id)
        if row is not None:
            await self.runner.tracker.run_finished(row)

    async def _learn_gate(self, plan: RunPlan, progress: RunProgress) -> None:
        """A gate pass is a success of the run's strategy, a failure a failure; so is not
        beating the active version on validation (the search found nothing better)."""
        strategy = progress.chosen.strategy if progress.chosen else plan.strategies[0]
        if progress.outcome in ("gate_failed", "no_improvement_on_validation"):
            success = 0.0
        elif progress.gate is not None and progress.gate.passed:
            success = 1.0
        else:
            return
        await self.runner.store.record_outcome(
            plan.run_id, plan.prompt, strategy, "gate", success, 1.0 - success, progress.outcome
        )


def plan_row(plan: RunPlan) -> dict[str, Any]:
    """The plan's columns of a new run row."""
    return {
        "strategies": list(plan.strategies),
        "parent_version": plan.parent_version,
        "seed": plan.seed,
        "snapshot": plan.snapshot.to_dict(),
        "selection": plan.selection,
    }
