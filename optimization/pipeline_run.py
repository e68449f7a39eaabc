"""One optimization run of a pipeline: episodes, splits, leader/follower search, gate.

Like a prompt's run (:mod:`promptd.optimization.run`), a pipeline's run is fixed by its
plan (pipeline, every step's active program, strategy, seed, snapshot), persists every
answer as it arrives and resumes by replaying. Its examples are **episodes** split by a
hash of ``episode_id``; every score is end to end (the chain evaluator). Phases:

1. ``examples`` — the pipeline's episodes within the snapshot, split; only episodes with
   every input and a trusted final answer count;
2. ``baseline`` — the active pipeline on the validation episodes;
3. ``search`` — leader/follower search (:mod:`promptd.optimization.stackelberg`);
4. ``gate`` — the chosen set of programs against the active pipeline on the test
   episodes, end to end, paired, with the same test as a prompt's gate.

The outcome names the steps whose program changed; the runner registers those versions
and hands them to one coordinated rollout.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from promptd.optimization.config import OptimizationSettings
from promptd.optimization.evaluator import Evaluator
from promptd.optimization.examples import Snapshot, split
from promptd.optimization.gate import GateResult, decide
from promptd.optimization.llm import Budget, BudgetExceeded, CachedLLM, LLMClient
from promptd.optimization.pipeline import ChainEvaluator, Episode
from promptd.optimization.program import Program, seen_key
from promptd.optimization.stackelberg import Equilibrium, LeaderFollower
from promptd.optimization.store import OptimizationStore
from promptd.optimization.strategies.base import Candidate, SearchContext
from promptd.replacement.pipelines import Pipeline


class EpisodeSource(Protocol):
    """Where a pipeline's episodes come from (the event tables, in the daemon)."""

    async def snapshot(self, now: float) -> Snapshot:
        """The bounds a run started now reads within."""
        ...

    async def episodes(self, pipeline: Pipeline, snapshot: Snapshot) -> list[Episode]:
        """The pipeline's episodes within ``snapshot``."""
        ...


@dataclass(frozen=True)
class PipelinePlan:
    """Everything that fixes a pipeline run."""

    run_id: str
    pipeline: Pipeline
    active: Mapping[str, Program]
    versions: Mapping[str, str]  # prompt -> active version at the start
    strategy: str
    seed: int
    snapshot: Snapshot
    started_at: float
    elapsed_s: float = 0.0
    resumes: int = 0

    @property
    def prompt(self) -> str:
        """The run's target name (the pipeline's), as the policy and events name it."""
        return self.pipeline.name


@dataclass
class PipelineProgress:
    """What a pipeline run has found; checkpointed into its row."""

    phase: str = "examples"
    splits: dict[str, int] = field(default_factory=dict)
    baseline_val_mean: float | None = None
    equilibrium: dict[str, Any] | None = None
    chosen: dict[str, Program] = field(default_factory=dict)
    chosen_val_mean: float | None = None
    gate: GateResult | None = None
    notes: list[str] = field(default_factory=list)
    outcome: str = "none"

    def changed(self, active: Mapping[str, Program]) -> dict[str, Program]:
        """The steps whose chosen program differs from the active one."""
        return {p: prog for p, prog in self.chosen.items() if prog != active[p]}

    def progress_json(self) -> dict[str, Any]:
        """The ``progress`` column."""
        return {
            "phase": self.phase,
            "splits": self.splits,
            "baseline_val_mean": self.baseline_val_mean,
            "chosen_val_mean": self.chosen_val_mean,
            "equilibrium": self.equilibrium,
            "chosen": {p: prog.template for p, prog in self.chosen.items()},
            "notes": self.notes,
        }


Checkpoint = Callable[[PipelineProgress, Budget], Awaitable[None]]


class PipelineRunExecution:
    """Executes a :class:`PipelinePlan` (again, after a restart)."""

    def __init__(
        self,
        plan: PipelinePlan,
        settings: OptimizationSettings,
        store: OptimizationStore,
        source: EpisodeSource,
        client: LLMClient,
        checkpoint: Checkpoint,
    ) -> None:
        self.plan = plan
        self.settings = settings
        self.store = store
        self.source = source
        self.client = client
        self.checkpoint = checkpoint
        self.progress = PipelineProgress()
        self.budget = Budget(settings.max_llm_calls, settings.max_cost_usd, settings.max_tokens)
        self.llm: CachedLLM | None = None

    async def execute(self) -> PipelineProgress:
        """Run every phase; ``outcome`` says how it ended."""
        plan, settings = self.plan, self.settings
        if settings.evaluation.model is None:
            self.progress.notes.append("a pipeline run needs optimization.evaluation.model")
            return self._end("no_evaluation_model")
        spent = await self.store.spend(plan.run_id)
        self.budget.spend(spent.calls, spent.tokens, spent.cost_usd)
        self.budget.deadline = time.monotonic() + max(settings.timeout_s - plan.elapsed_s, 0.0)
        self.llm = CachedLLM(
            self.client, self.store, self.budget, plan.run_id, settings.max_concurrency
        )
        chain = ChainEvaluator(Evaluator(self.llm, settings.evaluation), plan.pipeline, plan.active)
        episodes = await self.source.episodes(plan.pipeline, plan.snapshot)
        parts = split(
            episodes, settings.splits.salt, settings.splits.train, settings.splits.validation
        )
        limits = settings.splits
        validation = [e for e in parts.validation if chain.usable(e)][: limits.max_validation]
        test = [e for e in parts.test if chain.usable(e)][: limits.max_test]
        train = parts.train
        self.progress.splits = {
            "episodes": len(episodes),
            "train": len(train),
            "validation": len(validation),
            "test": len(test),
        }
        if len(validation) < limits.min_validation or len(test) < limits.min_test:
            self.progress.notes.append(
                f"{len(validation)} usable validation and {len(test)} test episodes; need "
                f"{limits.min_validation} and {limits.min_test} (episodes need every input "
                "and a correct final answer: an episode correction, or a final output rated "
                f"at least {settings.evaluation.reference_min_score})"
            )
            return self._end("not_enough_examples")
        steps = len(plan.pipeline.steps)
        share = 2 * len(test) * steps / max(settings.max_llm_calls, 1)
        self.budget.hold_back(share, settings.timeout_s * min(share, 0.5))
        try:
            await self._phase("baseline")
            base = await chain.pipeline_scores(plan.active, validation)
        except BudgetExceeded as exc:
            self.progress.notes.append(f"baseline: {exc}")
            return self._end("budget_exhausted")
        self.progress.baseline_val_mean = float(np.mean(base))
        await self._phase("search")
        solver = LeaderFollower(
            plan.pipeline,
            plan.active,
            chain,
            validation,
            self._context_factory(train, validation),
            plan.strategy,
        )
        eq = await solver.solve()
        return await self._select_and_gate(eq, chain, test)

    async def _select_and_gate(
        self, eq: Equilibrium, chain: ChainEvaluator, test: Sequence[Episode]
    ) -> PipelineProgress:
        plan = self.plan
        self.progress.equilibrium = eq.report(plan.pipeline)
        self.progress.notes.extend(eq.notes)
        best = eq.best
        self.progress.chosen = best.programs(plan.pipeline)
        self.progress.chosen_val_mean = best.val_mean
        baseline = self.progress.baseline_val_mean or 0.0
        if not self.progress.changed(plan.active) or best.val_mean <= baseline:
            self.progress.notes.append(
                f"best pipeline validation mean {best.val_mean:.4f} does not beat the active "
                f"pipeline's {baseline:.4f}"
            )
            return self._end("no_improvement_on_validation")
        await self._phase("gate")
        self.budget.release()
        try:
            candidate = await chain.pipeline_scores(self.progress.chosen, test)
            active = await chain.pipeline_scores(plan.active, test)
        except BudgetExceeded as exc:
            self.progress.notes.append(f"gate: {exc}")
            return self._end("budget_exhausted")
        result = decide(
            candidate,
            active,
            min_confidence=self.settings.min_confidence_for_deployment,
            min_gain=self.settings.min_gain,
            samples=self.settings.evaluation.bootstrap_samples,
            seed=plan.seed,
            min_examples=self.settings.splits.min_test,
        )
        self.progress.gate = result
        return self._end("gate_passed" if result.passed else "gate_failed")

    def _context_factory(
        self, train: Sequence[Episode], validation: Sequence[Episode]
    ) -> Callable[[str, ChainEvaluator, str], SearchContext]:
        plan = self.plan

        async def checkpoint(_cand: Candidate) -> None:
            await self.checkpoint(self.progress, self.budget)

        def make(prompt: str, step_chain: ChainEvaluator, tag: str) -> SearchContext:
            base = step_chain.programs[prompt]
            return SearchContext(
                run_id=f"{plan.run_id}/{prompt}/{tag}",
                prompt=prompt,
                # The stability check re-optimizes with fresh draws, not a replay.
                seed=plan.seed + (1 if tag == "stability" else 0),
                baseline=base,
                train=[
                    e.as_example(prompt, final=prompt == plan.pipeline.prompts[-1])
                    for e in train
                    if prompt in e.calls
                ],
                validation=list(validation),
                evaluator=step_chain,
                llm=self.llm,
                settings=self.settings,
                seen={seen_key(base)},
                on_candidate=checkpoint,
            )

        return make

    async def _phase(self, phase: str) -> None:
        self.progress.phase = phase
        await self.checkpoint(self.progress, self.budget)

    def _end(self, outcome: str) -> PipelineProgress:
        self.progress.outcome = outcome
        self.progress.phase = "done"
        return self.progress
