"""Helpers for the optimizer's tests: examples written straight into the event tables."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from promptd.events import FeedbackEvent, MetricEvent
from promptd.storage.database import Database
from promptd.storage.repository import EventRepository


@dataclass(frozen=True)
class Row:
    """One captured call and the feedback scores it got."""

    request_id: str
    input: dict[str, Any] | str
    output: str
    scores: tuple[float, ...]
    comment: str | None = None
    correction: str | None = None


async def seed(db: Database, prompt: str, rows: list[Row], now: float | None = None) -> None:
    """Store a MetricEvent (with capture) and its FeedbackEvents for every row, through
    the same repository call as ingestion (so the time ranges are recorded too)."""
    ts = time.time() if now is None else now
    metrics: list[MetricEvent] = []
    feedback: list[FeedbackEvent] = []
    for i, r in enumerate(rows):
        metrics.append(
            MetricEvent(
                event_id=uuid.uuid4().hex,
                ts=ts - 100 + i,
                prompt=prompt,
                variant="v1",
                model="m",
                request_id=r.request_id,
                latency_ms=10.0,
                success=True,
                input=r.input,
                output=r.output,
            )
        )
        for j, score in enumerate(r.scores):
            feedback.append(
                FeedbackEvent(
                    event_id=uuid.uuid4().hex,
                    ts=ts - 50 + i + j * 0.01,
                    prompt=prompt,
                    variant="v1",
                    request_id=r.request_id,
                    score=score,
                    kind="quality",
                    comment=r.comment if j == 0 else None,
                    correction=r.correction if j == 0 else None,
                )
            )
    await EventRepository(db).store_batch(metrics, feedback, {})


def run_services(
    db: Database,
    settings: Any,
    *,
    episodes: Any = None,
    rollouts: Any = None,
    registry: Any = None,
) -> Any:
    """The services a run uses, on ``db`` (a fresh metrics registry, no publishing)."""
    from prometheus_client import CollectorRegistry

    from promptd.optimization.examples import ExampleStore
    from promptd.optimization.llm import LiteLLMClient
    from promptd.optimization.metrics import OptimizationMetrics
    from promptd.optimization.services import RunServices
    from promptd.optimization.store import OptimizationStore
    from promptd.optimization.tracking import NoTracker
    from promptd.replacement.registry import Registry

    async def publish(event: dict[str, Any]) -> None:
        return None

    return RunServices(
        settings=settings,
        store=OptimizationStore(db),
        registry=registry or Registry(db),
        rollouts=rollouts,
        examples=ExampleStore(db, 30 * 86_400, 2_000),
        episodes=episodes,
        client_factory=lambda: LiteLLMClient(0, 0.0),
        clock=time.time,
        publish=publish,
        metrics=OptimizationMetrics(CollectorRegistry()),
        tracker=NoTracker(),
        primary_metric="feedback_score",
    )
