"""Pipeline runs inside the optimizer's shell: plan, execute, hand off, resume.

A trigger for a prompt that belongs to a pipeline optimizes the pipeline (its prompts get
no credit for the final answer when optimized alone); so does ``promptd optimize
--pipeline NAME``. The run's target is the pipeline: the policy (cooldown, one run at a
time, no run while a member prompt has a live rollout) and the bandit count it under the
pipeline's name. A run that passes the gate registers a version of every step whose
program changed and starts **one** coordinated rollout of them, which must win online.

:class:`PipelineRuns` holds what differs from a prompt's run; the
:class:`~promptd.optimization.runner.OptimizationRunner` owns policy, tasks, events and
metrics, and calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog

from promptd.optimization.examples import Snapshot
from promptd.optimization.gate import seed_for
from promptd.optimization.pipeline_run import (
    EpisodeSource,
    PipelinePlan,
    PipelineProgress,
    PipelineRunExecution,
)
from promptd.optimization.program import Program, program_of
from promptd.replacement.pipelines import Pipeline, PipelineRegistry
from promptd.replacement.registry import NewVersion, RegistryError

if TYPE_CHECKING:
    from promptd.optimization.llm import Budget
    from promptd.optimization.runner import OptimizationRunner

log = structlog.get_logger("promptd.optimizer")

# gepa's adapter reads training examples of one prompt; a pipeline step is scored on
# episodes, so the pipeline search uses the other strategies.
PIPELINE_STRATEGIES = ("fewshot", "instruction", "mipro")


class PipelineRuns:
    """Pipeline-specific parts of a run (see the module docstring)."""

    def __init__(
        self, runner: OptimizationRunner, pipelines: PipelineRegistry, source: EpisodeSource
    ) -> None:
        self.runner = runner
        self.pipelines = pipelines
        self.source = source

    async def pipeline_of(self, target: str) -> Pipeline | None:
        """The pipeline named ``target``, or the one prompt ``target`` belongs to."""
        with contextlib.suppress(RegistryError):
            return await self.pipelines.get(target)
        return await self.pipelines.of_prompt(target)

    async def plan(
        self, pipeline: Pipeline, run_id: str, strategy: str, selection: dict[str, Any], now: float
    ) -> tuple[PipelinePlan, dict[str, Any]] | str:
        """The plan and the row of a new run, or why it cannot start."""
        registry = self.runner.registry
        active: dict[str, Program] = {}
        versions: dict[str, str] = {}
        for prompt in pipeline.prompts:
            version = await registry.active(prompt)
            if version is None:
                return f"step {prompt!r} has no active version"
            active[prompt] = program_of(version)
            versions[prompt] = version.version
        plan = PipelinePlan(
            run_id=run_id,
            pipeline=pipeline,
            active=active,
            versions=versions,
            strategy=strategy,
            seed=seed_for(run_id),
            snapshot=await self.source.snapshot(now),
            started_at=now,
        )
        row = {
            "target": {
                "kind": "pipeline",
                "pipeline": pipeline.to_dict(),
                "versions": versions,
            },
            "seed": plan.seed,
            "snapshot": plan.snapshot.to_dict(),
            "selection": selection,
            "strategies": [strategy],
            "parent_version": None,
        }
        return plan, row

    async def plan_from_row(self, row: dict[str, Any]) -> PipelinePlan | None:
        """The plan of a run a restart cut short (``None`` when it cannot resume)."""
        target = row.get("target") or {}
        try:
            pipeline = Pipeline.from_dict(target["pipeline"])
            active = {}
            for prompt, version in target["versions"].items():
                found = await self.runner.registry.get_version(prompt, version)
                active[prompt] = program_of(found)
        except (KeyError, RegistryError, ValueError):
            return None
        return PipelinePlan(
            run_id=row["id"],
            pipeline=pipeline,
            active=active,
            versions=dict(target["versions"]),
            strategy=row["strategies"][0],
            seed=int(row["seed"]),
            snapshot=Snapshot.from_dict(row["snapshot"]),
            started_at=float(row["started_at"]),
            elapsed_s=float(row.get("elapsed_s") or 0.0),
            resumes=int(row.get("resumes") or 0) + 1,
        )

    def execution(self, plan: PipelinePlan, started: float) -> PipelineRunExecution:
        """The execution of ``plan``, checkpointing into its row."""
        runner = self.runner
        return PipelineRunExecution(
            plan,
            runner.settings,
            runner.store,
            self.source,
            runner.client_factory(),
            checkpoint=lambda progress, budget: self.checkpoint(plan, progress, budget, started),
        )

    async def checkpoint(
        self, plan: PipelinePlan, progress: PipelineProgress, budget: Budget, started: float
    ) -> None:
        """Persist the run's progress and spend."""
        await self.runner.store.update_run(
            plan.run_id,
            phase=progress.phase,
            progress=progress.progress_json(),
            llm_calls=budget.calls,
            cost_usd=budget.cost_usd,
            tokens=budget.tokens,
            elapsed_s=plan.elapsed_s + (time.monotonic() - started),
        )

    async def hand_off(
        self, plan: PipelinePlan, progress: PipelineProgress
    ) -> tuple[dict[str, str], str | None]:
        """Register the changed steps' versions and start their coordinated rollout."""
        if progress.outcome != "gate_passed":
            return {}, None
        runner = self.runner
        registered: dict[str, str] = {}
        gate = progress.gate
        rationale = f"pipeline {plan.pipeline.name}: leader/follower ({plan.strategy})" + (
            f" | gate: gain {gate.gain:+.4f} (95% CI {gate.ci_low:+.4f}..{gate.ci_high:+.4f}),"
            f" confidence {gate.confidence:.3f} on {gate.n} test episodes"
            if gate
            else ""
        )
        try:
            for prompt, program in progress.changed(plan.active).items():
                body: dict[str, Any] = (
                    {"config": program.to_config()}
                    if program.chat
                    else {"template": program.template}
                )
                version = await runner.registry.register(
                    prompt,
                    NewVersion(
                        **body,
                        parent_version=plan.versions[prompt],
                        origin=f"optimizer:pipeline:{plan.strategy}",
                        run_id=plan.run_id,
                        rationale=rationale[:10_000],
                    ),
                )
                registered[prompt] = version.version
        except RegistryError as exc:
            progress.notes.append(f"register: {exc}")
            progress.outcome = "register_failed"
            return registered, None
        if not runner.settings.auto_deploy:
            progress.outcome = "candidate_waiting"
            return registered, None
        return registered, await self._rollout(plan, progress, registered)

    async def _rollout(
        self, plan: PipelinePlan, progress: PipelineProgress, registered: Mapping[str, str]
    ) -> str | None:
        start = getattr(self.runner.rollouts, "start_pipeline_rollout", None)
        if start is None:
            progress.notes.append("the rollout controller cannot roll out pipelines")
            progress.outcome = "candidate_waiting"
            return None
        try:
            rollout = await start(
                plan.pipeline.name,
                dict(registered),
                primary_metric=self.runner.primary_metric,
                require_win=True,
            )
        except RegistryError as exc:
            progress.notes.append(f"rollout not started: {exc}")
            progress.outcome = "candidate_waiting"
            return None
        progress.outcome = "deployed"
        log.info(
            "optimization_rollout_started",
            run_id=plan.run_id,
            pipeline=plan.pipeline.name,
            versions=dict(registered),
            rollout_id=rollout.id,
        )
        return str(rollout.id)

    async def run(self, plan: PipelinePlan) -> None:
        """Execute, hand off and record one pipeline run (the runner's task)."""
        runner = self.runner
        started = time.monotonic()
        execution = self.execution(plan, started)
        await runner.emit(
            "optimization_start" if not plan.resumes else "optimization_resume",
            plan,
            pipeline=plan.pipeline.to_dict(),
            strategy=plan.strategy,
            versions=dict(plan.versions),
        )
        status, error = "completed", None
        registered: dict[str, str] = {}
        rollout_id: str | None = None
        progress = execution.progress
        try:
            remaining = max(runner.settings.timeout_s - plan.elapsed_s, 1.0)
            async with asyncio.timeout(remaining):
                progress = await execution.execute()
            registered, rollout_id = await self.hand_off(plan, progress)
        except TimeoutError:
            status, error = "timed_out", f"timed out after {runner.settings.timeout_s:g}s"
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.checkpoint(plan, progress, execution.budget, started)
            runner.metrics.running.dec()
            log.info("optimization_suspended", run_id=plan.run_id, phase=progress.phase)
            raise
        except Exception as exc:
            log.exception("optimization_failed", run_id=plan.run_id, prompt=plan.prompt)
            status, error = "failed", f"{type(exc).__name__}: {exc}"
        await self._finish(
            plan, progress, execution.budget, status, error, registered, rollout_id, started
        )

    async def _finish(
        self,
        plan: PipelinePlan,
        progress: PipelineProgress,
        budget: Budget,
        status: str,
        error: str | None,
        registered: dict[str, str],
        rollout_id: str | None,
        started: float,
    ) -> None:
        runner = self.runner
        now = runner.clock()
        outcome = progress.outcome if status == "completed" else "none"
        notes = "; ".join(progress.notes) or None
        deployed = ", ".join(f"{p}={v}" for p, v in registered.items()) or None
        try:
            await runner.store.finish_run(
                plan.run_id,
                plan.prompt,
                now,
                status=status,
                outcome=outcome,
                phase="done",
                progress=progress.progress_json(),
                gate=progress.gate.to_dict() if progress.gate else None,
                llm_calls=budget.calls,
                cost_usd=budget.cost_usd,
                tokens=budget.tokens,
                elapsed_s=plan.elapsed_s + (time.monotonic() - started),
                deployed_version=deployed,
                rollout_id=rollout_id,
                error=error if error is not None else notes,
            )
            success = {"gate_passed": 1.0, "deployed": 1.0, "candidate_waiting": 1.0}.get(
                outcome, 0.0 if outcome in ("gate_failed", "no_improvement_on_validation") else -1
            )
            if success >= 0:
                await runner.store.record_outcome(
                    plan.run_id, plan.prompt, plan.strategy, "gate", success, 1 - success, outcome
                )
        except Exception:
            log.exception("optimization_record_failed", run_id=plan.run_id)
        runner.run_ended(plan.prompt, now, status, outcome, budget)
        await runner.emit(
            "optimization_complete",
            plan,
            status=status,
            outcome=outcome,
            cost_usd=round(budget.cost_usd, 6),
            llm_calls=budget.calls,
            equilibrium=progress.equilibrium,
            gate=progress.gate.to_dict() if progress.gate else None,
            deployed_versions=registered,
            rollout_id=rollout_id,
            error=error,
            notes=notes,
        )
        row = await runner.store.get_run(plan.run_id)
        if row is not None:
            await runner.tracker.run_finished(row)
