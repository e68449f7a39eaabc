"""Running the evaluators of one call: ``only_if``, outage state, budget, then the check
or the judge. The engine calls :meth:`Runner.evaluate` from its workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from promptd.optimization.config import LLMSettings
from promptd.optimization.llm import Completion, LLMError

from . import judge as judging
from .budget import Budget, Refusal
from .calls import Call, Verdict
from .checks import function_verdict, run_check
from .config import (
    CodeCheck,
    EvaluationSettings,
    Evaluator,
    FunctionCheck,
    JudgeEvaluator,
    load_function,
)
from .health import Change, Health
from .metrics import EvaluationMetrics

log = structlog.get_logger("promptd.evaluation")

SchemaLookup = Callable[[str, str], Awaitable[dict[str, Any] | None]]
CorrectionLookup = Callable[[str], Awaitable[str | None]]
#: Called when an evaluator goes down (``True``) or comes back (``False``), with why.
OutageHook = Callable[[str, bool, str], None]


class JudgeClient(Protocol):
    """What answers the judge (``optimization.llm.LiteLLMClient`` in the daemon)."""

    async def complete(
        self, llm: LLMSettings, messages: list[dict[str, str]], purpose: str
    ) -> Completion:
        """The judge's answer."""
        ...


@dataclass
class EvaluatorState:
    """What the runner keeps per evaluator: budget, outage state, counts since start."""

    budget: Budget
    health: Health
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        """Add to a count since start (sampled, scored, skipped reasons ...)."""
        self.counts[what] = self.counts.get(what, 0) + n


class Runner:
    """Decides each sampled (call, evaluator) pair."""

    def __init__(
        self,
        settings: EvaluationSettings,
        metrics: EvaluationMetrics,
        clients: Mapping[str, JudgeClient],
        schema_of: SchemaLookup,
        correction_of: CorrectionLookup,
        on_outage: OutageHook,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        # One client per judge (each has its own retries).
        self.clients = clients
        self.schema_of = schema_of
        self.correction_of = correction_of
        self.on_outage = on_outage
        self.clock = clock
        self.checks: dict[str, CodeCheck] = {
            e.name: e for e in settings.evaluators if not isinstance(e, JudgeEvaluator)
        }
        self.functions = {
            e.name: load_function(e.function)
            for e in settings.evaluators
            if isinstance(e, FunctionCheck)
        }
        self.state = {
            e.name: EvaluatorState(
                Budget(e.max_calls_per_minute, e.max_cost_usd_per_day),
                Health(settings.outage_after_failures, settings.probe_interval_s),
            )
            for e in settings.evaluators
        }
        for e in settings.evaluators:
            metrics.up.labels(evaluator=e.name).set(1)
            metrics.zero(e.name)

    def skip(self, evaluator: str, reason: str, n: int = 1) -> None:
        """Count ``n`` sampled calls of ``evaluator`` not evaluated, and why."""
        self.state[evaluator].count(f"skipped_{reason}", n)
        self.metrics.skipped.labels(evaluator=evaluator, reason=reason).inc(n)

    async def evaluate(self, call: Call, evaluators: Sequence[Evaluator]) -> list[Verdict]:
        """The verdicts of ``evaluators`` on ``call`` (code checks first, so ``only_if``
        reuses them); skipped ones are counted and left out."""
        done: dict[str, Verdict] = {}
        out: list[Verdict] = []
        for e in sorted(evaluators, key=lambda e: e.is_judge):
            started = time.perf_counter()
            verdict = await self._one(e, call, done)
            if verdict is not None:
                self.metrics.duration.labels(evaluator=e.name).observe(
                    time.perf_counter() - started
                )
                done[e.name] = verdict
                out.append(verdict)
        return out

    async def _one(self, e: Evaluator, call: Call, done: dict[str, Verdict]) -> Verdict | None:
        state = self.state[e.name]
        if isinstance(e, JudgeEvaluator):
            failed = await self._failed_only_if(e, call, done)
            if failed is not None:
                self.skip(e.name, "only_if")
                return None
        now = self.clock()
        if not state.health.may_try(now):
            self.skip(e.name, "outage")
            return None
        refusal: Refusal | None = state.budget.admit(now)
        if refusal is not None:
            self.skip(e.name, refusal)
            return None
        if isinstance(e, JudgeEvaluator):
            return await self._judge(e, call, state)
        return await self._check(e, call)

    async def _check(self, check: CodeCheck, call: Call) -> Verdict:
        if isinstance(check, FunctionCheck):
            fn = self.functions[check.name]
            try:
                return await asyncio.wait_for(
                    asyncio.to_thread(function_verdict, check, fn, call), check.timeout_s
                )
            except TimeoutError:
                detail = f"{check.function} took over {check.timeout_s:g} s"
                return Verdict(check.name, check.type, "scored", 0.0, detail)
        schema = await self.schema_of(call.prompt, call.variant)
        return run_check(check, call, schema)

    async def _failed_only_if(
        self, judge: JudgeEvaluator, call: Call, done: dict[str, Verdict]
    ) -> str | None:
        """The first ``only_if`` check the output fails (run here when not done yet)."""
        for name in judge.only_if:
            verdict = done.get(name)
            if verdict is None:
                verdict = await self._check(self.checks[name], call)
            if not verdict.passed:
                return name
        return None

    async def _judge(self, e: JudgeEvaluator, call: Call, state: EvaluatorState) -> Verdict | None:
        reference = None
        if e.use_reference:
            reference = judging.reference_text(await self.correction_of(call.request_id))
        messages = judging.messages(e, call, reference)
        try:
            answer = await self.clients[e.name].complete(e.llm(), messages, f"evaluation:{e.name}")
        except LLMError as exc:
            self._failed(e.name, state, str(exc))
            self.skip(e.name, "error")
            return None
        self._succeeded(e.name, state)
        now = self.clock()
        state.budget.spend(answer.cost_usd, now)
        if answer.cost_usd:
            self.metrics.cost.labels(evaluator=e.name).inc(answer.cost_usd)
        score, detail = judging.verdict_of(e, answer.text, answer.top_logprobs)
        if score is None:
            return Verdict(e.name, e.type, "invalid", None, detail, answer.cost_usd)
        return Verdict(e.name, e.type, "scored", score, detail, answer.cost_usd)

    def _failed(self, name: str, state: EvaluatorState, error: str) -> None:
        change: Change = state.health.failed(self.clock(), error)
        log.warning("evaluator_failed", evaluator=name, error=error[:500])
        if change == "down":
            self.metrics.up.labels(evaluator=name).set(0)
            log.error("evaluator_down", evaluator=name, error=error[:500])
            self.on_outage(name, True, error)

    def _succeeded(self, name: str, state: EvaluatorState) -> None:
        if state.health.succeeded() == "up":
            self.metrics.up.labels(evaluator=name).set(1)
            log.info("evaluator_up", evaluator=name)
            self.on_outage(name, False, "answered again")

    def outages(self) -> list[str]:
        """One line per evaluator that is down (the readiness detail)."""
        out = []
        for name, state in self.state.items():
            h = state.health
            if h.down_since is not None:
                since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(h.down_since))
                error = (h.last_error or "")[:200]
                out.append(
                    f"evaluator {name!r} down since {since} after "
                    f"{h.consecutive_failures} failures in a row: {error}"
                )
        return out
