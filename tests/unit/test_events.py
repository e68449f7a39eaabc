"""The wire contract: valid events decode, every kind of bad record gets a precise reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from promptd.events import (
    MAX_CAPTURE_BYTES,
    FeedbackEvent,
    MetricEvent,
    Rejection,
    decode_event,
    new_event_id,
)

METRIC: dict[str, Any] = {
    "event_id": "e-1",
    "type": "metric",
    "ts": "2026-11-22T10:00:00Z",
    "prompt": "summarization",
    "variant": "v3",
    "model": "gpt-4o-mini",
    "request_id": "r-1",
    "latency_ms": 812.5,
    "success": True,
}
FEEDBACK: dict[str, Any] = {
    "event_id": "e-2",
    "type": "feedback",
    "ts": 1_795_000_000,
    "prompt": "summarization",
    "variant": "v3",
    "request_id": "r-1",
    "score": 0.75,
    "kind": "rating",
}


def _raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def test_metric_decodes_with_rfc3339_ts() -> None:
    """An RFC 3339 timestamp becomes epoch seconds."""
    event = decode_event(_raw(METRIC))
    assert isinstance(event, MetricEvent)
    assert event.ts == datetime(2026, 11, 22, 10, tzinfo=UTC).timestamp()
    assert event.latency_ms == 812.5


def test_feedback_decodes_with_epoch_ts() -> None:
    """Epoch seconds are kept as they are; kind defaults are honoured."""
    event = decode_event(_raw(FEEDBACK))
    assert isinstance(event, FeedbackEvent)
    assert event.ts == 1_795_000_000.0
    assert event.score == 0.75


def test_round_trip_through_to_json() -> None:
    """``to_json`` output decodes to an equal event."""
    event = MetricEvent.model_validate({**METRIC, "input": {"q": "x"}, "attributes": {"a": "b"}})
    assert decode_event(event.to_json()) == event


@pytest.mark.parametrize(
    ("raw", "reason", "detail"),
    [
        (b"{not json", "not_json", "JSON"),
        (None, "not_json", "tombstone"),
        (b'"a string"', "not_object", "not an object"),
        (b"[1]", "not_object", "not an object"),
        (_raw({**METRIC, "type": "trace"}), "unknown_type", "'trace'"),
        (_raw({k: v for k, v in METRIC.items() if k != "type"}), "unknown_type", "no 'type'"),
        (_raw({**METRIC, "schema": 2}), "unknown_schema", "schema"),
        (_raw({k: v for k, v in METRIC.items() if k != "model"}), "invalid", "model"),
        (_raw({**METRIC, "latency_ms": -1}), "invalid", "latency_ms"),
        (_raw({**METRIC, "latency_ms": "12"}), "invalid", "latency_ms"),
        (_raw({**METRIC, "success": "true"}), "invalid", "success"),
        (_raw({**METRIC, "quality": 1.01}), "invalid", "quality"),
        (_raw({**METRIC, "prompt": "p" * 201}), "invalid", "prompt"),
        (_raw({**METRIC, "event_id": "e" * 129}), "invalid", "event_id"),
        (_raw({**METRIC, "ts": "2026-11-22 10:00:00"}), "invalid", "UTC offset"),
        (_raw({**METRIC, "ts": 1_795_000_000_000}), "invalid", "out of range"),
        (_raw({**METRIC, "ts": True}), "invalid", "boolean"),
        (_raw({**METRIC, "surprise": 1}), "invalid", "surprise"),
        (_raw({**METRIC, "attributes": {"k": 1}}), "invalid", "attributes"),
        (_raw({**METRIC, "attributes": {f"k{i}": "v" for i in range(33)}}), "invalid", "33 keys"),
        (_raw({**METRIC, "input": "x" * (MAX_CAPTURE_BYTES + 1)}), "invalid", "cap"),
        (_raw({**FEEDBACK, "score": -0.1}), "invalid", "score"),
        (_raw({**FEEDBACK, "comment": "c" * 4001}), "invalid", "comment"),
        (b"{" + b" " * 300_000 + b"}", "oversized", "limit"),
    ],
)
def test_rejections_name_the_reason(raw: bytes | None, reason: str, detail: str) -> None:
    """Each malformed record is rejected with a stable reason code and a helpful detail."""
    result = decode_event(raw)
    assert isinstance(result, Rejection)
    assert result.reason == reason
    assert detail in result.detail


def test_max_bytes_is_configurable() -> None:
    """The size cap comes from the caller (the daemon's max_record_bytes)."""
    result = decode_event(_raw(METRIC), max_bytes=50)
    assert isinstance(result, Rejection)
    assert result.reason == "oversized"


def test_new_event_ids_are_unique_and_time_ordered() -> None:
    """Event ids are UUIDv7-shaped and sort by creation time (append-mostly index)."""
    ids = [new_event_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    prefixes = [i[:13] for i in ids]  # the 48-bit millisecond timestamp
    assert prefixes == sorted(prefixes)
    assert all(i[14] == "7" for i in ids)
