"""The optimizer's edge to language models: a small protocol and its litellm implementation.

Every model call of a run (proposer, evaluation, judge) goes through one
:class:`LiteLLMClient` that shares the run's :class:`Budget`, so ``max_llm_calls`` and
``max_cost_usd`` hold across strategies and the gate. litellm is imported lazily (it
takes seconds to import and is not needed by the rest of the daemon) and told to use its
bundled cost map, so it never fetches prices from the internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import warnings
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import structlog

from promptd.daemon.optimize_config import LLMSettings

log = structlog.get_logger("promptd.optimizer")

Message = dict[str, str]


class OptimizerError(Exception):
    """Root of the optimizer's errors; ``retriable`` says whether a retry may help."""

    retriable = False


class BudgetExceeded(OptimizerError):
    """The run's call or cost budget is spent; the run stops generating cleanly."""

    def __init__(self, what: str, used: float, limit: float) -> None:
        super().__init__(f"{what} budget spent ({used:g} of {limit:g})")
        self.what = what
        self.used = used
        self.limit = limit


class LLMError(OptimizerError):
    """A model call failed (after retries for retriable errors)."""

    def __init__(self, model: str, message: str, retriable: bool = False) -> None:
        super().__init__(f"{model}: {message}")
        self.model = model
        self.retriable = retriable


@dataclass
class Budget:
    """Calls and dollars one run may spend; checked before every call."""

    max_calls: int
    max_cost_usd: float
    calls: int = 0
    cost_usd: float = 0.0
    exhausted: str | None = field(default=None)

    def check(self) -> None:
        """Raise :class:`BudgetExceeded` when another call is not allowed."""
        if self.calls >= self.max_calls:
            self.exhausted = "llm_calls"
            raise BudgetExceeded("llm_calls", self.calls, self.max_calls)
        if self.cost_usd >= self.max_cost_usd:
            self.exhausted = "cost_usd"
            raise BudgetExceeded("cost_usd", self.cost_usd, self.max_cost_usd)


class LLMClient(Protocol):
    """Anything that answers chat messages (fakes in unit tests, litellm in production)."""

    async def complete(self, llm: LLMSettings, messages: list[Message], purpose: str) -> str:
        """The assistant's answer text."""
        ...


_litellm: ModuleType | None = None
# litellm calls abandoned by a cancelled run, still finishing (see _uncancelled).
_in_flight: set[asyncio.Task[Any]] = set()


async def _uncancelled(call: Coroutine[Any, Any, Any]) -> Any:
    """Await a litellm call without ever cancelling it.

    litellm leaks an un-awaited coroutine when cancelled between its executor hop and
    the HTTP request. A run that times out or stops abandons the call instead: it ends
    on its own within ``request_timeout_s``, and its result is dropped.
    """
    task = asyncio.ensure_future(call)
    _in_flight.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        _in_flight.discard(t)
        if not t.cancelled():
            t.exception()  # retrieved, so never "exception was never retrieved"

    task.add_done_callback(done)
    return await asyncio.shield(task)


def load_litellm() -> ModuleType:
    """Import litellm once, offline: bundled cost map, no telemetry, quiet import."""
    global _litellm
    if _litellm is None:
        # Must be set before the import: litellm reads it at import time.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        os.environ.setdefault("LITELLM_TELEMETRY", "False")
        with warnings.catch_warnings():
            # Its import uses deprecated importlib APIs; not ours to fix.
            warnings.simplefilter("ignore")
            import litellm
        litellm.telemetry = False
        litellm.suppress_debug_info = True
        _litellm = litellm
    return _litellm


def _retriable(litellm: ModuleType, exc: Exception) -> bool:
    kinds = tuple(
        getattr(litellm, name)
        for name in (
            "RateLimitError",
            "APIConnectionError",
            "Timeout",
            "ServiceUnavailableError",
            "InternalServerError",
        )
        if hasattr(litellm, name)
    )
    return isinstance(exc, kinds)


class LiteLLMClient:
    """:class:`LLMClient` over ``litellm.acompletion`` with retries and budget accounting."""

    def __init__(self, budget: Budget, max_retries: int, backoff_s: float) -> None:
        self.budget = budget
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.retries = 0

    async def complete(self, llm: LLMSettings, messages: list[Message], purpose: str) -> str:
        """One chat completion; retries rate limits and transient errors with backoff."""
        litellm = load_litellm()
        try:
            api_key = llm.api_key()
        except KeyError as exc:
            raise LLMError(llm.model, str(exc.args[0])) from None
        attempt = 0
        while True:
            self.budget.check()
            self.budget.calls += 1
            try:
                response = await _uncancelled(
                    litellm.acompletion(
                        model=llm.model,
                        messages=messages,
                        api_base=llm.api_base,
                        api_key=api_key,
                        temperature=llm.temperature,
                        max_tokens=llm.max_tokens,
                        timeout=llm.request_timeout_s,
                        # Retries are ours (counted against the budget, logged); the OpenAI
                        # client's own would hide them.
                        max_retries=0,
                        num_retries=0,
                        **llm.extra,
                    )
                )
            except Exception as exc:
                retriable = _retriable(litellm, exc)
                if not retriable or attempt >= self.max_retries:
                    raise LLMError(llm.model, f"{type(exc).__name__}: {exc}", retriable) from exc
                delay = self.backoff_s * 2**attempt
                attempt += 1
                self.retries += 1
                log.warning(
                    "optimizer_llm_retry",
                    model=llm.model,
                    purpose=purpose,
                    attempt=attempt,
                    retry_in_s=delay,
                    error=type(exc).__name__,
                )
                await asyncio.sleep(delay)
                continue
            self.budget.cost_usd += self._cost(litellm, llm, response)
            content = response.choices[0].message.content
            return content if isinstance(content, str) else ""

    @staticmethod
    def _cost(litellm: ModuleType, llm: LLMSettings, response: Any) -> float:
        """litellm's price when it knows the model, else the configured per-token prices."""
        try:
            return float(litellm.completion_cost(completion_response=response))
        except Exception:
            usage = getattr(response, "usage", None)
            tokens_in = int(getattr(usage, "prompt_tokens", 0) or 0)
            tokens_out = int(getattr(usage, "completion_tokens", 0) or 0)
            return tokens_in * llm.input_cost_per_token + tokens_out * llm.output_cost_per_token


async def close_litellm() -> None:
    """Stop litellm's background logging worker, dropping its pending callbacks.

    litellm queues a success callback per call on a process-wide worker task bound to the
    event loop that first used it. Left running, it delays the loop's shutdown by its own
    timeouts and breaks the next event loop (tests); promptd registers no litellm
    callbacks, so nothing of value is dropped.
    """
    if _litellm is None:
        return
    if _in_flight:
        # Abandoned calls end by their own request timeout; give them a moment.
        await asyncio.wait(set(_in_flight), timeout=2.0)
    from litellm.litellm_core_utils import logging_worker

    worker = logging_worker.GLOBAL_LOGGING_WORKER
    queue, worker._queue = worker._queue, None
    while queue is not None and not queue.empty():
        queue.get_nowait()["coroutine"].close()  # closed, so never "never awaited"
    task, worker._worker_task = worker._worker_task, None
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 1.0)
