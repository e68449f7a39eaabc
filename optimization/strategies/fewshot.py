"""``fewshot``: random search over demonstration sets (BootstrapFewShotWithRandomSearch).

Demonstrations come from the train split only: examples with a trusted answer — their
correction (the best demonstrations there are, and what lets a bad prompt bootstrap),
else their own output when it was rated at least ``fewshot.min_score``. The first
candidate takes ``max_demos`` examples spread over the inputs (greedy max-min diversity);
the others take random subsets of random size. Every candidate is the active program
with its demonstrations replaced by the set (a block of the template in text mode,
user/assistant turns in chat mode), scored on the validation split.

Without an evaluation model there is nothing to search with: the diverse set is proposed
unscored, and the online rollout decides.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from promptd.demos import as_text
from promptd.optimization.config import OptimizationSettings
from promptd.optimization.examples import Example
from promptd.optimization.llm import BudgetExceeded
from promptd.optimization.strategies.base import SearchContext, SearchResult


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def diverse(examples: Sequence[Example], k: int) -> list[Example]:
    """Up to ``k`` examples spread over the inputs (greedy max-min Jaccard distance),
    starting from the first (corrections first, then the best rated)."""
    pool = sorted(examples, key=lambda e: (e.correction is None, -e.score, e.request_id))
    if not pool:
        return []
    tokens = {e.request_id: _tokens(as_text(e.input)) for e in pool}
    chosen = [pool.pop(0)]

    def distance(e: Example) -> float:
        sims = []
        for c in chosen:
            a, b = tokens[e.request_id], tokens[c.request_id]
            union = a | b
            sims.append(len(a & b) / len(union) if union else 1.0)
        return 1.0 - max(sims)

    while pool and len(chosen) < k:
        best = max(pool, key=distance)
        pool.remove(best)
        chosen.append(best)
    return chosen


class FewShotSearch:
    """Random search over demonstration sets."""

    name = "fewshot"
    pipelines = True

    def unavailable(self, settings: OptimizationSettings) -> str | None:
        """Always available (without an evaluation model it proposes one set unscored)."""
        return None

    async def search(self, ctx: SearchContext) -> SearchResult:
        """Score ``fewshot.num_candidates`` demonstration sets on validation."""
        result = SearchResult()
        conf = ctx.settings.fewshot
        pool = ctx.demo_pool()
        if not pool:
            result.notes.append(
                "no training example has a correction or an output rated "
                f">= {conf.min_score}: nothing to demonstrate"
            )
            return result
        rng = ctx.rng(self.name)
        sets = [diverse(pool, conf.max_demos)]
        if ctx.evaluator is not None:
            for _ in range(conf.num_candidates - 1):
                k = rng.randint(1, min(conf.max_demos, len(pool)))
                sets.append(rng.sample(pool, k))
        try:
            for i, demos in enumerate(sets):
                program = ctx.baseline.with_demos(demos, conf.max_demo_chars, conf.min_score)
                await ctx.evaluate(
                    program,
                    self.name,
                    f"{len(demos)} demonstrations from the train split"
                    + (" (spread over the inputs)" if i == 0 else " (random set)"),
                    result,
                    {"demos": [d.request_id for d in demos]},
                )
        except BudgetExceeded as exc:
            result.stopped = str(exc)
        return result
