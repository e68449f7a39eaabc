"""``gepa``: the ``gepa`` package's reflective evolutionary search, through promptd's adapter.

GEPA evolves the text of named components; promptd gives it one, ``instruction``: the
active template's instruction (its input block and demonstrations stay, see
:func:`~promptd.optimization.strategies.base.with_instruction`). Our side of gepa's
``GEPAAdapter`` boundary:

* ``evaluate`` renders the program with the component's text on each example and
  scores it through the run's evaluator: promptd's model settings (``api_base``, key
  variable), metric, budget and call cache;
* ``make_reflective_dataset`` shows the reflection model each example's input, the
  model's answer, its score and the correct answer (the example's correction, else its
  well-rated output), with the production feedback when there is some;
* the reflection model is promptd's proposer, called through the same cache and budget.

gepa is synchronous, so it runs in a worker thread, and every model call it makes hops
back onto the event loop. It stops when it has used its metric calls, when the run's
budget is spent, or when the run is cancelled (timeout, shutdown): a stop flag ends it at
its next step, and calls in flight are cancelled. The candidates it found are re-scored
on the validation split (from the cache) and returned like any strategy's. Every batch
gepa scores is recorded in the run as it happens (a trial with the candidate's text), so
a running gepa search shows its candidates and, through the run's spend, its calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import importlib.util
import threading
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import structlog

from promptd.demos import as_text
from promptd.optimization.config import OptimizationSettings
from promptd.optimization.evaluator import Scored
from promptd.optimization.examples import Example
from promptd.optimization.llm import BudgetExceeded, Message
from promptd.optimization.program import Program
from promptd.optimization.strategies.base import SearchContext, SearchResult, needs_models
from promptd.optimization.templates import clip

log = structlog.get_logger("promptd.optimizer")

T = TypeVar("T")
COMPONENT = "instruction"


class GepaStopped(Exception):
    """The run asked gepa to stop (budget spent, timeout, shutdown)."""


class PromptdGepaAdapter:
    """promptd's side of gepa's ``GEPAAdapter`` protocol (used from gepa's thread)."""

    # gepa's default reflective proposer, fed by :meth:`reflect`, writes new texts.
    propose_new_texts = None

    def __init__(self, ctx: SearchContext, loop: asyncio.AbstractEventLoop) -> None:
        self.ctx = ctx
        self.loop = loop
        self.stop = threading.Event()
        self.budget_spent: str | None = None
        self.reflections = 0
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()

    # -- bridging onto the event loop ---------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.stop.is_set():
            coro.close()
            raise GepaStopped("stopped")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        with self._lock:
            self._futures.add(future)
        try:
            return future.result()
        except BudgetExceeded as exc:
            self.budget_spent = str(exc)
            self.stop.set()
            raise GepaStopped(str(exc)) from None
        except concurrent.futures.CancelledError:
            raise GepaStopped("cancelled") from None
        finally:
            with self._lock:
                self._futures.discard(future)

    def halt(self) -> None:
        """Stop gepa at its next step and cancel the calls it has in flight."""
        self.stop.set()
        with self._lock:
            for future in list(self._futures):
                future.cancel()

    def should_stop(self, _state: Any) -> bool:
        """gepa's stop callback."""
        return self.stop.is_set()

    def log(self, message: str) -> None:
        """gepa's logger: into ours, at debug level (it is chatty)."""
        log.debug("gepa_log", run_id=self.ctx.run_id, message=message[:2_000])

    # -- GEPAAdapter ------------------------------------------------------------------------

    def program(self, candidate: Mapping[str, str]) -> Program:
        """The full program for a gepa candidate."""
        return self.ctx.baseline.with_instruction(candidate[COMPONENT])

    def evaluate(
        self, batch: list[Example], candidate: dict[str, str], capture_traces: bool = False
    ) -> Any:
        """Score ``candidate`` on ``batch`` with promptd's evaluator."""
        from gepa.core.adapter import EvaluationBatch

        scored = self._call(self._scored(candidate, batch))
        return EvaluationBatch(
            outputs=[s.output for s in scored],
            scores=[s.score for s in scored],
            trajectories=list(zip(batch, scored, strict=True)) if capture_traces else None,
        )

    async def _scored(self, candidate: Mapping[str, str], batch: list[Example]) -> list[Scored]:
        """Score on the event loop and record the evaluation as a trial of the run, so
        the run shows gepa's candidates and calls while it works."""
        assert self.ctx.evaluator is not None
        scored = await self.ctx.evaluator.run(self.program(candidate), batch)
        await self.ctx.record(
            GepaSearch.name,
            "gepa",
            [s.score for s in scored],
            {COMPONENT: candidate[COMPONENT][:1_000]},
        )
        return scored

    def make_reflective_dataset(
        self,
        candidate: dict[str, str],
        eval_batch: Any,
        components_to_update: list[str],
    ) -> dict[str, list[dict[str, Any]]]:
        """Per component: each example's input, answer, score and what was right."""
        limit = self.ctx.settings.instruction.max_example_chars
        records = []
        for example, scored in eval_batch.trajectories or []:
            records.append(
                {
                    "Inputs": clip(as_text(example.input), limit),
                    "Generated Outputs": clip(scored.output, limit),
                    "Feedback": _feedback(example, scored, limit),
                }
            )
        return dict.fromkeys(components_to_update, records)

    def reflect(self, prompt: str | list[dict[str, Any]]) -> str:
        """gepa's reflection model: promptd's proposer, cached and budgeted."""
        messages: list[Message] = (
            [{"role": "user", "content": prompt}]
            if isinstance(prompt, str)
            else [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
        )
        # gepa reflects one call at a time from its thread: the counter is deterministic.
        self.reflections += 1
        return self._call(self.ctx.propose(messages, f"gepa:reflect:{self.reflections}"))


def _feedback(example: Example, scored: Scored, limit: int) -> str:
    parts = [f"Score {scored.score:.2f} (1 is perfect)."]
    if scored.error:
        parts.append(f"The call failed: {scored.error}.")
    if scored.reference:
        parts.append(f"The correct answer is: {clip(scored.reference, limit)}")
    if example.comments:
        parts.append(f"User feedback: {clip(example.comments, limit)}")
    return " ".join(parts)


class GepaSearch:
    """GEPA through :class:`PromptdGepaAdapter`."""

    name = "gepa"
    # gepa's adapter reads one prompt's training examples; a pipeline step is scored on
    # episodes.
    pipelines = False

    def unavailable(self, settings: OptimizationSettings) -> str | None:
        """Needs the ``gepa`` package, a proposer and an evaluation model."""
        if importlib.util.find_spec("gepa") is None:
            return "the gepa strategy needs the optional package: pip install 'promptd[gepa]'"
        return needs_models(settings)

    async def search(self, ctx: SearchContext) -> SearchResult:
        """Run gepa in a worker thread; return its best candidates, scored on validation."""
        result = SearchResult()
        assert ctx.evaluator is not None
        train = [e for e in ctx.train if ctx.evaluator.usable(e, ctx.baseline)]
        if not train:
            result.notes.append("gepa needs training examples with a correct answer")
            return result
        loop = asyncio.get_running_loop()
        adapter = PromptdGepaAdapter(ctx, loop)
        calls = ctx.settings.gepa.max_metric_calls or max(1, int(ctx.remaining_calls()))
        seed = {COMPONENT: ctx.baseline.instruction() or "Answer the input."}
        job = loop.run_in_executor(None, self._run, adapter, seed, train, ctx, calls)
        try:
            outcome = await asyncio.shield(job)
        except asyncio.CancelledError:
            adapter.halt()
            # The thread notices the flag at its next step; do not leave it running.
            await asyncio.wait({job}, timeout=10.0)
            raise
        if adapter.budget_spent:
            result.stopped = adapter.budget_spent
        await self._collect(ctx, adapter, outcome, result)
        return result

    @staticmethod
    def _run(
        adapter: PromptdGepaAdapter,
        seed: dict[str, str],
        train: Sequence[Example],
        ctx: SearchContext,
        calls: int,
    ) -> Any:
        gepa = importlib.import_module("gepa")
        return gepa.optimize(
            seed_candidate=seed,
            trainset=list(train),
            valset=list(ctx.validation),
            adapter=adapter,
            reflection_lm=adapter.reflect,
            reflection_minibatch_size=ctx.settings.gepa.reflection_minibatch_size,
            max_metric_calls=calls,
            stop_callbacks=adapter.should_stop,
            logger=adapter,
            seed=ctx.seed % 2**31,
            raise_on_exception=False,
            display_progress_bar=False,
        )

    async def _collect(
        self, ctx: SearchContext, adapter: PromptdGepaAdapter, outcome: Any, result: SearchResult
    ) -> None:
        found = list(zip(outcome.candidates, outcome.val_aggregate_scores, strict=False))[1:]
        found.sort(key=lambda cs: -cs[1])
        for candidate, score in found[:3]:
            try:
                await ctx.evaluate(
                    adapter.program(candidate),
                    self.name,
                    f"GEPA reflective search (gepa validation mean {score:.3f})",
                    result,
                    {COMPONENT: candidate[COMPONENT]},
                )
            except BudgetExceeded as exc:
                result.stopped = str(exc)
                return
