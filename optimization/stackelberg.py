"""Leader/follower (Stackelberg) optimization of a pipeline's prompts.

The **leader** is the pipeline's first step; the **followers** are the steps after it.
A follower's best prompt depends on what the leader writes (an extraction step's format
decides what the answering step must cope with), so optimizing each prompt on its own,
against the others as they are today, misses the pairs that work together. The leader
is chosen in anticipation of the followers' best response:

1. **Leader candidates.** A search of the leader's prompt, every step scored end to end
   on the validation episodes with the followers as they are; the ``top_k`` best
   candidates (the active leader always among them).
2. **Best response.** For each leader candidate, each follower in order is searched
   with the leader candidate and the earlier followers' responses fixed.
3. **Choice.** The leader whose pair with its best-responding followers has the best
   end-to-end validation mean (a run chooses with its noise-aware selection instead, see
   :mod:`promptd.optimization.candidates`).
4. **Stability.** The followers re-optimize against the chosen leader (a fresh search);
   every leader candidate is scored again with those followers. The equilibrium is
   stable when the chosen leader is still the best; the report gives both rankings.

Every score is an end-to-end validation mean through the run's one cached evaluator, so a
pair scored twice is paid once. Each step's search is told what the step's current
program scores in the pipeline as it stands (the active pipeline for the leader, the
leader candidate with the earlier responses for a follower). A spent budget ends the
search with the pairs scored so far.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from promptd.optimization.llm import BudgetExceeded
from promptd.optimization.pipeline import ChainEvaluator, Episode, Pipeline
from promptd.optimization.program import Program
from promptd.optimization.strategies import get_strategy
from promptd.optimization.strategies.base import Candidate, SearchContext, SearchResult

# (step prompt, the chain with the other steps fixed, a tag naming the search, the
# validation mean of the step's current program in that chain) -> the search's context.
ContextFactory = Callable[[str, ChainEvaluator, str, float], SearchContext]
Chooser = Callable[[Sequence["Response"]], int]


@dataclass
class Response:
    """A leader program with its followers' best response and its end-to-end scores."""

    leader: Program
    followers: dict[str, Program]
    scores: tuple[float, ...]
    leader_rationale: str = "active"

    @property
    def val_mean(self) -> float:
        """End-to-end validation mean."""
        return _mean(self.scores)

    def programs(self, pipeline: Pipeline) -> dict[str, Program]:
        """Every step's program."""
        return {pipeline.prompts[0]: self.leader, **self.followers}


def best_mean(responses: Sequence[Response]) -> int:
    """The response with the best validation mean (the earliest on ties)."""
    return max(range(len(responses)), key=lambda i: (responses[i].val_mean, -i))


@dataclass
class Equilibrium:
    """What leader/follower optimization found, with its stability."""

    responses: list[Response]
    chosen: int | None
    stable: bool | None = None
    rescored: list[float] = field(default_factory=list)
    reoptimized: dict[str, Program] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Response:
        """The chosen leader and its followers."""
        assert self.chosen is not None, "no leader/follower pair was scored"
        return self.responses[self.chosen]

    def report(self, pipeline: Pipeline) -> dict[str, Any]:
        """JSON form for the run row: each leader's pair score, the choice, stability."""
        return {
            "leader": pipeline.prompts[0],
            "followers": list(pipeline.prompts[1:]),
            "pairs": [
                {
                    "leader_rationale": r.leader_rationale[:300],
                    "val_mean": round(r.val_mean, 6),
                    "rescored_val_mean": round(self.rescored[i], 6) if self.rescored else None,
                }
                for i, r in enumerate(self.responses)
            ],
            "chosen": self.chosen,
            "stable": self.stable,
            "notes": self.notes,
        }


class LeaderFollower:
    """Runs the four phases above with a given strategy per step."""

    def __init__(
        self,
        pipeline: Pipeline,
        active: Mapping[str, Program],
        chain: ChainEvaluator,
        validation: Sequence[Episode],
        context: ContextFactory,
        strategy: str = "fewshot",
        top_k: int = 2,
        choose: Chooser = best_mean,
    ) -> None:
        self.pipeline = pipeline
        self.active = dict(active)
        self.chain = chain
        self.validation = list(validation)
        self.context = context
        self.strategy = strategy
        self.top_k = top_k
        # Which pair is chosen (the run passes its noise-aware selection).
        self.choose = choose

    async def solve(self) -> Equilibrium:
        """Leader candidates, best responses, choice, stability. A spent budget ends the
        search with the pairs scored so far (none: no choice)."""
        leader = self.pipeline.prompts[0]
        notes: list[str] = []
        responses: list[Response] = []
        try:
            for rationale, program in await self._leaders(leader, notes):
                followers = await self._best_response(program, "br", notes)
                scores = await self._scores({leader: program, **followers})
                responses.append(Response(program, followers, scores, rationale))
        except BudgetExceeded as exc:
            notes.append(f"leader/follower search stopped: {exc}")
        if not responses:
            return Equilibrium([], None, notes=notes)
        result = Equilibrium(responses, self.choose(responses), notes=notes)
        await self._stability(result, notes)
        return result

    async def _leaders(self, leader: str, notes: list[str]) -> list[tuple[str, Program]]:
        active = _mean(await self._scores(self.active))
        found = await self._search(leader, self.active, "leader", notes, active)
        ranked = sorted(
            (c for c in found.candidates if c.val_mean is not None),
            key=lambda c: (-(c.val_mean or 0.0), c.index),
        )
        out = [("active leader", self.active[leader])]
        out += [(c.rationale, c.program) for c in ranked[: max(self.top_k - 1, 0)]]
        return out

    async def _best_response(
        self, leader_program: Program, tag: str, notes: list[str]
    ) -> dict[str, Program]:
        programs = {**self.active, self.pipeline.prompts[0]: leader_program}
        for follower in self.pipeline.prompts[1:]:
            # The follower's current program, scored in the pipeline as it now stands:
            # what its search must beat, and what its proposer is told it scores.
            current = _mean(await self._scores(programs))
            # One tag for every leader: a follower's proposals do not depend on the leader
            # (they come back from the cache); each is scored under this leader.
            found = await self._search(follower, programs, tag, notes, current)
            best = max(
                (c for c in found.candidates if c.val_mean is not None),
                key=lambda c: (c.val_mean or 0.0, -c.index),
                default=None,
            )
            if best is not None and best.val_mean is not None and best.val_mean > current:
                programs[follower] = best.program
        return {p: programs[p] for p in self.pipeline.prompts[1:]}

    async def _stability(self, result: Equilibrium, notes: list[str]) -> None:
        try:
            followers = await self._best_response(result.best.leader, "stability", notes)
            rescored = []
            for response in result.responses:
                programs = {self.pipeline.prompts[0]: response.leader, **followers}
                rescored.append(_mean(await self._scores(programs)))
        except BudgetExceeded as exc:
            notes.append(f"stability not checked: {exc}")
            return
        result.reoptimized = followers
        result.rescored = rescored
        best_after = max(range(len(rescored)), key=lambda i: (rescored[i], -i))
        result.stable = best_after == result.chosen

    async def _search(
        self,
        prompt: str,
        programs: Mapping[str, Program],
        tag: str,
        notes: list[str],
        current: float,
    ) -> SearchResult:
        chain = self.chain.for_step(prompt, programs)
        ctx = self.context(prompt, chain, tag, current)
        try:
            return await get_strategy(self.strategy).search(ctx)
        except BudgetExceeded as exc:
            notes.append(f"{prompt}: {exc}")
            return SearchResult(stopped=str(exc))

    async def _scores(self, programs: Mapping[str, Program]) -> tuple[float, ...]:
        scores = await self.chain.pipeline_scores({**self.active, **programs}, self.validation)
        return tuple(scores)


def _mean(scores: Sequence[float]) -> float:
    return float(np.mean(scores)) if len(scores) else 0.0


async def independent(
    pipeline: Pipeline,
    active: Mapping[str, Program],
    chain: ChainEvaluator,
    validation: Sequence[Episode],
    context: ContextFactory,
    strategy: str,
) -> dict[str, Program]:
    """Each prompt optimized on its own against the others as they are today (the
    comparison point of the bench); a prompt changes only when its best candidate beats
    the active pipeline on validation."""
    out = dict(active)
    for prompt in pipeline.prompts:
        step_chain = chain.for_step(prompt, active)
        try:
            baseline = _mean(await chain.pipeline_scores(active, validation))
            found = await get_strategy(strategy).search(
                context(prompt, step_chain, "independent", baseline)
            )
        except BudgetExceeded:
            break
        best: Candidate | None = max(
            (c for c in found.candidates if c.val_mean is not None),
            key=lambda c: (c.val_mean or 0.0, -c.index),
            default=None,
        )
        if best is not None and best.val_mean is not None and best.val_mean > baseline:
            out[prompt] = best.program
    return out
