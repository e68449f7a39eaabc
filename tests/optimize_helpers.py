"""Helpers for the optimizer's tests: examples written straight into the event tables."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from promptd.storage.database import Database


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
    """Insert a MetricEvent (with capture) and its FeedbackEvents for every row."""
    ts = time.time() if now is None else now
    async with db.transaction() as conn:
        for i, r in enumerate(rows):
            await conn.execute(
                "INSERT INTO metric_events (event_id, ts, prompt, variant, model, request_id, "
                "latency_ms, success, input, output, ingested_at) "
                "VALUES (?, ?, ?, 'v1', 'm', ?, 10, 1, ?, ?, ?)",
                (
                    uuid.uuid4().hex,
                    ts - 100 + i,
                    prompt,
                    r.request_id,
                    json.dumps(r.input),
                    json.dumps(r.output),
                    ts,
                ),
            )
            for j, score in enumerate(r.scores):
                await conn.execute(
                    "INSERT INTO feedback_events (event_id, ts, prompt, variant, request_id, "
                    "score, kind, comment, correction, ingested_at) "
                    "VALUES (?, ?, ?, 'v1', ?, ?, 'quality', ?, ?, ?)",
                    (
                        uuid.uuid4().hex,
                        ts - 50 + i + j * 0.01,
                        prompt,
                        r.request_id,
                        score,
                        r.comment if j == 0 else None,
                        json.dumps(r.correction) if r.correction is not None and j == 0 else None,
                        ts,
                    ),
                )
