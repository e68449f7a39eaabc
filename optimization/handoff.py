"""The hand-off: a run's selected candidate to the registry and to a rollout that must win.

One hand-off for a prompt and a pipeline alike: register a version of every step whose
program changed (parent: the step's version in the plan), then start one rollout of
them (a prompt's rollout, or a pipeline's coordinated rollout) that promotes only on a
significant online win.

**Idempotent.** A stop can cut the hand-off anywhere, and the resumed run replays to the
same candidate (every answer comes from the call cache) and hands off again. So each
step: a version this run registered already, with the same program, is taken as it is;
a rollout of exactly the versions this run registered is found rather than started
again. The resumed run ends with the one version and the one rollout it would have had,
and its row names them, so the bandit learns the rollout's result.

**The baseline still holds.** The gate compared the candidate with the plan's versions.
If a step's active version is no longer the plan's (a human restored or promoted another
meanwhile), the rollout would compare the candidate with a baseline no gate saw: the run
registers nothing and ends as ``parent_changed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from promptd.optimization.outcomes import Outcome
from promptd.optimization.plan import RunPlan
from promptd.optimization.program import Program, program_of
from promptd.optimization.run import RunProgress
from promptd.optimization.services import RunServices
from promptd.replacement.registry import NewVersion, PromptVersion, RegistryError

log = structlog.get_logger("promptd.optimizer")


@dataclass
class HandOff:
    """What the hand-off did: its outcome, the versions it registered, the rollout."""

    outcome: Outcome
    pipeline: bool = False
    registered: dict[str, str] = field(default_factory=dict)
    rollout_id: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def deployed_version(self) -> str | None:
        """The ``deployed_version`` column: a prompt's version, or a pipeline's
        ``prompt=version`` pairs."""
        if not self.registered:
            return None
        if not self.pipeline:
            return next(iter(self.registered.values()))
        return ", ".join(f"{p}={v}" for p, v in self.registered.items())


def rationale(plan: RunPlan, progress: RunProgress) -> str:
    """Why the versions exist: the candidate's provenance and the gate's figures."""
    chosen = progress.chosen
    assert chosen is not None
    text = chosen.rationale
    if plan.pipeline is not None:
        text = f"pipeline {plan.pipeline.name}: leader/follower ({chosen.strategy}); {text}"
    g = progress.gate
    if g is not None:
        unit = "episodes" if plan.pipeline is not None else "examples"
        text += (
            f" | gate: gain {g.gain:+.4f} (95% CI {g.ci_low:+.4f}..{g.ci_high:+.4f}), "
            f"confidence {g.confidence:.3f} on {g.n} test {unit}"
        )
    return text[:10_000]


async def hand_off(plan: RunPlan, progress: RunProgress, services: RunServices) -> HandOff:
    """Register the selected candidate's changed steps and start its rollout (see the
    module docstring); the outcome says how far it got."""
    chosen = progress.chosen
    if chosen is None or progress.outcome not in (Outcome.GATE_PASSED, Outcome.PROPOSED):
        return HandOff(progress.outcome)
    settings = services.settings
    if progress.outcome == Outcome.PROPOSED and settings.without_evaluation == "reject":
        return HandOff(Outcome.REJECTED_WITHOUT_EVALUATION)
    changed = {p: prog for p, prog in chosen.programs.items() if prog != plan.active[p]}
    result = HandOff(Outcome.REGISTER_FAILED, pipeline=plan.pipeline is not None)
    try:
        moved = await _parents_moved(plan, services)
        if moved:
            result.notes.append(
                f"the active version changed since the run started ({moved}): the gate's "
                "comparison no longer holds, nothing registered"
            )
            result.outcome = Outcome.PARENT_CHANGED
            return result
        for prompt, program in changed.items():
            version = await _register(plan, prompt, program, chosen.strategy, progress, services)
            result.registered[prompt] = version.version
    except RegistryError as exc:
        result.notes.append(f"register candidate {chosen.index}: {exc}")
        return result
    if not settings.auto_deploy:
        result.outcome = Outcome.CANDIDATE_WAITING
        return result
    await _rollout(plan, progress, services, result)
    return result


async def _parents_moved(plan: RunPlan, services: RunServices) -> str:
    """The steps whose active version is no longer the plan's (``""`` when none)."""
    moved = []
    for step in plan.steps:
        active = await services.registry.active(step.prompt)
        now = None if active is None else active.version
        if now != step.version:
            moved.append(f"{step.prompt}: {step.version} -> {now}")
    return ", ".join(moved)


async def _register(
    plan: RunPlan,
    prompt: str,
    program: Program,
    strategy: str,
    progress: RunProgress,
    services: RunServices,
) -> PromptVersion:
    """This run's version of ``prompt`` with ``program``: the one it registered before a
    stop, else a new one."""
    registry = services.registry
    for version in await registry.versions(prompt):
        if version.run_id == plan.run_id and program_of(version) == program:
            log.info("optimization_version_reused", run_id=plan.run_id, version=version.version)
            return version
    body: dict[str, Any] = (
        {"config": program.to_config()} if program.chat else {"template": program.template}
    )
    origin = f"optimizer:pipeline:{strategy}" if plan.pipeline else f"optimizer:{strategy}"
    return await registry.register(
        prompt,
        NewVersion(
            **body,
            parent_version=plan.versions[prompt],
            origin=origin,
            run_id=plan.run_id,
            rationale=rationale(plan, progress),
        ),
    )


async def _rollout(
    plan: RunPlan, progress: RunProgress, services: RunServices, result: HandOff
) -> None:
    """Find this run's rollout (started before a stop) or start it."""
    rollout_id = await _existing_rollout(services, result.registered)
    if rollout_id is None:
        try:
            rollout = await _start(plan, progress, services, result.registered)
        except RegistryError as exc:
            result.notes.append(f"rollout not started: {exc}")
            result.outcome = Outcome.CANDIDATE_WAITING
            return
        rollout_id = str(rollout.id)
    result.rollout_id = rollout_id
    result.outcome = Outcome.DEPLOYED
    log.info(
        "optimization_rollout_started",
        run_id=plan.run_id,
        prompt=plan.prompt,
        versions=result.registered,
        rollout_id=rollout_id,
    )


async def _start(
    plan: RunPlan, progress: RunProgress, services: RunServices, registered: Mapping[str, str]
) -> Any:
    rollouts, metric = services.rollouts, services.primary_metric
    if plan.pipeline is not None:
        return await rollouts.start_pipeline_rollout(
            plan.pipeline.name, dict(registered), primary_metric=metric, require_win=True
        )
    [(prompt, version)] = registered.items()
    # Without offline evaluation the online A/B test is the only validation, so it runs
    # with the cautious profile; either way it promotes only on a real win.
    profile = services.settings.conservative_profile if progress.gate is None else None
    return await rollouts.start_rollout(
        prompt, version, profile=profile, primary_metric=metric, require_win=True
    )


async def _existing_rollout(services: RunServices, registered: Mapping[str, str]) -> str | None:
    """A rollout whose candidates are exactly ``registered`` (versions only this run
    registered, so it is this run's)."""
    for row in await services.rollouts.list():
        members = row.get("members") or [
            {"prompt": row["prompt"], "candidate": row["candidate_version"]}
        ]
        candidates = {m["prompt"]: m["candidate"] for m in members if m.get("candidate")}
        if candidates == dict(registered):
            return str(row["id"])
    return None
