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
