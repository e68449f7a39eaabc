"""Publishing stored results as feedback events: the engine's transactional outbox.

A result is written to ``evaluation_results`` first; this loop publishes what the broker
has not acknowledged (``published_at IS NULL``), oldest first, and marks it. A crash
between the acknowledgement and the mark publishes it again after the restart: its
``event_id`` is derived from (request, evaluator), so storage keeps it once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import structlog

from promptd._aio import wait_any, wait_event
from promptd.events import MAX_COMMENT_CHARS, SOURCE_PREFIX, FeedbackEvent

from .metrics import EvaluationMetrics
from .store import EvaluationStore, Result

log = structlog.get_logger("promptd.evaluation")

#: The namespace of evaluation event ids (UUIDv5 of "<evaluator>\n<request_id>").
EVENT_NAMESPACE: Final = uuid.UUID("6f1b7c1e-3c55-5b9e-9d55-2f1c0e7a6a01")
#: Results per publish round.
BATCH: Final = 500
#: After a wake-up, wait this long for more results before publishing.
COALESCE_S: Final = 0.05

Record = tuple[bytes, bytes]  # (key, value)
Publish = Callable[[Sequence[Record]], Awaitable[None]]


def event_id(request_id: str, evaluator: str) -> str:
    """The feedback event id of ``evaluator``'s result on ``request_id`` (deterministic:
    a result published twice is stored once)."""
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{evaluator}\n{request_id}"))


def feedback_event(result: Result) -> FeedbackEvent:
    """The feedback event of a stored result: the call's prompt, variant, model and
    request id, the call's time (so it lands in the call's window), the evaluator as
    ``source`` and its reason as ``comment``."""
    return FeedbackEvent(
        event_id=result.event_id,
        ts=result.call_ts,
        prompt=result.prompt,
        variant=result.variant,
        model=result.model,
        request_id=result.request_id,
        score=result.score,
        kind=result.kind,
        comment=result.detail[:MAX_COMMENT_CHARS] if result.detail else None,
        source=f"{SOURCE_PREFIX}{result.evaluator}",
    )


class Outbox:
    """The publishing loop; :meth:`wake` it after results are stored."""

    def __init__(
        self,
        store: EvaluationStore,
        publish: Publish,
        metrics: EvaluationMetrics,
        interval_s: float,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.store = store
        self.publish = publish
        self.metrics = metrics
        self.interval_s = interval_s
        self.backoff_max_s = backoff_max_s
        self.last_error: str | None = None
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Results were stored: publish soon."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop``; failures back off and retry, never give up."""
        delay = self.interval_s
        while not stop.is_set():
            try:
                more = await self.round()
            except Exception as exc:
                self.metrics.publish_failures.inc()
                self.last_error = repr(exc)
                log.warning("evaluation_publish_failed", error=repr(exc), retry_in_s=delay)
                await wait_event(stop, delay)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            self.last_error = None
            delay = self.interval_s
            if more:
                continue
            self._wake.clear()
            await wait_any(stop, self._wake, self.interval_s)
            # Let results written together go out together (one send, one update).
            await wait_event(stop, COALESCE_S)

    async def round(self) -> bool:
        """Publish one batch of unacknowledged results; True when more may be waiting."""
        results = await self.store.unpublished(BATCH)
        self.metrics.unpublished.set(len(results))
        if not results:
            return False
        records = [(r.prompt.encode(), feedback_event(r).to_json()) for r in results]
        await self.publish(records)
        await self.store.mark_published([r.event_id for r in results], time.time())
        self.metrics.published.inc(len(results))
        self.metrics.unpublished.set(0)
        return len(results) == BATCH
