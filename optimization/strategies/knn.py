"""``knn``: demonstrations chosen per input from a pool of trusted examples (KNNFewShot).

The pool is the train split's trusted examples (:func:`~promptd.optimization.pools.
trusted_demos`), stored as a snapshot that every candidate pins. A candidate is the
active configuration without fixed demonstrations, plus a ``demos`` declaration (see
:mod:`promptd.demos`): for each input, its ``k`` nearest demos within ``max_distance``
become the turns before it. Scored like any candidate through the one evaluator, which
retrieves from the pinned pool for every validation example (never the example itself,
never outside the train split), and gated like any candidate on test.

The search is coordinate ascent on a fixed validation minibatch (the same examples for
every trial, so trials compare paired): the retriever and ``k`` together (whose best is
scored on all of validation at once, so a search the budget cuts short has a
candidate), then the distance cut-off, then the instruction (the active one and
proposals, when a proposer is configured). The best ``top_k_full_eval`` settings are
scored on all of validation: those are the candidates. When the active version already
takes its demos from an older snapshot, its own settings on the new snapshot are a
candidate too (promoting a refreshed pool is a new version, gated and rolled out like
any other). With
``knn.ensemble_n`` > 1, the best candidate voting over that many samples is one more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from promptd.demos import DemoSpec, EnsembleSpec, fields_of
from promptd.optimization.config import KnnSettings, OptimizationSettings
from promptd.optimization.llm import BudgetExceeded, LLMError
from promptd.optimization.pools import PoolUnavailable, trusted_demos
from promptd.optimization.program import Program
from promptd.optimization.strategies.base import (
    TIPS,
    SearchContext,
    SearchResult,
    parse_instruction,
    proposal_messages,
)


@dataclass(frozen=True, slots=True)
class Setting:
    """One point of the search: retriever, k, cut-off, instruction (by index)."""

    retriever: str
    k: int
    max_distance: float | None = None
    instruction: int = 0

    def describe(self) -> str:
        """For rationales and trials."""
        cut = "no cut-off" if self.max_distance is None else f"distance <= {self.max_distance}"
        return f"{self.retriever} k={self.k}, {cut}, instruction {self.instruction}"


class KnnSearch:
    """Nearest-neighbour few-shot over a pool of the train split."""

    name = "knn"
    pipelines = False

    def unavailable(self, settings: OptimizationSettings) -> str | None:
        """Needs an evaluation model (the search and the pool's use are scored)."""
        if settings.evaluation.model is None:
            return "no evaluation model configured ([optimization.evaluation.model])"
        return None

    async def search(self, ctx: SearchContext) -> SearchResult:
        """Build and store the pool, search the settings, score the best on validation."""
        result = SearchResult()
        conf = ctx.settings.knn
        if not ctx.baseline.chat:
            result.notes.append(
                "per-request demonstrations need a chat configuration version (the app "
                "sends variant.messages(...)); this prompt's active version is a template"
            )
            return result
        trusted = ctx.settings.evaluation.reference_min_score
        demos = trusted_demos(ctx.train, trusted, conf.max_pool)
        if not demos or ctx.pools is None or ctx.evaluator is None:
            result.notes.append(
                "no training example has a correction or an output rated "
                f">= {trusted}: nothing to retrieve"
            )
            return result
        base = ctx.baseline.without_demos()
        fields = fields_of(base.final[1])
        try:
            pools = {
                r: await ctx.pools.save(demos, f"optimizer:{ctx.run_id}", r == "embedding", fields)
                for r in _retrievers(conf)
            }
            await self._search(ctx, result, base, {r: p.pool_id for r, p in pools.items()})
        except BudgetExceeded as exc:
            result.stopped = str(exc)
        except (PoolUnavailable, LLMError) as exc:
            result.notes.append(f"stopped: {exc}")
        return result

    async def _search(
        self, ctx: SearchContext, result: SearchResult, base: Program, pools: dict[str, str]
    ) -> None:
        conf = ctx.settings.knn
        rng = ctx.rng(self.name)
        grid = [Setting(r, k) for r in pools for k in sorted(set(conf.k_values))]
        size, grid = _fit(grid, conf.minibatch_size, len(ctx.validation), ctx.remaining_calls())
        batch = rng.sample(ctx.validation, size)
        instructions = [base.instruction()]
        trial = _Trials(ctx, base, pools, instructions, batch, self.name)
        best = await trial.best(grid)
        # The grid's best on all of validation at once: a search the budget cuts short
        # later still has a candidate.
        scored = await self._full(ctx, result, trial, [best])
        best = await trial.best([best, *(_cut(best, d) for d in conf.max_distances)])
        instructions += await self._proposals(ctx, result, conf.num_instructions - 1)
        best = await trial.best([best, *(_with(best, i) for i in range(1, len(instructions)))])
        refreshed = _refreshed(ctx.baseline, pools)
        if refreshed is not None:
            await ctx.evaluate(
                refreshed,
                self.name,
                "the active version's demonstration settings on the refreshed pool",
                result,
                {"demos": refreshed.extra("demos")},
            )
        # Stable: on equal means, the setting tried first (fewer changes) comes first.
        top = sorted(trial.means, key=lambda s: -trial.means[s])[: conf.top_k_full_eval]
        done = {s for _m, s in scored}
        scored += await self._full(ctx, result, trial, [s for s in top if s not in done])
        if conf.ensemble_n > 1 and scored:
            _mean, setting = max(scored, key=lambda t: t[0])
            ensemble = EnsembleSpec(conf.ensemble_n, conf.ensemble_temperature)
            await ctx.evaluate(
                trial.program(setting).with_extra("ensemble", ensemble.to_dict()),
                self.name,
                f"{setting.describe()}, voting over {ensemble.n} samples "
                f"({ensemble.n} model calls per request)",
                result,
                trial.details(setting) | {"ensemble": ensemble.to_dict()},
            )

    async def _full(
        self, ctx: SearchContext, result: SearchResult, trial: _Trials, settings: list[Setting]
    ) -> list[tuple[float, Setting]]:
        """Score ``settings`` on all of validation (as candidates); their means."""
        scored = []
        for setting in settings:
            cand = await ctx.evaluate(
                trial.program(setting),
                self.name,
                f"{setting.describe()} (minibatch mean {trial.means[setting]:.3f})",
                result,
                trial.details(setting),
            )
            if cand is not None and cand.val_mean is not None:
                scored.append((cand.val_mean, setting))
        return scored

    async def _proposals(self, ctx: SearchContext, result: SearchResult, n: int) -> list[str]:
        """Up to ``n`` proposed instructions (none without a proposer)."""
        if n <= 0 or ctx.settings.proposer is None:
            return []
        out: list[str] = []
        current = ctx.baseline.instruction()
        for i in range(n):
            messages = proposal_messages(ctx, current, [], TIPS[i % len(TIPS)], 4)
            text = parse_instruction(await ctx.propose(messages, f"knn/instruction/{i}"))
            if text is None or text in out or text == current:
                result.discarded["no_instruction"] += 1
                continue
            out.append(text)
        return out


class _Trials:
    """Minibatch trials of settings, remembered (a setting is scored once)."""

    def __init__(
        self,
        ctx: SearchContext,
        base: Program,
        pools: dict[str, str],
        instructions: list[str],
        batch: Sequence[Any],
        strategy: str,
    ) -> None:
        self.ctx = ctx
        self.base = base
        self.pools = pools
        self.instructions = instructions
        self.batch = batch
        self.strategy = strategy
        self.means: dict[Setting, float] = {}

    def spec(self, s: Setting) -> DemoSpec:
        """The ``demos`` declaration of a setting."""
        knn = self.ctx.settings.knn
        return DemoSpec(
            self.pools[s.retriever], s.k, s.max_distance, s.retriever, knn.max_demo_chars
        )

    def program(self, s: Setting) -> Program:
        """The candidate program of a setting."""
        program = self.base
        if s.instruction:
            program = program.with_instruction(self.instructions[s.instruction])
        return program.with_extra("demos", self.spec(s).to_dict())

    def details(self, s: Setting) -> dict[str, Any]:
        """What a trial or candidate records of its setting."""
        return {"demos": self.spec(s).to_dict(), "instruction": self.instructions[s.instruction]}

    async def best(self, settings: Sequence[Setting]) -> Setting:
        """The best of ``settings`` by minibatch mean (the earlier one on a tie)."""
        for s in settings:
            if s not in self.means:
                self.means[s] = await self.ctx.trial(
                    self.program(s), self.batch, self.strategy, self.details(s)
                )
        return max(settings, key=lambda s: (self.means[s], -settings.index(s)))


def _fit(
    grid: list[Setting], minibatch: int, n_val: int, calls: float
) -> tuple[int, list[Setting]]:
    """The minibatch size and grid that leave enough ``calls`` for the grid's best on
    all of validation (its minibatch answers are reused): a smaller minibatch on a
    tight budget, or only the grid's middle setting when even that does not fit."""
    fit = (calls - n_val) / max(len(grid) - 1, 1)
    size = int(min(minibatch, n_val, fit))
    if size >= 1:
        return size, grid
    return min(1, n_val), [grid[len(grid) // 2]]


def _retrievers(conf: KnnSettings) -> list[str]:
    return ["lexical", *(["embedding"] if conf.embedding is not None else [])]


def _cut(s: Setting, distance: float) -> Setting:
    return Setting(s.retriever, s.k, distance, s.instruction)


def _with(s: Setting, instruction: int) -> Setting:
    return Setting(s.retriever, s.k, s.max_distance, instruction)


def _refreshed(baseline: Program, pools: dict[str, str]) -> Program | None:
    """The active version's own demos settings on this run's pool, when it has some."""
    spec = baseline.demo_spec()
    if spec is None or spec.retriever not in pools or spec.pool == pools[spec.retriever]:
        return None
    fresh = DemoSpec(
        pools[spec.retriever], spec.k, spec.max_distance, spec.retriever, spec.max_chars
    )
    return baseline.with_extra("demos", fresh.to_dict())
