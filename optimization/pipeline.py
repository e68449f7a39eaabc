"""Pipelines on the optimizer's side: episodes as examples, and the chain evaluator.

A pipeline (see :mod:`promptd.replacement.pipelines`) is a chain of prompts whose
placeholders are bound to the episode's inputs or to earlier steps' outputs; the last
step's output is the pipeline's answer.

An **episode** is one run of the pipeline in production: the calls that share an
``episode_id``. As an example it carries the episode's inputs (what the first calls were
given from outside), every step's captured call, and the episode's feedback (its mean
score, and a correction of the final answer when someone gave one).

:class:`ChainEvaluator` scores a pipeline **end to end**: for each episode it renders the
first step with the episode's inputs, calls the model, feeds the output to the steps that
read it, and scores the final answer against the episode's trusted answer with the run's
metric. It has the evaluator's interface (``usable``, ``run``, ``scores``) for one step
at a time: :meth:`ChainEvaluator.for_step` substitutes a candidate program for that step
and keeps the others fixed, so every search strategy can optimize one prompt of a
pipeline by the whole pipeline's result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from promptd.demos import as_text
from promptd.optimization.evaluator import Evaluator, Scored, gather_all
from promptd.optimization.examples import Example
from promptd.optimization.llm import LLMError, Message
from promptd.optimization.program import Program
from promptd.replacement.pipelines import Pipeline, PipelineError, parse_source

__all__ = ["ChainEvaluator", "ChainResult", "Episode", "Pipeline", "PipelineError"]


@dataclass(frozen=True)
class Episode:
    """One production run of a pipeline, as an example."""

    episode_id: str
    inputs: Mapping[str, Any]
    calls: Mapping[str, Example]  # prompt -> that step's captured call
    score: float
    correction: str | None = None
    final_output: str | None = None
    comments: str | None = None

    @property
    def request_id(self) -> str:
        """Splits hash this (episodes split like calls do)."""
        return self.episode_id

    def reference(self, min_score: float) -> str | None:
        """The episode's trusted final answer: its correction, else its final output when
        the episode was rated at least ``min_score``."""
        if self.correction is not None:
            return self.correction
        if self.final_output is not None and self.score >= min_score:
            return self.final_output
        return None

    def as_example(self, prompt: str, final: bool = False) -> Example:
        """One step's call with the episode's feedback credited to it (for demonstrations
        and proposers). The episode's correction is the right answer of the ``final``
        step only: an intermediate step's right output is not known."""
        call = self.calls[prompt]
        correction = self.correction if final and self.correction is not None else call.correction
        return replace(
            call, score=self.score, comments=self.comments or call.comments, correction=correction
        )


@dataclass
class ChainResult:
    """One episode through the chain."""

    outputs: dict[str, str] = field(default_factory=dict)
    final: Scored | None = None


class ChainEvaluator:
    """Scores pipeline programs end to end (see the module docstring)."""

    def __init__(
        self,
        evaluator: Evaluator,
        pipeline: Pipeline,
        programs: Mapping[str, Program],
        step: str | None = None,
    ) -> None:
        self.evaluator = evaluator
        self.pipeline = pipeline
        self.programs = dict(programs)
        self.step = step or pipeline.prompts[-1]
        self.min_score = evaluator.min_score

    def for_step(
        self, prompt: str, programs: Mapping[str, Program] | None = None
    ) -> ChainEvaluator:
        """An evaluator whose candidate program stands in for ``prompt``."""
        if prompt not in self.pipeline.prompts:
            raise PipelineError(f"{prompt!r} is not a step of {self.pipeline.name!r}")
        return ChainEvaluator(self.evaluator, self.pipeline, programs or self.programs, prompt)

    def with_programs(self, programs: Mapping[str, Program]) -> ChainEvaluator:
        """The same step, other fixed programs."""
        return ChainEvaluator(self.evaluator, self.pipeline, programs, self.step)

    def usable(self, episode: Any, program: Program | None = None) -> bool:
        """An episode with every input the pipeline reads and, for reference metrics, a
        trusted final answer."""
        if not isinstance(episode, Episode):
            return False
        if self.evaluator.metric is not None and episode.reference(self.min_score) is None:
            return False
        return self.pipeline.inputs() <= set(episode.inputs)

    async def run(self, program: Program, episodes: Sequence[Any]) -> list[Scored]:
        """Final answers and scores with ``program`` in this evaluator's step."""
        programs = {**self.programs, self.step: program}
        return [r.final for r in await self.chains(programs, episodes) if r.final is not None]

    async def scores(self, program: Program, episodes: Sequence[Any]) -> list[float]:
        """Per-episode end-to-end scores with ``program`` in this evaluator's step."""
        return [s.score for s in await self.run(program, episodes)]

    async def pipeline_scores(
        self, programs: Mapping[str, Program], episodes: Sequence[Episode]
    ) -> list[float]:
        """Per-episode end-to-end scores of a whole set of programs."""
        results = await self.chains(programs, episodes)
        return [r.final.score if r.final is not None else 0.0 for r in results]

    async def chains(
        self, programs: Mapping[str, Program], episodes: Sequence[Episode]
    ) -> list[ChainResult]:
        """Every episode through every step (episodes in parallel, steps in order)."""
        return await gather_all([self._chain(programs, e) for e in episodes])

    async def _chain(self, programs: Mapping[str, Program], episode: Episode) -> ChainResult:
        result = ChainResult()
        reference = episode.reference(self.min_score) or ""
        messages: list[Message] = []
        for step in self.pipeline.steps:
            values = {
                placeholder: _value(source, episode, result.outputs)
                for placeholder, source in step.bindings.items()
            }
            program = programs[step.prompt]
            call = Example(episode.episode_id, "", 0.0, values, None, 0.0, 0, None, None)
            rendered = program.render(call)
            if rendered is None:
                result.final = Scored(episode.episode_id, [], "", reference, 0.0, "no render")
                return result
            messages = rendered
            model = self.evaluator.settings_for(program)
            try:
                answer = await self.evaluator.llm.complete(model, rendered, "evaluation")
            except LLMError as exc:
                if exc.retriable:
                    raise
                result.final = Scored(episode.episode_id, rendered, "", reference, 0.0, str(exc))
                return result
            result.outputs[step.prompt] = answer
        final = result.outputs[self.pipeline.prompts[-1]]
        score = await self.evaluator.score_answer(final, reference, messages)
        result.final = Scored(episode.episode_id, messages, final, reference, score)
        return result


def _value(source: str, episode: Episode, outputs: Mapping[str, str]) -> str:
    kind, name = parse_source(source)
    if kind == "input":
        value = episode.inputs.get(name, "")
        return value if isinstance(value, str) else as_text(value)
    return outputs[name]
