"""The wire contract (version 1): MetricEvent, FeedbackEvent and their strict decoder.

Events are UTF-8 JSON objects keyed by prompt name on Kafka. Every string field has a
length cap and captured ``input``/``output`` payloads have a size cap, so one bad producer
cannot blow up storage or memory. Unknown fields are rejected: a producer that needs new
fields sends a new ``schema`` version, which this daemon dead-letters until it knows it.

``decode_event`` never raises for bad input; it returns a :class:`Rejection` whose
``reason`` is one of the stable codes in :data:`REJECTION_REASONS` (they become the
``promptd-reason`` header on the dead-letter topic and a Prometheus label).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from promptd._validation import clean_message

SCHEMA_VERSION: Final = 1

MAX_ID_CHARS: Final = 128
MAX_PROMPT_CHARS: Final = 200
MAX_NAME_CHARS: Final = 200
MAX_ERROR_CHARS: Final = 2_000
MAX_KIND_CHARS: Final = 64
MAX_COMMENT_CHARS: Final = 4_000
MAX_ATTRIBUTES: Final = 32
MAX_ATTRIBUTE_KEY_CHARS: Final = 64
MAX_ATTRIBUTE_VALUE_CHARS: Final = 1_000
#: Most demonstration ids one call carries (``demo_ids``).
MAX_DEMO_IDS: Final = 50
#: Cap on captured ``input``, ``output`` and ``correction`` (serialized JSON, bytes).
MAX_CAPTURE_BYTES: Final = 32 * 1024
#: Default cap on one raw record; the daemon's setting ``max_record_bytes`` overrides it.
MAX_RECORD_BYTES: Final = 256 * 1024

#: Epoch seconds accepted for ``ts``: 2000-01-01 (inclusive) .. 2200-01-01 (exclusive).
#: Outside this range a number is almost surely milliseconds or garbage, and guessing
#: would misplace events.
MIN_TS: Final = 946_684_800.0
MAX_TS: Final = 7_258_118_400.0

REJECTION_REASONS: Final = (
    "oversized",
    "not_json",
    "not_object",
    "unknown_type",
    "unknown_schema",
    "invalid",
)


def parse_ts(value: object) -> float:
    """Accept RFC 3339 strings (with offset) or epoch seconds; return epoch seconds."""
    if isinstance(value, bool):
        raise ValueError("ts must be an RFC 3339 string or epoch seconds, not a boolean")
    if isinstance(value, int | float):
        ts = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError as exc:
            raise ValueError(f"ts is not an RFC 3339 timestamp: {value[:40]!r}") from exc
        if parsed.tzinfo is None:
            raise ValueError("ts needs a UTC offset (RFC 3339), e.g. 2026-01-01T00:00:00Z")
        ts = parsed.timestamp()
    else:
        raise ValueError("ts must be an RFC 3339 string or epoch seconds")
    if not math.isfinite(ts) or not MIN_TS <= ts < MAX_TS:
        raise ValueError("ts is out of range (epoch seconds between 2000 and 2200 expected)")
    return ts


Timestamp = Annotated[float, BeforeValidator(parse_ts)]
EventId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
PromptName = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
Score = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=10**9)]


def _capped_json(value: Any, field: str) -> Any:
    if value is None:
        return None
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_CAPTURE_BYTES:
        raise ValueError(f"{field} is {size} bytes serialized, above the {MAX_CAPTURE_BYTES} cap")
    return value


def _check_attributes(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if len(value) > MAX_ATTRIBUTES:
        raise ValueError(f"attributes has {len(value)} keys, above the {MAX_ATTRIBUTES} cap")
    for key, item in value.items():
        if not 0 < len(key) <= MAX_ATTRIBUTE_KEY_CHARS:
            raise ValueError(
                f"attribute key {key[:40]!r} must be 1..{MAX_ATTRIBUTE_KEY_CHARS} chars"
            )
        if len(item) > MAX_ATTRIBUTE_VALUE_CHARS:
            raise ValueError(
                f"attribute {key!r} is above the {MAX_ATTRIBUTE_VALUE_CHARS}-character cap"
            )
    return value


#: Why a feedback event without a target is invalid (also the decoders' detail).
FEEDBACK_NEEDS_TARGET: Final = "feedback needs a request_id or an episode_id"
#: What ``FeedbackEvent.source`` holds for an evaluator's result: ``eval:`` and the
#: evaluator's name (a letter or digit, then letters, digits, ``_``, ``.``, ``-``).
EVALUATOR_NAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
SOURCE_PREFIX: Final = "eval:"
#: The whole ``source`` value, anchored for :func:`re.search` (``\Z``: no final newline).
SOURCE_PATTERN: Final = rf"^{SOURCE_PREFIX}{EVALUATOR_NAME_PATTERN}\Z"
MAX_SOURCE_CHARS: Final = len(SOURCE_PREFIX) + 64
_SOURCE_RE: Final = re.compile(SOURCE_PATTERN)


def _check_source(value: str | None) -> str | None:
    if value is not None and _SOURCE_RE.search(value) is None:
        raise ValueError(
            "source must be 'eval:<evaluator>' (letters, digits, '_', '.', '-'; at most 64), "
            "or absent for feedback from people and apps"
        )
    return value


#: Why call feedback without its prompt or variant is invalid.
CALL_FEEDBACK_NEEDS_PROMPT: Final = (
    "feedback on a call (request_id) needs the call's prompt and variant"
)


class _EventBase(BaseModel):
    model_config = ConfigDict(
        # strict: "12" is not a number and "true" is not a boolean on the wire.
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        strict=True,
    )

    schema_version: Literal[1] = Field(default=1, alias="schema")
    event_id: EventId
    ts: Timestamp

    def to_json(self) -> bytes:
        """Serialize for the wire (``schema`` alias, no ``None`` fields)."""
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


class MetricEvent(_EventBase):
    """One LLM call, published by the app on ``promptd.metrics``."""

    type: Literal["metric"] = "metric"
    prompt: PromptName
    variant: Name
    request_id: EventId
    model: Name
    unit_id: EventId | None = None
    # The unit of work (one run of a pipeline, one agent turn) the call belongs to.
    episode_id: EventId | None = None
    latency_ms: Annotated[float, Field(ge=0.0, le=86_400_000.0, allow_inf_nan=False)]
    success: StrictBool
    error: Annotated[str, Field(max_length=MAX_ERROR_CHARS)] | None = None
    quality: Score | None = None
    tokens_in: Count | None = None
    tokens_out: Count | None = None
    cost_usd: Annotated[float, Field(ge=0.0, le=1e6, allow_inf_nan=False)] | None = None
    # Characters of what the app passed in for the call, without the prompt template: a
    # size the variant cannot change (rollouts adjust latency and cost on it).
    input_chars: Count | None = None
    input: dict[str, Any] | str | None = None
    output: dict[str, Any] | str | None = None
    attributes: dict[str, str] | None = None
    # The demonstrations the call was shown, when its version takes them per request
    # from a pool: their ids (the request ids of the production calls they came from).
    demo_ids: Annotated[list[EventId], Field(max_length=MAX_DEMO_IDS)] | None = None

    @field_validator("input", "output")
    @classmethod
    def _cap_capture(cls, value: Any, info: Any) -> Any:
        return _capped_json(value, info.field_name)

    @field_validator("attributes")
    @classmethod
    def _cap_attributes(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return _check_attributes(value)


class FeedbackEvent(_EventBase):
    """One piece of user or automatic feedback, on ``promptd.feedback``.

    ``source`` tells feedback from people and apps (absent) from an evaluator's score
    (``eval:<name>``); the daemon's readers count only the former unless told otherwise.

    It judges one call (``request_id``, with that call's ``prompt`` and ``variant``) or,
    with only an ``episode_id``, a whole episode: every call of the episode is credited
    with it (``prompt`` and ``variant`` are then optional and only informative). With
    both ids it judges the call, and names the episode the call belongs to.
    """

    type: Literal["feedback"] = "feedback"
    prompt: PromptName | None = None
    variant: Name | None = None
    request_id: EventId | None = None
    episode_id: EventId | None = None
    model: Name | None = None
    score: Score
    kind: Annotated[str, Field(min_length=1, max_length=MAX_KIND_CHARS)] = "quality"
    comment: Annotated[str, Field(max_length=MAX_COMMENT_CHARS)] | None = None
    correction: dict[str, Any] | str | None = None
    # Who scored: absent for people and apps (human feedback), ``eval:<name>`` for the
    # result of the daemon's evaluator ``<name>`` (see promptd.evaluation).
    source: Annotated[str, Field(max_length=MAX_SOURCE_CHARS)] | None = None

    @field_validator("source")
    @classmethod
    def _source_form(cls, value: str | None) -> str | None:
        return _check_source(value)

    @field_validator("correction")
    @classmethod
    def _cap_correction(cls, value: Any) -> Any:
        return _capped_json(value, "correction")

    @model_validator(mode="after")
    def _target(self) -> FeedbackEvent:
        if self.request_id is None:
            if self.episode_id is None:
                raise ValueError(FEEDBACK_NEEDS_TARGET)
        elif self.prompt is None or self.variant is None:
            raise ValueError(CALL_FEEDBACK_NEEDS_PROMPT)
        return self

    @property
    def targets_episode(self) -> bool:
        """Feedback on a whole episode (no ``request_id``)."""
        return self.request_id is None


Event = Annotated[MetricEvent | FeedbackEvent, Discriminator("type")]
_EVENT_ADAPTER: TypeAdapter[MetricEvent | FeedbackEvent] = TypeAdapter(Event)


class Rejection(BaseModel):
    """Why a raw record is not an event: a stable ``reason`` code and a human ``detail``."""

    model_config = ConfigDict(frozen=True)

    reason: str
    detail: str


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(part) for part in err["loc"] if part not in ("metric", "feedback"))
    message = clean_message(str(err["msg"]))
    return f"{loc}: {message}" if loc else message


def decode_event(
    raw: bytes | None, *, max_bytes: int = MAX_RECORD_BYTES
) -> MetricEvent | FeedbackEvent | Rejection:
    """Turn one raw Kafka value into an event, or a :class:`Rejection` saying why not."""
    if raw is None:
        return Rejection(reason="not_json", detail="record has no value (tombstone)")
    if len(raw) > max_bytes:
        return Rejection(reason="oversized", detail=f"{len(raw)} bytes > {max_bytes} byte limit")
    try:
        return _EVENT_ADAPTER.validate_json(raw)
    except ValidationError as exc:
        return _classify(raw, exc)


def _classify(raw: bytes, exc: ValidationError) -> Rejection:
    kinds = {e["type"] for e in exc.errors(include_url=False, include_input=False)}
    if "json_invalid" in kinds or "json_type" in kinds:
        return Rejection(reason="not_json", detail=_first_error(exc)[:500])
    if kinds & {"dict_type", "model_attributes_type", "model_type"}:
        return Rejection(reason="not_object", detail="the record is JSON but not an object")
    if kinds & {"union_tag_invalid", "union_tag_not_found"}:
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or "type" not in payload:
            return Rejection(reason="unknown_type", detail="the record has no 'type' field")
        tag = payload["type"]
        return Rejection(
            reason="unknown_type",
            detail=f"type {str(tag)[:40]!r} is not one of 'metric', 'feedback'",
        )
    for err in exc.errors(include_url=False, include_input=False):
        if err["loc"] and err["loc"][-1] == "schema":
            return Rejection(
                reason="unknown_schema",
                detail=f"schema version not supported (this daemon reads {SCHEMA_VERSION})",
            )
    return Rejection(reason="invalid", detail=_first_error(exc)[:500])


def new_event_id() -> str:
    """A fresh, time-ordered event id (UUIDv7 layout, RFC 9562).

    Time-ordered ids keep the daemon's unique index append-mostly, which makes
    ingestion markedly faster than random UUIDv4s would.
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64
    value |= 0b10 << 62 | rand & 0x3FFF_FFFF_FFFF_FFFF
    return str(uuid.UUID(int=value))


def now_ts() -> float:
    """Current time as epoch seconds (what ``ts`` holds after decoding)."""
    return datetime.now(UTC).timestamp()
