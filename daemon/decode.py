"""The ingest hot path's decoder: raw Kafka values straight to row tuples, with msgspec.

The wire contract is defined once, by the pydantic models in :mod:`promptd.events`
(:func:`~promptd.events.decode_event` is the reference decoder: the API, the SDK and the
dead-letter reasons use it). This module decodes the common case about ten times faster
with msgspec Structs that carry the same limits, and hands every record it does not
accept to the reference decoder, which then decides: it either rejects the record with
the stable reason and detail it always gave, or accepts it (a few spellings msgspec is
stricter about, such as ``"schema": 1.0``) and its event becomes the row.

So the accepted and rejected sets, and every rejection's reason and detail, are exactly
the reference decoder's, provided this decoder never accepts a record the reference
rejects and builds the same row when both accept. ``tests/unit/test_decode.py`` checks
that over the hostile corpus and a property-based one. Two gaps of msgspec are closed by
hand here: an RFC 3339 ``ts`` string is parsed by the reference's own function, and
captured payloads nested deeper than :data:`MAX_FAST_DEPTH` go to the reference decoder
(pydantic's JSON parser refuses documents nested deeper than 200 levels, msgspec does not).

msgspec stays out of ``import promptd``: only the daemon imports this module.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, Final, Literal, cast

import msgspec
from msgspec import Meta, Struct

from promptd import events as ev
from promptd.events import MAX_CAPTURE_BYTES, FeedbackEvent, MetricEvent, Rejection, decode_event
from promptd.storage.rows import (
    FEEDBACK_COLUMNS,
    METRIC_CAPTURES_AT,
    METRIC_COLUMNS,
    FeedbackRow,
    MetricRow,
    capture_json,
    feedback_row,
    metric_row,
)

#: Captured payloads nested deeper than this (the record itself is level 1) are decided by
#: the reference decoder. Far below pydantic's limit of 200, so an off-by-one in how a
#: parser counts levels can never make the two disagree; real payloads are a few deep.
MAX_FAST_DEPTH: Final = 64

_Id = Annotated[str, Meta(min_length=1, max_length=ev.MAX_ID_CHARS)]
_Prompt = Annotated[str, Meta(min_length=1, max_length=ev.MAX_PROMPT_CHARS)]
_Name = Annotated[str, Meta(min_length=1, max_length=ev.MAX_NAME_CHARS)]
_Score = Annotated[float, Meta(ge=0.0, le=1.0)]
_Count = Annotated[int, Meta(ge=0, le=10**9)]
# Epoch seconds are range-checked here; a string is parsed and checked by the reference.
_Ts = Annotated[float, Meta(ge=ev.MIN_TS, lt=ev.MAX_TS)] | str
_Capture = dict[str, Any] | str
_AttrKey = Annotated[str, Meta(min_length=1, max_length=ev.MAX_ATTRIBUTE_KEY_CHARS)]
_AttrValue = Annotated[str, Meta(max_length=ev.MAX_ATTRIBUTE_VALUE_CHARS)]
_Attributes = Annotated[dict[_AttrKey, _AttrValue], Meta(max_length=ev.MAX_ATTRIBUTES)]


class _Metric(Struct, tag_field="type", tag="metric", forbid_unknown_fields=True, gc=False):
    # Non-finite numbers cannot come out of JSON here (msgspec refuses ``NaN`` and
    # overflows), and the bounds reject infinity, as ``allow_inf_nan=False`` does.
    event_id: _Id
    ts: _Ts
    prompt: _Prompt
    variant: _Name
    model: _Name
    request_id: _Id
    latency_ms: Annotated[float, Meta(ge=0.0, le=86_400_000.0)]
    success: bool
    unit_id: _Id | None = None
    episode_id: _Id | None = None
    error: Annotated[str, Meta(max_length=ev.MAX_ERROR_CHARS)] | None = None
    quality: _Score | None = None
    tokens_in: _Count | None = None
    tokens_out: _Count | None = None
    cost_usd: Annotated[float, Meta(ge=0.0, le=1e6)] | None = None
    input_chars: _Count | None = None
    input: _Capture | None = None
    output: _Capture | None = None
    attributes: _Attributes | None = None
    demo_ids: Annotated[list[_Id], Meta(max_length=ev.MAX_DEMO_IDS)] | None = None
    schema: Literal[1] = 1


class _Feedback(Struct, tag_field="type", tag="feedback", forbid_unknown_fields=True, gc=False):
    # Which of request_id / episode_id / prompt / variant must be there is a rule across
    # fields: checked after decoding, and a record that breaks it goes to the reference.
    event_id: _Id
    ts: _Ts
    score: _Score
    prompt: _Prompt | None = None
    variant: _Name | None = None
    request_id: _Id | None = None
    episode_id: _Id | None = None
    model: _Name | None = None
    kind: Annotated[str, Meta(min_length=1, max_length=ev.MAX_KIND_CHARS)] = "quality"
    comment: Annotated[str, Meta(max_length=ev.MAX_COMMENT_CHARS)] | None = None
    correction: _Capture | None = None
    # The same form as the reference's check (re.search, anchored with ^ and \Z).
    source: (
        Annotated[str, Meta(max_length=ev.MAX_SOURCE_CHARS, pattern=ev.SOURCE_PATTERN)] | None
    ) = None
    schema: Literal[1] = 1


# Rows are read off the Struct in C, in column order, as plain tuples (see storage.rows).
_METRIC_VALUES = operator.attrgetter(*METRIC_COLUMNS)
_FEEDBACK_VALUES = operator.attrgetter(*FEEDBACK_COLUMNS)
_CORRECTION = FEEDBACK_COLUMNS.index("correction")
_CAPTURES_AT = METRIC_CAPTURES_AT


class _Fallback(Exception):
    """This record is for the reference decoder to decide."""


class RowDecoder:
    """Decodes raw record values to a :data:`MetricRow` or :data:`FeedbackRow` (plain
    tuples, told apart by length) or a :class:`~promptd.events.Rejection`, exactly as
    :func:`~promptd.events.decode_event` decides (see the module docstring)."""

    def __init__(self, max_bytes: int = ev.MAX_RECORD_BYTES) -> None:
        self.max_bytes = max_bytes
        self._decode = msgspec.json.Decoder(_Metric | _Feedback).decode
        #: Records the reference decoder decided (rejections, and the rare acceptances).
        self.fallbacks = 0

    def decode_into(
        self, raw: bytes | None, metrics: list[MetricRow], feedback: list[FeedbackRow]
    ) -> Rejection | None:
        """Decode one raw Kafka value: append its row to ``metrics`` or ``feedback``, or
        return the reference decoder's rejection."""
        if raw is None or len(raw) > self.max_bytes:
            return self._reference(raw, metrics, feedback)
        try:
            event = self._decode(raw)
            if type(event) is _Metric:
                metric: MetricRow = _METRIC_VALUES(event)
                if not (
                    event.input is None
                    and event.output is None
                    and event.attributes is None
                    and event.demo_ids is None
                ):
                    metric = _with_metric_captures(metric)
                if type(event.ts) is str:
                    metric = (metric[0], ev.parse_ts(event.ts), *metric[2:])
                metrics.append(metric)
                return None
            if event.request_id is None:
                if event.episode_id is None:
                    raise _Fallback
            elif event.prompt is None or event.variant is None:
                raise _Fallback
            row: FeedbackRow = _FEEDBACK_VALUES(event)
            if event.correction is not None:
                text = _capture_text(event.correction)
                row = cast(FeedbackRow, (*row[:_CORRECTION], text, *row[_CORRECTION + 1 :]))
            if type(event.ts) is str:
                row = (row[0], ev.parse_ts(event.ts), *row[2:])
        except (msgspec.MsgspecError, ValueError, RecursionError, _Fallback):
            # ValueError: a ts string that does not parse, undecodable UTF-8.
            return self._reference(raw, metrics, feedback)
        feedback.append(row)
        return None

    def decode(self, raw: bytes | None) -> MetricRow | FeedbackRow | Rejection:
        """One raw Kafka value: its row, or the reference decoder's rejection."""
        metrics: list[MetricRow] = []
        feedback: list[FeedbackRow] = []
        rejection = self.decode_into(raw, metrics, feedback)
        return rejection or (metrics or feedback)[0]

    def _reference(
        self, raw: bytes | None, metrics: list[MetricRow], feedback: list[FeedbackRow]
    ) -> Rejection | None:
        self.fallbacks += 1
        result = decode_event(raw, max_bytes=self.max_bytes)
        if isinstance(result, MetricEvent):
            metrics.append(metric_row(result))
        elif isinstance(result, FeedbackEvent):
            feedback.append(feedback_row(result))
        else:
            return result
        return None


def _with_metric_captures(row: MetricRow) -> MetricRow:
    # The row still holds the decoded objects here; store their JSON text instead.
    value_in, value_out, attributes, demo_ids = row[_CAPTURES_AT:]
    captures = (
        _capture_text(value_in),
        _capture_text(value_out),
        # An empty object is a valid value: stored as "{}", like the reference does.
        capture_json(attributes),
        capture_json(demo_ids),
    )
    return cast(MetricRow, row[:_CAPTURES_AT] + captures)


def _capture_text(value: Any) -> str | None:
    """JSON text of a captured payload, under the same cap as the reference's check."""
    if value is None:
        return None
    if value.__class__ is dict and not _within_depth(value, MAX_FAST_DEPTH - 1):
        raise _Fallback
    text = capture_json(value)
    assert text is not None
    if len(text.encode()) > MAX_CAPTURE_BYTES:
        raise _Fallback
    return text


def _within_depth(value: dict[str, Any], limit: int) -> bool:
    """Whether ``value`` nests at most ``limit`` objects and arrays deep (itself counts)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        children = item.values() if item.__class__ is dict else item
        for child in children:
            if child.__class__ is dict or child.__class__ is list:
                stack.append((child, depth + 1))
    return True
