"""What a run optimizes, and what differs between one prompt and a pipeline.

The run model (:mod:`promptd.optimization.run`) is the same for both: plan, examples,
baseline, search, selection, gate, hand-off. A **target** supplies the parts that
depend on what is optimized:

* its **data**: a prompt's calls (:class:`~promptd.optimization.examples.Example`) split
  by ``request_id``, or a pipeline's episodes split by ``episode_id``, each kept when it
  can score the active programs;
* how a set of programs (one per step) is **scored** on that data: the evaluator for one
  prompt, end to end through the chain evaluator for a pipeline;
* its **search**: the run's strategies, one after another, on a prompt; leader/follower
  search (:mod:`promptd.optimization.stackelberg`) on a pipeline.

Each reports its candidates (a program for every step) and every trial to the run
through :class:`RunHooks`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from promptd.optimization.config import OptimizationSettings
from promptd.optimization.evaluator import Evaluator
from promptd.optimization.examples import Example, ExampleStore, Snapshot, split
from promptd.optimization.llm import BudgetExceeded, CachedLLM
from promptd.optimization.pipeline import ChainEvaluator, Episode
from promptd.optimization.plan import RunPlan
from promptd.optimization.program import Program, seen_key
from promptd.optimization.stackelberg import (
    ContextFactory,
    Equilibrium,
    LeaderFollower,
    Response,
)
from promptd.optimization.strategies import get_strategy
from promptd.optimization.strategies.base import Candidate, SearchContext, SearchResult
from promptd.replacement.pipelines import Pipeline


class EpisodeSource(Protocol):
    """Where a pipeline's episodes come from (the event tables, in the daemon)."""

    async def snapshot(self, now: float) -> Snapshot:
        """The bounds a run started now reads within."""
        ...

    async def episodes(self, pipeline: Pipeline, snapshot: Snapshot) -> list[Episode]:
        """The pipeline's episodes within ``snapshot``."""
        ...


class RunHooks(Protocol):
    """The run as its target's search sees it."""

    plan: RunPlan
    settings: OptimizationSettings
    llm: CachedLLM | None
    # Per step: programs registered before (any status), not proposed again.
    known: Mapping[str, set[str]]

    @property
    def baseline_val_mean(self) -> float:
        """The active programs' validation mean."""
        ...

    async def candidate(
        self, programs: dict[str, Program], found: Candidate, scores: Sequence[float]
    ) -> None:
        """A run candidate: every step's program, scored on validation end to end."""
        ...

    async def trial(self, entry: dict[str, Any]) -> None:
        """One scoring of a program (for the run's record)."""
        ...

    def collect(self, name: str, result: SearchResult) -> None:
        """A search's notes and discarded proposals."""
        ...

    def choose(self, responses: Sequence[Response]) -> int:
        """Which leader/follower pair to choose (the run's selection)."""
        ...

    def equilibrium(self, eq: Equilibrium) -> None:
        """A pipeline search's result, for the run's record."""
        ...


@dataclass(frozen=True)
class Data:
    """A run's usable data by split, and what to say when there is too little."""

    train: list[Any]
    validation: list[Any]
    test: list[Any]
    sizes: dict[str, int]
    needs: str


def usable_data(
    items: Sequence[Any],
    settings: OptimizationSettings,
    usable: Callable[[Any], bool],
    kind: str,
    needs: str,
) -> Data:
    """``items`` split; validation and test keep the ``usable`` ones, within the caps."""
    limits = settings.splits
    parts = split(items, limits.salt, limits.train, limits.validation)
    validation = [e for e in parts.validation if usable(e)][: limits.max_validation]
    test = [e for e in parts.test if usable(e)][: limits.max_test]
    sizes = {kind: len(items), "train": len(parts.train)}
    sizes |= {"validation": len(validation), "test": len(test)}
    return Data(parts.train, validation, test, sizes, needs)


class PromptTarget:
    """One prompt: its calls, the evaluator, the run's strategies in turn."""

    calls_per_example = 1

    def __init__(self, plan: RunPlan, examples: ExampleStore, settings: OptimizationSettings):
        self.plan = plan
        self.examples = examples
        self.settings = settings
        self.step = plan.steps[0]
        self.evaluator: Evaluator | None = None

    async def data(self, evaluator: Evaluator | None) -> Data:
        """The prompt's examples; validation and test keep those that can score."""
        self.evaluator = evaluator
        pool = await self.examples.examples(self.plan.prompt, self.plan.snapshot)
        base = self.step.program
        needs = (
            "examples need captured input and a correct answer: a correction, or an output "
            f"rated at least {self.settings.evaluation.reference_min_score}"
        )
        return usable_data(
            pool,
            self.settings,
            lambda e: evaluator is None or evaluator.usable(e, base),
            "examples",
            needs,
        )

    async def scores(self, programs: Mapping[str, Program], items: Sequence[Any]) -> list[float]:
        """Per-example scores of the prompt's program."""
        assert self.evaluator is not None
        return await self.evaluator.scores(programs[self.step.prompt], items)

    async def search(self, data: Data, run: RunHooks) -> None:
        """Each of the run's strategies in turn, until one stops at the budget."""
        ctx = self._context(data.train, data.validation, run)
        for name in self.plan.strategies:
            try:
                result = await get_strategy(name).search(ctx)
            except BudgetExceeded as exc:
                result = SearchResult(stopped=str(exc))
            run.collect(name, result)
            if result.stopped:
                return

    async def propose(self, data: Data, run: RunHooks) -> None:
        """Without an evaluation model: the first strategy that proposes a candidate."""
        ctx = self._context([*data.train, *data.validation], [], run)
        for name in self.plan.strategies:
            result = await get_strategy(name).search(ctx)
            run.collect(name, result)
            if result.candidates:
                return

    def _context(
        self, train: list[Example], validation: list[Example], run: RunHooks
    ) -> SearchContext:
        prompt, program = self.step.prompt, self.step.program

        async def found(cand: Candidate) -> None:
            await run.candidate({prompt: cand.program}, cand, cand.val_scores)

        return SearchContext(
            run_id=self.plan.run_id,
            prompt=prompt,
            seed=self.plan.seed,
            baseline=program,
            train=train,
            validation=validation,
            evaluator=self.evaluator,
            llm=run.llm if self.evaluator is not None else None,
            settings=self.settings,
            seen={seen_key(program), *run.known.get(prompt, set())},
            on_candidate=found,
            baseline_val_mean=run.baseline_val_mean,
            on_trial=run.trial,
            pools=None if self.evaluator is None else self.evaluator.pools,
        )


class PipelineTarget:
    """A pipeline: its episodes, end-to-end scores, leader/follower search."""

    def __init__(self, plan: RunPlan, source: EpisodeSource, settings: OptimizationSettings):
        assert plan.pipeline is not None
        self.plan = plan
        self.pipeline = plan.pipeline
        self.source = source
        self.settings = settings
        self.calls_per_example = len(plan.steps)
        self.chain: ChainEvaluator | None = None

    async def data(self, evaluator: Evaluator | None) -> Data:
        """The pipeline's episodes; validation and test keep those that can score."""
        assert evaluator is not None, "a pipeline run needs an evaluation model"
        self.chain = chain = ChainEvaluator(evaluator, self.pipeline, self.plan.active)
        episodes = await self.source.episodes(self.pipeline, self.plan.snapshot)
        needs = (
            "episodes need every input and a correct final answer: an episode correction, "
            f"or a final output rated at least {self.settings.evaluation.reference_min_score}"
        )
        return usable_data(episodes, self.settings, chain.usable, "episodes", needs)

    async def scores(self, programs: Mapping[str, Program], items: Sequence[Any]) -> list[float]:
        """Per-episode end-to-end scores of a set of programs."""
        assert self.chain is not None
        return await self.chain.pipeline_scores(programs, items)

    async def search(self, data: Data, run: RunHooks) -> None:
        """Leader/follower search; each scored pair is a run candidate."""
        assert self.chain is not None
        strategy = self.plan.strategies[0]
        solver = LeaderFollower(
            self.pipeline,
            self.plan.active,
            self.chain,
            data.validation,
            self._contexts(data.train, data.validation, run),
            strategy,
            choose=run.choose,
        )
        eq = await solver.solve()
        run.equilibrium(eq)
        for i, response in enumerate(eq.responses):
            found = Candidate(
                response.leader,
                strategy,
                f"leader/follower pair {i}: {response.leader_rationale}",
                details={"pair": i},
            )
            await run.candidate(response.programs(self.pipeline), found, response.scores)

    def _contexts(
        self, train: Sequence[Episode], validation: Sequence[Episode], run: RunHooks
    ) -> ContextFactory:
        plan = self.plan
        last = self.pipeline.prompts[-1]

        async def step_candidate(_cand: Candidate) -> None:
            return None  # a step's candidate is a trial; pairs are the run's candidates

        def make(
            prompt: str, step_chain: ChainEvaluator, tag: str, current: float
        ) -> SearchContext:
            base = step_chain.programs[prompt]
            return SearchContext(
                run_id=f"{plan.run_id}/{prompt}/{tag}",
                prompt=prompt,
                # The stability check re-optimizes with fresh draws, not a replay.
                seed=plan.seed + (1 if tag == "stability" else 0),
                baseline=base,
                train=[
                    e.as_example(prompt, final=prompt == last) for e in train if prompt in e.calls
                ],
                validation=list(validation),
                evaluator=step_chain,
                llm=run.llm,
                settings=self.settings,
                seen={seen_key(base), *run.known.get(prompt, set())},
                on_candidate=step_candidate,
                baseline_val_mean=current,
                on_trial=run.trial,
            )

        return make
