"""``instruction``: instruction rewrites that learn from their scores (COPRO).

Round 0 asks the proposer for ``n_candidates`` new instructions, each with a different
tip, shown the task as the model sees it and training examples with their ratings,
feedback and correct answers. Every proposal replaces the active program's instruction
(the lines before the input block of a template, the system message of a chat
configuration; demonstrations and input stay) and is scored on the validation split. Each
later round shows the proposer every instruction tried so far with its validation score,
the active one included, and asks for better ones (``depth`` rounds in all).

The proposer writes only the instruction, between ``<instruction>`` tags, so it never
has to copy placeholders (small models lose them) and never sees a template in the tags
it must answer in (small models echo it back).
"""

from __future__ import annotations

import asyncio

import structlog

from promptd.optimization.config import OptimizationSettings
from promptd.optimization.llm import BudgetExceeded, LLMError
from promptd.optimization.strategies.base import (
    TIPS,
    Candidate,
    SearchContext,
    SearchResult,
    needs_models,
    parse_instruction,
    proposal_messages,
)

log = structlog.get_logger("promptd.optimizer")


class InstructionSearch:
    """Breadth x depth instruction search with scores fed back to the proposer."""

    name = "instruction"
    pipelines = True

    def unavailable(self, settings: OptimizationSettings) -> str | None:
        """Needs a proposer and an evaluation model."""
        return needs_models(settings)

    async def search(self, ctx: SearchContext) -> SearchResult:
        """``depth`` rounds of ``n_candidates`` proposals, each scored on validation."""
        result = SearchResult()
        conf = ctx.settings.instruction
        current = ctx.baseline.instruction()
        baseline_mean = ctx.baseline_val_mean
        tried: list[tuple[str, float]] = [(current or "(none)", baseline_mean)]
        try:
            for depth in range(conf.depth):
                proposals = await asyncio.gather(
                    *(
                        self._propose(ctx, current, tried, depth, i, conf.worst_examples)
                        for i in range(conf.n_candidates)
                    ),
                    return_exceptions=True,
                )
                for i, proposal in enumerate(proposals):
                    if isinstance(proposal, BudgetExceeded):
                        raise proposal
                    if isinstance(proposal, LLMError):
                        result.discarded["llm_error"] += 1
                        log.warning(
                            "optimizer_proposer_failed", run_id=ctx.run_id, error=str(proposal)
                        )
                        continue
                    if isinstance(proposal, BaseException):
                        raise proposal
                    if proposal is None:
                        result.discarded["malformed"] += 1
                        continue
                    cand = await ctx.evaluate(
                        ctx.baseline.with_instruction(proposal),
                        self.name,
                        f"round {depth + 1}, proposal {i + 1}: {proposal}",
                        result,
                        {"round": depth, "instruction": proposal},
                    )
                    if cand is not None:
                        tried.append((proposal, _mean(cand)))
        except BudgetExceeded as exc:
            result.stopped = str(exc)
        return result

    async def _propose(
        self,
        ctx: SearchContext,
        current: str,
        tried: list[tuple[str, float]],
        depth: int,
        i: int,
        n_examples: int,
    ) -> str | None:
        tip = TIPS[(depth * 7 + i) % len(TIPS)]
        messages = proposal_messages(ctx, current, tried if depth else [], tip, n_examples)
        answer = await ctx.propose(messages, f"{self.name}:{depth}:{i}")
        return parse_instruction(answer)


def _mean(cand: Candidate) -> float:
    return cand.val_mean if cand.val_mean is not None else 0.0
