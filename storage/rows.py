"""Stored events as row tuples: what ingestion writes and what batch listeners read.

A row is a plain tuple in the column order of its table (:data:`MetricRow`,
:data:`FeedbackRow`), so the writer binds it as it is. Plain tuples of plain values
(str, float, int, bool, None) cost the garbage collector nothing once it has seen them
(CPython stops tracking such tuples; it keeps tracking tuple subclasses such as named
tuples, which measured about 1.5 us per event on the ingest path), and they can cross
to the writer's thread as they are.

For code that prefers names, :class:`MetricView` and :class:`FeedbackView` are named
tuples over the same rows, with the attribute names of
:class:`~promptd.events.MetricEvent` and :class:`~promptd.events.FeedbackEvent`. Two
differences from the models: the captured ``input``, ``output``, ``attributes`` and
``correction`` are JSON text (as stored), and there is no ``schema`` or ``type``.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable
from typing import Any, Final, NamedTuple, TypeAlias

from promptd.events import FeedbackEvent, MetricEvent

#: One stored LLM call, in ``metric_events`` column order (see :class:`MetricView`).
MetricRow: TypeAlias = tuple[
    str,
    float,
    str,
    str,
    str,
    str,
    str | None,
    float,
    bool,
    str | None,
    float | None,
    int | None,
    int | None,
    float | None,
    int | None,
    str | None,
    str | None,
    str | None,
    str | None,
    str | None,
]
#: One stored piece of feedback, in ``feedback_events`` column order (see
#: :class:`FeedbackView`).
FeedbackRow: TypeAlias = tuple[
    str,
    float,
    str | None,
    str | None,
    str | None,
    str | None,
    float,
    str,
    str | None,
    str | None,
    str | None,
    str | None,
]


class MetricView(NamedTuple):
    """A :data:`MetricRow` with names."""

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
    input_chars: int | None
    episode_id: str | None
    input: str | None
    output: str | None
    attributes: str | None
    #: JSON list of the demonstrations' ids the call was shown (dynamic demos), if any.
    demo_ids: str | None = None


class FeedbackView(NamedTuple):
    """A :data:`FeedbackRow` with names. Feedback on a whole episode has no
    ``request_id`` (and may have no ``prompt`` or ``variant``); an evaluator's result has
    a ``source`` (``eval:<name>``)."""

    event_id: str
    ts: float
    prompt: str | None
    variant: str | None
    model: str | None
    request_id: str | None
    score: float
    kind: str
    comment: str | None
    correction: str | None
    episode_id: str | None
    #: ``None`` for feedback from people and apps; ``eval:<name>`` for an evaluator's.
    source: str | None = None


METRIC_COLUMNS: Final = MetricView._fields
FEEDBACK_COLUMNS: Final = FeedbackView._fields
METRIC_WIDTH: Final = len(METRIC_COLUMNS)
FEEDBACK_WIDTH: Final = len(FEEDBACK_COLUMNS)
#: Where a feedback row holds its ``source`` (``None``: from people and apps).
FEEDBACK_SOURCE_AT: Final = FEEDBACK_COLUMNS.index("source")
#: Metric columns without the optional tail (episode id, captured payloads): most calls
#: have none of them, and binding three NULLs per row measured about 25 % of the insert
#: cost (see bench/sqlite_rows.py).
METRIC_PLAIN_COLUMNS: Final = METRIC_COLUMNS[:15]
#: The plain columns and the episode id: calls in an episode, without captures.
METRIC_EPISODE_COLUMNS: Final = METRIC_COLUMNS[:16]
#: Where the captured payloads (input, output, attributes, demo ids) start in a row.
METRIC_CAPTURES_AT: Final = len(METRIC_EPISODE_COLUMNS)
#: A row's plain part, sliced in C.
metric_plain_part: Final = operator.itemgetter(slice(0, len(METRIC_PLAIN_COLUMNS)))
#: A row's plain part and episode id, sliced in C.
metric_episode_part: Final = operator.itemgetter(slice(0, len(METRIC_EPISODE_COLUMNS)))


def capture_json(value: Any) -> str | None:
    """The stored text of a captured payload: compact JSON, non-ASCII kept as is."""
    if value is None:
        return None
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def metric_row(event: MetricEvent) -> MetricRow:
    """The row of a validated metric event."""
    return (
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
        event.input_chars,
        event.episode_id,
        capture_json(event.input),
        capture_json(event.output),
        capture_json(event.attributes),
        capture_json(event.demo_ids),
    )


def feedback_row(event: FeedbackEvent) -> FeedbackRow:
    """The row of a validated feedback event."""
    return (
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
        event.episode_id,
        event.source,
    )


def metric_views(rows: Iterable[MetricRow]) -> tuple[MetricView, ...]:
    """Named views of ``rows``."""
    return tuple(map(MetricView._make, rows))


def feedback_views(rows: Iterable[FeedbackRow]) -> tuple[FeedbackView, ...]:
    """Named views of ``rows``."""
    return tuple(map(FeedbackView._make, rows))
