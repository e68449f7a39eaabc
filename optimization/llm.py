"""The optimizer's edge to language models: a budget, a small protocol, litellm behind it,
and a persistent cache in front of it.

Every model call of a run (proposer, evaluation, judge) goes through one
:class:`CachedLLM`, which shares the run's :class:`Budget` (calls, tokens, cost, a
deadline) and persists every answer before handing it back. A call whose answer is
stored is never paid for again: not by a later strategy, not by a later run, not after a
restart (this is what makes a resumed run replay for free). The run's spend is recorded
before each request leaves, so a call lost in flight (the daemon killed while waiting
for its answer) still counts as paid after the restart. litellm is imported lazily
(it takes seconds to import and is not needed by the rest of the daemon) and told to use
its bundled cost map, so it never fetches prices from the internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import structlog

from promptd.optimization.config import LLMSettings

log = structlog.get_logger("promptd.optimizer")

Message = dict[str, str]


class OptimizerError(Exception):
    """Root of the optimizer's errors; ``retriable`` says whether a retry may help."""

    retriable = False


class BudgetExceeded(OptimizerError):
    """The run's call, token, cost or time budget is spent; the search stops cleanly."""

    def __init__(self, what: str, used: float, limit: float) -> None:
        super().__init__(f"{what} budget spent ({used:g} of {limit:g})")
        self.what = what
        self.used = used
        self.limit = limit


class LLMError(OptimizerError):
    """A model call failed (after retries for retriable errors)."""

    def __init__(
        self, model: str, message: str, retriable: bool = False, attempts: int = 1
    ) -> None:
        super().__init__(f"{model}: {message}")
        self.model = model
        self.retriable = retriable
        self.attempts = attempts


@dataclass(frozen=True, slots=True)
class Spend:
    """Calls (retries included), tokens and dollars a run paid for."""

    calls: int
    tokens: int
    cost_usd: float


@dataclass
class Budget:
    """What one run may spend, checked before every paid call.

    ``reserve`` holds back a share of every limit for the gate while the search runs
    (the search sees the limits minus the reserve); :meth:`release` hands it to the gate.
    The deadline is monotonic time; ``None`` means none.
    """

    max_calls: int
    max_cost_usd: float
    max_tokens: int | None = None
    deadline: float | None = None
    calls: int = 0
    cost_usd: float = 0.0
    tokens: int = 0
    reserve_share: float = 0.0
    reserve_s: float = 0.0
    exhausted: str | None = field(default=None)

    def check(self) -> None:
        """Raise :class:`BudgetExceeded` when another paid call is not allowed."""
        keep = 1.0 - self.reserve_share
        limits: list[tuple[str, float, float]] = [
            ("llm_calls", self.calls, self.max_calls * keep),
            ("cost_usd", self.cost_usd, self.max_cost_usd * keep),
        ]
        if self.max_tokens is not None:
            limits.append(("tokens", self.tokens, self.max_tokens * keep))
        for what, used, limit in limits:
            if used >= limit:
                self.exhausted = what
                raise BudgetExceeded(what, used, limit)
        if self.deadline is not None:
            now = time.monotonic()
            if now >= self.deadline - self.reserve_s:
                self.exhausted = "time"
                raise BudgetExceeded("time", now, self.deadline - self.reserve_s)

    def remaining_calls(self) -> float:
        """Calls left before the (search's) call limit."""
        return max(self.max_calls * (1.0 - self.reserve_share) - self.calls, 0.0)

    def spend(self, calls: int, tokens: int, cost_usd: float) -> None:
        """Account for a paid call (retries included)."""
        self.calls += calls
        self.tokens += tokens
        self.cost_usd += cost_usd

    def spent(self) -> Spend:
        """What was paid so far."""
        return Spend(self.calls, self.tokens, self.cost_usd)

    def hold_back(self, share: float, seconds: float) -> None:
        """Reserve ``share`` of the call, token and cost limits and ``seconds`` of time."""
        self.reserve_share = min(max(share, 0.0), 0.9)
        self.reserve_s = max(seconds, 0.0)

    def release(self) -> None:
        """Give the reserve back (the gate may spend it)."""
        self.reserve_share = 0.0
        self.reserve_s = 0.0
        self.exhausted = None


@dataclass(frozen=True, slots=True)
class Completion:
    """A model's answer and what it cost."""

    text: str
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    attempts: int = 1
    #: Per generated token, its most likely alternatives as (token, log probability),
    #: when the request asked for them (``logprobs``/``top_logprobs``) and the server
    #: returned them; empty otherwise.
    top_logprobs: tuple[tuple[tuple[str, float], ...], ...] = ()


class LLMClient(Protocol):
    """Anything that answers chat messages (litellm in production, fakes in unit tests)."""

    async def complete(self, llm: LLMSettings, messages: list[Message], purpose: str) -> Completion:
        """The assistant's answer."""
        ...


class CallStore(Protocol):
    """Where answers persist (SQLite in the daemon; see :mod:`promptd.optimization.store`)."""

    async def get_call(self, key: str) -> Completion | None:
        """The stored answer for ``key``."""
        ...

    async def note_spend(self, run_id: str, spent: Spend) -> None:
        """Record a run's spend before a paid call leaves (never lowers it)."""
        ...

    async def put_call(
        self,
        key: str,
        run_id: str,
        purpose: str,
        model: str,
        messages: list[Message],
        c: Completion,
        spent: Spend | None = None,
    ) -> None:
        """Store an answer (first writer wins), with the run's spend after it."""
        ...


def call_key(llm: LLMSettings, messages: list[Message], nonce: str = "") -> str:
    """The cache key: model and parameters, the rendered messages, and a nonce.

    Evaluations use no nonce: the same template on the same input with the same model
    and parameters is the same call, whichever strategy or run asks. Proposals carry a
    nonce naming their place in the run (``run/round/i``), so several proposals from one
    prompt stay distinct, and a resumed run finds each of them again.
    """
    body = json.dumps(
        [llm.cache_identity(), messages, nonce], sort_keys=True, ensure_ascii=False, default=str
    )
    return hashlib.sha256(body.encode()).hexdigest()


class CachedLLM:
    """The run's one door to models: cache first, then budget, then the client."""

    def __init__(
        self,
        client: LLMClient,
        store: CallStore,
        budget: Budget,
        run_id: str,
        max_concurrency: int = 4,
    ) -> None:
        self.client = client
        self.store = store
        self.budget = budget
        self.run_id = run_id
        self.hits = 0
        self.misses = 0
        self._slots = asyncio.Semaphore(max_concurrency)
        self._in_flight: dict[str, asyncio.Task[str]] = {}

    async def complete(
        self, llm: LLMSettings, messages: list[Message], purpose: str, nonce: str = ""
    ) -> str:
        """The answer text; paid for only when no stored answer exists.

        Identical calls in flight at the same time (two strategies scoring the active
        template, say) share one request.
        """
        key = call_key(llm, messages, nonce)
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._complete(key, llm, messages, purpose))
            self._in_flight[key] = task
            task.add_done_callback(lambda _: self._in_flight.pop(key, None))
        return await task

    async def _complete(
        self, key: str, llm: LLMSettings, messages: list[Message], purpose: str
    ) -> str:
        stored = await self.store.get_call(key)
        if stored is not None:
            self.hits += 1
            return stored.text
        async with self._slots:
            self.budget.check()
            # Counted before the answer arrives, so concurrent calls cannot overshoot the
            # call budget; retries, tokens and cost are added when it is known. Recorded
            # before the request leaves: a call lost in flight (a kill) was still paid.
            self.budget.spend(1, 0, 0.0)
            await self.store.note_spend(self.run_id, self.budget.spent())
            try:
                completion = await self.client.complete(llm, messages, purpose)
            except LLMError as exc:
                self.budget.spend(exc.attempts - 1, 0, 0.0)
                raise
            self.budget.spend(
                completion.attempts - 1,
                completion.tokens_in + completion.tokens_out,
                completion.cost_usd,
            )
            self.misses += 1
            await self.store.put_call(
                key, self.run_id, purpose, llm.model, messages, completion, self.budget.spent()
            )
        return completion.text


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
        # litellm logs its own bookkeeping failures (building its logging payload) as
        # errors on every call; promptd's calls raise or succeed on their own, so only
        # litellm's critical messages reach our log.
        for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        quiet_litellm_warnings()
        _litellm = litellm
    return _litellm


#: pydantic's warning when litellm serializes its own response types for its logging
#: payload (BerriAI/litellm#11759, fixed upstream after the pinned 1.80.0): litellm deletes
#: unset fields of ``Message``/``Choices`` and types ``ModelResponse.choices`` as
#: ``Choices | StreamingChoices``. Two per call, harmless, about 150 log lines a run.
LITELLM_SERIALIZER_WARNING = (
    r"Pydantic serializer warnings:\s+PydanticSerializationUnexpectedValue\("
    r"(Expected \d+ fields but got \d+: )?"
    r"Expected `(Message|Choices|StreamingChoices|Delta|Usage)`"
)


def quiet_litellm_warnings() -> None:
    """Ignore pydantic's serializer warnings about litellm's response types, and only
    those (the filter names pydantic's module and litellm's type names)."""
    warnings.filterwarnings(
        "ignore", message=LITELLM_SERIALIZER_WARNING, category=UserWarning, module=r"pydantic\.main"
    )


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
    """:class:`LLMClient` over ``litellm.acompletion`` with retries on transient errors."""

    def __init__(self, max_retries: int, backoff_s: float) -> None:
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.retries = 0

    async def complete(self, llm: LLMSettings, messages: list[Message], purpose: str) -> Completion:
        """One chat completion; retries rate limits and transient errors with backoff."""
        litellm = load_litellm()
        try:
            api_key = llm.api_key()
        except KeyError as exc:
            raise LLMError(llm.model, str(exc.args[0])) from None
        attempt = 0
        while True:
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
                    raise LLMError(
                        llm.model, f"{type(exc).__name__}: {exc}", retriable, attempt + 1
                    ) from exc
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
            usage = getattr(response, "usage", None)
            content = response.choices[0].message.content
            return Completion(
                text=content if isinstance(content, str) else "",
                tokens_in=int(getattr(usage, "prompt_tokens", 0) or 0),
                tokens_out=int(getattr(usage, "completion_tokens", 0) or 0),
                cost_usd=self._cost(litellm, llm, response),
                attempts=attempt + 1,
                top_logprobs=_top_logprobs(response.choices[0]),
            )

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


def _field(obj: Any, name: str) -> Any:
    """An attribute of a litellm response part, or its key (some parts are dicts)."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _top_logprobs(choice: Any) -> tuple[tuple[tuple[str, float], ...], ...]:
    """The alternatives of each generated token of an OpenAI-style ``choice.logprobs``
    (empty when the server sent none)."""
    content = _field(_field(choice, "logprobs") or {}, "content") or ()
    out = []
    for position in content:
        alternatives = _field(position, "top_logprobs") or ()
        out.append(
            tuple(
                (str(_field(a, "token")), float(_field(a, "logprob")))
                for a in alternatives
                if _field(a, "token") is not None and _field(a, "logprob") is not None
            )
        )
    return tuple(out)


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
