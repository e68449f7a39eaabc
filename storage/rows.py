"""Stored events as row tuples: what ingestion writes and what batch listeners read.

A row is a :class:`~typing.NamedTuple` in the column order of its table, so the writer
hands it to ``executemany`` as it is, and listeners (the monitor, the rollout controller)
read the same attribute names as on :class:`~promptd.events.MetricEvent` and
:class:`~promptd.events.FeedbackEvent`. Two differences from the models: the captured
``input``, ``output``, ``attributes`` and ``correction`` are JSON text (as stored), and a
row holds only plain values (str, float, int, bool, None), so it costs the garbage
collector nothing and can cross to the writer's thread as it is.
"""

from __future__ import annotations

import json
import operator
from typing import Any, Final, NamedTuple

from promptd.events import FeedbackEvent, MetricEvent


class MetricRow(NamedTuple):
    """One stored LLM call, in ``metric_events`` column order."""

    event_id: str
    ts: float
    prompt: str
    variant: str
    model: str
    request_id: str
    unit_id: str | None
    latency_ms: float
    success: bool
    error: str | None
    quality: float | None
    tokens_in: int | None
    tokens_out: int | None
    cost_usd: float | None
    input: str | None
    output: str | None
    attributes: str | None


class FeedbackRow(NamedTuple):
    """One stored piece of feedback, in ``feedback_events`` column order."""

    event_id: str
    ts: float
    prompt: str
    variant: str
    model: str | None
    request_id: str
    score: float
    kind: str
    comment: str | None
    correction: str | None


METRIC_COLUMNS: Final = MetricRow._fields
FEEDBACK_COLUMNS: Final = FeedbackRow._fields
#: Metric columns without the captured payloads: most calls have none, and binding three
#: NULLs per row measured about 25 % of the insert cost (see bench/sqlite_rows.py).
METRIC_PLAIN_COLUMNS: Final = METRIC_COLUMNS[:14]
#: A row's plain part, sliced in C.
metric_plain_part: Final = operator.itemgetter(slice(0, len(METRIC_PLAIN_COLUMNS)))


def capture_json(value: Any) -> str | None:
    """The stored text of a captured payload: compact JSON, non-ASCII kept as is."""
    if value is None:
        return None
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def metric_row(event: MetricEvent) -> MetricRow:
    """The row of a validated metric event."""
    return MetricRow(
        event.event_id,
        event.ts,
        event.prompt,
        event.variant,
        event.model,
        event.request_id,
        event.unit_id,
        event.latency_ms,
        event.success,
        event.error,
        event.quality,
        event.tokens_in,
        event.tokens_out,
        event.cost_usd,
        capture_json(event.input),
        capture_json(event.output),
        capture_json(event.attributes),
    )


def feedback_row(event: FeedbackEvent) -> FeedbackRow:
    """The row of a validated feedback event."""
    return FeedbackRow(
        event.event_id,
        event.ts,
        event.prompt,
        event.variant,
        event.model,
        event.request_id,
        event.score,
        event.kind,
        event.comment,
        capture_json(event.correction),
    )


def is_captured(row: MetricRow) -> bool:
    """Whether the row carries any captured payload (it takes the wider insert)."""
    return row[14] is not None or row[15] is not None or row[16] is not None
