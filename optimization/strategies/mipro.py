"""``mipro``: instructions x demonstration sets, searched jointly with TPE (MIPROv2).

1. **Instructions**: the active one plus ``num_instructions - 1`` proposals, each asked
   with a different tip and grounded in training examples.
2. **Demonstration sets**: none, the diverse set, and random subsets of the train split's
   demonstrations (``num_demo_sets`` in all; only "none" when there are no demonstrations).
   For a chat configuration whose ``tunable`` lists models or temperatures, those are two
   more dimensions (the configuration's own model and temperature among them).
3. **Search**: ``num_trials`` trials of optuna's TPE sampler (seeded by the run) over
   (instruction, demonstration set[, model, temperature]), through optuna's
   ask-and-tell interface; each trial scores its program on a random validation
   minibatch.
4. **Re-scoring**: the ``top_k_full_eval`` pairs with the best minibatch means are
   scored on the whole validation split; those are the strategy's candidates.

The study is rebuilt by replay on resume: the sampler is seeded, and every minibatch
score comes back from the call cache, so a resumed run asks the same trials again and
continues where it stopped without paying twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import structlog

from promptd.optimization.config import OptimizationSettings
from promptd.optimization.examples import Example
from promptd.optimization.llm import BudgetExceeded, LLMError
from promptd.optimization.program import Program
from promptd.optimization.strategies.base import (
    TIPS,
    SearchContext,
    SearchResult,
    needs_models,
    parse_instruction,
    proposal_messages,
)
from promptd.optimization.strategies.fewshot import diverse

log = structlog.get_logger("promptd.optimizer")


class MiproSearch:
    """Joint instruction and demonstration search with a TPE sampler."""

    name = "mipro"
    pipelines = True

    def unavailable(self, settings: OptimizationSettings) -> str | None:
        """Needs a proposer and an evaluation model."""
        return needs_models(settings)

    async def search(self, ctx: SearchContext) -> SearchResult:
        """Propose instructions, build demonstration sets, run the TPE study, re-score."""
        result = SearchResult()
        try:
            instructions = await self._instructions(ctx, result)
            demo_sets = self._demo_sets(ctx)
            space = Space(instructions, demo_sets, *_tunable(ctx.baseline))
            ranked = await self._study(ctx, space)
            conf = ctx.settings.mipro
            for choice, mean in ranked[: conf.top_k_full_eval]:
                i, j, m, t = choice
                await ctx.evaluate(
                    self._build(ctx, space, choice),
                    self.name,
                    f"instruction {i} x demonstration set {j}"
                    + (f" x model {space.models[m]}" if m else "")
                    + (f" x temperature {space.temperatures[t]}" if t else "")
                    + f" (minibatch mean {mean:.3f})",
                    result,
                    {
                        "instruction": instructions[i],
                        "demos": [d.request_id for d in demo_sets[j]],
                        "model": space.models[m],
                        "temperature": space.temperatures[t],
                        "minibatch_mean": round(mean, 6),
                    },
                )
        except BudgetExceeded as exc:
            result.stopped = str(exc)
        return result

    async def _instructions(self, ctx: SearchContext, result: SearchResult) -> list[str]:
        conf = ctx.settings.mipro
        current = ctx.baseline.instruction()
        answers = await asyncio.gather(
            *(
                ctx.propose(
                    proposal_messages(
                        ctx,
                        current,
                        [],
                        TIPS[i % len(TIPS)],
                        ctx.settings.instruction.worst_examples,
                    ),
                    f"{self.name}:instruction:{i}",
                )
                for i in range(conf.num_instructions - 1)
            ),
            return_exceptions=True,
        )
        out = [current]
        for answer in answers:
            if isinstance(answer, BudgetExceeded):
                raise answer
            if isinstance(answer, LLMError):
                result.discarded["llm_error"] += 1
                continue
            if isinstance(answer, BaseException):
                raise answer
            parsed = parse_instruction(answer)
            if parsed is None or parsed in out:
                result.discarded["malformed" if parsed is None else "duplicate"] += 1
                continue
            out.append(parsed)
        return out

    def _demo_sets(self, ctx: SearchContext) -> list[list[Example]]:
        conf = ctx.settings.mipro
        pool = ctx.demo_pool()
        sets: list[list[Example]] = [[]]
        if not pool:
            return sets
        k_max = min(ctx.settings.fewshot.max_demos, len(pool))
        sets.append(diverse(pool, k_max))
        rng = ctx.rng(self.name, "demos")
        while len(sets) < conf.num_demo_sets:
            sets.append(rng.sample(pool, rng.randint(1, k_max)))
        return sets

    def _build(self, ctx: SearchContext, space: Space, choice: Choice) -> Program:
        i, j, m, t = choice
        base = ctx.baseline.without_demos()
        if i:
            base = base.with_instruction(space.instructions[i])
        if space.demo_sets[j]:
            conf = ctx.settings.fewshot
            base = base.with_demos(space.demo_sets[j], conf.max_demo_chars, conf.min_score)
        if m or t:
            params = {"temperature": space.temperatures[t]} if t else {}
            base = base.with_model(space.models[m], params)
        return base

    async def _study(self, ctx: SearchContext, space: Space) -> list[tuple[Choice, float]]:
        """The TPE study; choices ranked by mean minibatch score (best first)."""
        conf = ctx.settings.mipro
        rng = ctx.rng(self.name, "minibatch")
        size = min(conf.minibatch_size, len(ctx.validation))

        async def objective(choice: Choice) -> float:
            batch = rng.sample(ctx.validation, size)
            program = self._build(ctx, space, choice)
            return await ctx.trial(program, batch, self.name, _trial_details(choice))

        values = await study(space.sizes(), conf.num_trials, ctx.seed, objective)
        means = {choice: sum(v) / len(v) for choice, v in values.items()}
        # Index 0 everywhere is the active program itself.
        means.pop((0, 0, 0, 0), None)
        return sorted(means.items(), key=lambda kv: (-kv[1], kv[0]))


async def study(
    sizes: Choice, trials: int, seed: int, objective: Callable[[Choice], Awaitable[float]]
) -> dict[Choice, list[float]]:
    """``trials`` asks of optuna's TPE sampler (seeded) over the grid ``sizes``, each told
    its objective value; every choice's values, in asking order. Stops at the budget."""
    optuna = _optuna()
    sampler = optuna.samplers.TPESampler(
        seed=seed % 2**31, n_startup_trials=max(1, min(5, trials // 3))
    )
    tpe = optuna.create_study(direction="maximize", sampler=sampler)
    values: dict[Choice, list[float]] = defaultdict(list)
    names = ("instruction", "demos", "model", "temperature")
    for _ in range(trials):
        trial = tpe.ask()
        i, j, m, t = (_pick(trial, name, size) for name, size in zip(names, sizes, strict=True))
        choice: Choice = (i, j, m, t)
        try:
            value = await objective(choice)
        except BudgetExceeded:
            tpe.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        tpe.tell(trial, value)
        values[choice].append(value)
    return values


Choice = tuple[int, int, int, int]  # instruction, demonstration set, model, temperature


@dataclass(frozen=True)
class Space:
    """What the study searches; index 0 of each dimension is the active program's."""

    instructions: list[str]
    demo_sets: list[list[Example]]
    models: list[str | None]
    temperatures: list[float | None]

    def sizes(self) -> Choice:
        """The size of each dimension."""
        return (
            len(self.instructions),
            len(self.demo_sets),
            len(self.models),
            len(self.temperatures),
        )


def _tunable(baseline: Program) -> tuple[list[str | None], list[float | None]]:
    """Models and temperatures a chat configuration allows the optimizer to try."""
    models: list[str | None] = [baseline.model]
    temperatures: list[float | None] = [None]
    tunable = baseline.extra("tunable") if baseline.chat else None
    if tunable:
        models += [m for m in tunable.get("models", []) if m != baseline.model]
        temperatures += [float(t) for t in tunable.get("temperature", [])]
    return models, temperatures


def _trial_details(choice: Choice) -> dict[str, int]:
    i, j, m, t = choice
    return {"instruction": i, "demo_set": j, "model": m, "temperature": t}


def _pick(trial: Any, name: str, size: int) -> int:
    """A categorical index (a one-value dimension asks optuna nothing)."""
    return int(trial.suggest_categorical(name, list(range(size)))) if size > 1 else 0


_optuna_module: ModuleType | None = None


def _optuna() -> ModuleType:
    """optuna, imported on first use, its own log handler off (logs go through ours)."""
    global _optuna_module
    if _optuna_module is None:
        import optuna

        optuna.logging.set_verbosity(logging.WARNING)
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
        _optuna_module = optuna
    return _optuna_module
