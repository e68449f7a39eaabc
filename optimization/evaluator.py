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
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog

from promptd.demos import demo_turns, fields_of, vote, with_turns
from promptd.optimization.config import EvaluationSettings, LLMSettings
from promptd.optimization.examples import Example
from promptd.optimization.llm import CachedLLM, LLMError, Message
from promptd.optimization.pools import DemoPools, PoolUnavailable
from promptd.optimization.program import Program
from promptd.optimization.scoring import JUDGE_PROMPT, MetricFn, load_metric, parse_judge

log = structlog.get_logger("promptd.optimizer")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Scored:
    """One template's answer on one example, with its score."""

    request_id: str
    prompt: list[Message]
    output: str
    reference: str
    score: float
    error: str | None = None


class Scorer(Protocol):
    """What a search scores candidates with: the :class:`Evaluator` on examples, or a
    pipeline's chain evaluator on episodes (one step's candidate, the others fixed)."""

    def usable(self, example: Any, program: Program) -> bool:
        """Whether ``example`` can score ``program``."""
        ...

    async def run(self, program: Program, examples: Sequence[Any]) -> list[Scored]:
        """Answers and scores of ``program`` on ``examples``."""
        ...

    async def scores(self, program: Program, examples: Sequence[Any]) -> list[float]:
        """Per-example scores of ``program``."""
        ...


async def gather_all(jobs: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Every job's result, in order; when one fails, the others are cancelled first.

    Plain ``asyncio.gather`` leaves the other jobs running after the first exception:
    calls that queued behind a spent budget would then run as soon as the gate's reserve
    is released, and spend it.
    """
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def messages_for(rendered: str) -> list[Message]:
    """The chat messages for a rendered template (the app's calls send one user turn)."""
    return [{"role": "user", "content": rendered}]


class Evaluator:
    """Scores templates on examples with the evaluation model and metric."""

    def __init__(
        self, llm: CachedLLM, settings: EvaluationSettings, pools: DemoPools | None = None
    ) -> None:
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
        # Where programs with per-request demonstrations retrieve them (the run's pools).
        self.pools = pools

    def usable(self, example: Example, program: Program) -> bool:
        """Whether ``example`` can score ``program`` (renders, and has a reference
        when the metric needs one)."""
        if self.metric is not None and example.reference(self.min_score) is None:
            return False
        return program.render(example) is not None

    def settings_for(self, program: Program) -> LLMSettings:
        """The evaluation model, with a chat configuration's model and parameters."""
        update: dict[str, object] = {}
        if program.model:
            update["model"] = program.model
        extra = dict(self.model.extra)
        for key, value in program.params:
            if key in ("temperature", "max_tokens"):
                update[key] = value
            else:
                extra[key] = value
        schema = program.extra("output_schema")
        if schema is not None:
            # Ask for the answer in the configuration's shape, as the app does.
            extra["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": schema},
            }
        if extra != self.model.extra:
            update["extra"] = extra
        return self.model.model_copy(update=update) if update else self.model

    async def run(self, program: Program, examples: Sequence[Example]) -> list[Scored]:
        """Answers and scores of ``program`` on ``examples`` (in their order)."""
        model = self.settings_for(program)
        return await gather_all([self._one(program, model, e) for e in examples])

    async def scores(self, program: Program, examples: Sequence[Example]) -> list[float]:
        """Per-example scores of ``program`` (in the order of ``examples``)."""
        return [s.score for s in await self.run(program, examples)]

    async def render(self, program: Program, example: Example) -> list[Message] | None:
        """The messages ``program`` sends for ``example``: with the demonstrations it
        retrieves for it from its pool (never the example itself, nor any example
        outside the train split), as the app's SDK would."""
        messages = program.render(example)
        spec = program.demo_spec()
        if messages is None or spec is None:
            return messages
        if self.pools is None:
            raise PoolUnavailable("this evaluator has no demonstration pools")
        template = program.final[1]
        demos = await self.pools.nearest(
            spec, fields_of(template), example.request_id, example.input
        )
        return with_turns(messages, demo_turns(template, demos, spec.max_chars))

    async def answer(self, program: Program, model: LLMSettings, messages: list[Message]) -> str:
        """The program's answer: one call, or its ensemble's vote over ``n`` samples (each
        sample cached under its own place, so a replay pays for none again)."""
        ensemble = program.ensemble()
        if ensemble is None:
            return await self.llm.complete(model, messages, "evaluation")
        sampled = model.model_copy(update={"temperature": ensemble.temperature})
        answers = await gather_all(
            [
                self.llm.complete(sampled, messages, "evaluation", nonce=f"sample:{i}")
                for i in range(ensemble.n)
            ]
        )
        return vote(answers, ensemble.answer)

    async def _one(self, program: Program, model: LLMSettings, example: Example) -> Scored:
        messages = await self.render(program, example)
        reference = example.reference(self.min_score) or ""
        if messages is None:
            return Scored(example.request_id, [], "", reference, 0.0, "template does not render")
        try:
            answer = await self.answer(program, model, messages)
        except LLMError as exc:
            if exc.retriable:
                raise
            self.errors += 1
            log.warning("optimizer_evaluation_refused", error=str(exc))
            return Scored(example.request_id, messages, "", reference, 0.0, str(exc))
        score = await self.score_answer(answer, reference, messages, example)
        return Scored(example.request_id, messages, answer, reference, score)

    async def score_answer(
        self,
        answer: str,
        reference: str,
        messages: list[Message],
        example: Example | None = None,
    ) -> float:
        """The metric's score of ``answer`` (a judge call for ``llm_judge``)."""
        if self.metric is not None:
            return self.metric(answer, reference, example)
        task = "\n\n".join(f"[{m['role']}] {m['content']}" for m in messages)
        verdict = await self.llm.complete(
            self.judge,
            messages_for(JUDGE_PROMPT.format(task=task, reference=reference, answer=answer)),
            "judge",
        )
        return parse_judge(verdict)
