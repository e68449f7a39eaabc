"""The one evaluator: render a template on an example, call the model, score the answer.

Every strategy's search and the gate score templates through one :class:`Evaluator`,
so they share the run's budget and the persistent call cache (see
:class:`~promptd.optimization.llm.CachedLLM`): the active version's answers are paid for
once and reused by every strategy, run and restart, and so is any candidate seen before.

An example is **usable** when the template renders on it and, for reference metrics,
when it has a trusted answer (its correction, else its own output rated at least
``reference_min_score``); ``llm_judge`` needs no reference. A model error that retrying
cannot fix (a request the provider refuses) scores that example 0 for that template, as
a broken answer would; transient errors that outlast the retries end the search.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from promptd.optimization.config import EvaluationSettings, LLMSettings
from promptd.optimization.examples import Example
from promptd.optimization.llm import CachedLLM, LLMError, Message
from promptd.optimization.scoring import JUDGE_PROMPT, MetricFn, load_metric, parse_judge
from promptd.optimization.templates import render

log = structlog.get_logger("promptd.optimizer")


@dataclass(frozen=True, slots=True)
class Scored:
    """One template's answer on one example, with its score."""

    request_id: str
    prompt: str
    output: str
    reference: str
    score: float
    error: str | None = None


def messages_for(rendered: str) -> list[Message]:
    """The chat messages for a rendered template (the app's calls send one user turn)."""
    return [{"role": "user", "content": rendered}]


class Evaluator:
    """Scores templates on examples with the evaluation model and metric."""

    def __init__(self, llm: CachedLLM, settings: EvaluationSettings) -> None:
        if settings.model is None:
            raise ValueError("the evaluator needs optimization.evaluation.model")
        self.llm = llm
        self.model: LLMSettings = settings.model
        self.judge: LLMSettings = settings.judge or settings.model
        self.metric_name = settings.metric
        self.metric: MetricFn | None = (
            None if settings.metric == "llm_judge" else load_metric(settings.metric)
        )
        self.min_score = settings.reference_min_score
        self.errors = 0

    def usable(self, example: Example, template: str) -> bool:
        """Whether ``example`` can score ``template`` (renders, and has a reference
        when the metric needs one)."""
        if self.metric is not None and example.reference(self.min_score) is None:
            return False
        return render(template, example) is not None

    async def run(self, template: str, examples: Sequence[Example]) -> list[Scored]:
        """Answers and scores of ``template`` on ``examples`` (in their order)."""
        return list(await asyncio.gather(*(self._one(template, e) for e in examples)))

    async def scores(self, template: str, examples: Sequence[Example]) -> list[float]:
        """Per-example scores of ``template`` (in the order of ``examples``)."""
        return [s.score for s in await self.run(template, examples)]

    async def _one(self, template: str, example: Example) -> Scored:
        rendered = render(template, example)
        reference = example.reference(self.min_score) or ""
        if rendered is None:
            return Scored(example.request_id, "", "", reference, 0.0, "template does not render")
        try:
            answer = await self.llm.complete(self.model, messages_for(rendered), "evaluation")
        except LLMError as exc:
            if exc.retriable:
                raise
            self.errors += 1
            log.warning("optimizer_evaluation_refused", error=str(exc))
            return Scored(example.request_id, rendered, "", reference, 0.0, str(exc))
        if self.metric is not None:
            score = self.metric(answer, reference, example)
        else:
            verdict = await self.llm.complete(
                self.judge,
                messages_for(
                    JUDGE_PROMPT.format(task=rendered, reference=reference, answer=answer)
                ),
                "judge",
            )
            score = parse_judge(verdict)
        return Scored(example.request_id, rendered, answer, reference, score)
