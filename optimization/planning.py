"""Making a run's plan: for a new run from its trigger, for a resumed one from its row.

A trigger names a prompt or a pipeline. A prompt that is a step of a registered pipeline
is optimized with its pipeline (its prompt alone gets no credit for the final answer);
either way the plan lists every step with its active version (see
:mod:`promptd.optimization.plan`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from promptd.optimization.examples import Snapshot
from promptd.optimization.gate import seed_for
from promptd.optimization.plan import RunBudget, RunPlan, StepPlan
from promptd.optimization.program import program_of
from promptd.optimization.services import RunServices
from promptd.replacement.pipelines import Pipeline, PipelineRegistry
from promptd.replacement.registry import RegistryError


class Planner:
    """Plans of new and resumed runs."""

    def __init__(self, services: RunServices, pipelines: PipelineRegistry | None) -> None:
        self.services = services
        # Pipelines are optimized only where their episodes can be read.
        self.pipelines = pipelines if services.episodes is not None else None

    async def pipeline_of(self, target: str) -> Pipeline | None:
        """The pipeline named ``target``, or the one prompt ``target`` belongs to."""
        if self.pipelines is None:
            return None
        with contextlib.suppress(RegistryError):
            return await self.pipelines.get(target)
        return await self.pipelines.of_prompt(target)

    async def new(
        self,
        run_id: str,
        target: str,
        pipeline: Pipeline | None,
        strategies: tuple[str, ...],
        selection: dict[str, Any],
        budget: RunBudget,
        trigger: tuple[str, str],
        now: float,
    ) -> RunPlan | str:
        """The plan of a new run, or why it cannot start (a step without an active
        version)."""
        registry = self.services.registry
        steps = []
        for prompt in pipeline.prompts if pipeline is not None else (target,):
            try:
                active = await registry.active(prompt)
            except RegistryError:
                active = None
            if active is None:
                what = f"step {prompt!r}" if pipeline is not None else repr(prompt)
                return f"{what} has no active version"
            steps.append(StepPlan(prompt, active.version, program_of(active)))
        if pipeline is not None:
            assert self.services.episodes is not None
            snapshot = await self.services.episodes.snapshot(now)
        else:
            snapshot = await self.services.examples.snapshot(now)
        return RunPlan(
            run_id=run_id,
            target=target,
            steps=tuple(steps),
            strategies=strategies,
            selection=selection,
            seed=seed_for(run_id),
            snapshot=snapshot,
            budget=budget,
            trigger_kind=trigger[0],
            trigger_reason=trigger[1],
            started_at=now,
            pipeline=pipeline,
        )

    async def from_row(self, row: Mapping[str, Any]) -> RunPlan | None:
        """The plan of a run a restart cut short (``None`` when it cannot resume)."""
        if row.get("seed") is None or row.get("snapshot") is None or not row.get("selection"):
            return None  # a run from before resumable runs existed
        target = row.get("target") or {}
        pipeline = None
        try:
            if target.get("kind") == "pipeline":
                if self.pipelines is None:
                    return None
                pipeline = Pipeline.from_dict(target["pipeline"])
                versions = dict(target["versions"])
            else:
                versions = {row["prompt"]: row["parent_version"]}
            steps = []
            for prompt, version in versions.items():
                found = await self.services.registry.get_version(prompt, version)
                steps.append(StepPlan(prompt, found.version, program_of(found)))
        except (KeyError, TypeError, ValueError, RegistryError):
            return None
        return RunPlan(
            run_id=row["id"],
            target=row["prompt"],
            steps=tuple(steps),
            strategies=tuple(row["strategies"]),
            selection=row["selection"],
            seed=int(row["seed"]),
            snapshot=Snapshot.from_dict(row["snapshot"]),
            budget=RunBudget.from_dict(target.get("budget"), self.services.settings),
            trigger_kind=row["trigger_kind"],
            trigger_reason=row["trigger_reason"],
            started_at=float(row["started_at"]),
            pipeline=pipeline,
            elapsed_s=float(row.get("elapsed_s") or 0.0),
            resumes=int(row.get("resumes") or 0) + 1,
        )
