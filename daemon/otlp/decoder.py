"""The ingest decoder of the OTLP topic: one Kafka record to call and feedback rows.

It fits the same slot as :class:`~promptd.daemon.decode.RowDecoder`: ``decode_into``
appends rows or returns a :class:`~promptd.events.Rejection` with one of the usual
dead-letter reasons, so OTLP records go through the same exactly-once path (one storage
transaction with the offsets, deduplication by ``event_id``) and the same dead-letter
topic. A record that is not OTLP (``not_json``, ``not_object``, ``invalid``) or is too big
(``oversized``) is dead-lettered whole. A record whose spans map to events that fail
validation (a prompt name over 200 characters, a span that ends before it starts) is
dead-lettered with reason ``invalid`` naming the first such span, while its valid spans
are stored: replaying the dead letter later stores nothing twice.

Every span is counted by outcome (``call``, ``not_llm``, ``no_prompt``,
``published_by_sdk``, ``invalid``) and feedback by ``feedback`` and ``feedback_unscored``;
:meth:`OtlpDecoder.take_counts` hands a batch's counts to the storage transaction.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from pydantic import ValidationError

from promptd.daemon.otlp.mapping import EventView, MappingConfig, SpanView, map_span
from promptd.daemon.otlp.wire import Encoding, WireError, parse, spans_of
from promptd.daemon.settings import Settings
from promptd.events import FeedbackEvent, MetricEvent, Rejection
from promptd.storage.rows import FeedbackRow, MetricRow, feedback_row, metric_row

VersionLoader = Callable[[], Awaitable[Mapping[str, str]]]


def any_value(value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as a plain Python value (bytes as hex)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    """OTLP key-values as a dict (a repeated key keeps its last value)."""
    out: dict[str, Any] = {}
    for kv in pairs:
        value = kv.value
        kind = value.WhichOneof("value")
        # Scalars (nearly every attribute) without the call to any_value.
        out[kv.key] = getattr(value, kind) if kind in _SCALARS else any_value(value)
    return out


_SCALARS: Final = frozenset({"string_value", "int_value", "double_value", "bool_value"})


def span_view(span: Span, resource: Mapping[str, Any]) -> SpanView:
    """What the mapping reads of a protobuf span."""
    return SpanView(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        failed=span.status.code == Status.STATUS_CODE_ERROR,
        status_message=span.status.message,
        attributes=attributes(span.attributes),
        resource=resource,
        events=[EventView(e.name, e.time_unix_nano, attributes(e.attributes)) for e in span.events],
    )


class ActiveVersions:
    """Each prompt's active version, for calls whose span names no variant.

    Decoding is synchronous; :meth:`refresh` is awaited by the ingestor before a batch
    with OTLP records and reloads at most every ``ttl_s`` seconds, so a promotion is seen
    within that time.
    """

    def __init__(self, load: VersionLoader | None, ttl_s: float = 1.0) -> None:
        self._load = load
        self._ttl_s = ttl_s
        self._versions: Mapping[str, str] = {}
        self._loaded_at = float("-inf")

    def get(self, prompt: str) -> str | None:
        """The active version of ``prompt`` as last loaded."""
        return self._versions.get(prompt)

    async def refresh(self) -> None:
        """Reload when older than the TTL."""
        now = time.monotonic()
        if self._load is None or now - self._loaded_at < self._ttl_s:
            return
        self._versions = await self._load()
        self._loaded_at = now


class OtlpDecoder:
    """Decodes records of the OTLP topic (see the module docstring)."""

    def __init__(
        self,
        topic: str,
        encoding: Encoding,
        max_bytes: int,
        config: MappingConfig,
        versions: ActiveVersions | None = None,
    ) -> None:
        self.topic = topic
        self.encoding: Encoding = encoding
        self.max_bytes = max_bytes
        self.config = config
        self.versions = versions or ActiveVersions(None)
        self._counts: dict[str, int] = {}

    def decode_into(
        self, raw: bytes | None, metrics: list[MetricRow], feedback: list[FeedbackRow]
    ) -> Rejection | None:
        """Append the rows of one record's spans; a rejection when it is not OTLP, too
        big, or holds a span that maps to an invalid event."""
        if raw is None:
            reason = "not_json" if self.encoding == "otlp_json" else "invalid"
            return Rejection(reason=reason, detail="record has no value (tombstone)")
        if len(raw) > self.max_bytes:
            return Rejection(
                reason="oversized", detail=f"{len(raw)} bytes > {self.max_bytes} byte limit"
            )
        try:
            request = parse(raw, self.encoding)
        except WireError as exc:
            return Rejection(reason=exc.reason, detail=exc.detail[:500])
        problems: list[str] = []
        resources: dict[int, dict[str, Any]] = {}
        for resource_spans, _scope, span in spans_of(request):
            resource = resources.get(id(resource_spans))
            if resource is None:
                resource = resources[id(resource_spans)] = attributes(
                    resource_spans.resource.attributes
                )
            problem = self._span(span_view(span, resource), metrics, feedback)
            if problem is not None:
                problems.append(problem)
        if problems:
            return Rejection(
                reason="invalid",
                detail=f"{len(problems)} span(s) are not valid calls or feedback (the "
                f"record's other spans are stored): {problems[0]}"[:500],
            )
        return None

    def _span(
        self, span: SpanView, metrics: list[MetricRow], feedback: list[FeedbackRow]
    ) -> str | None:
        result = map_span(span, self.config, self.versions.get)
        outcome = result.outcome
        problem = None
        call: list[MetricRow] = []
        try:
            if result.metric is not None:
                call.append(metric_row(MetricEvent.model_validate(result.metric)))
            rows = [feedback_row(FeedbackEvent.model_validate(f)) for f in result.feedback]
        except ValidationError as exc:
            err = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in err["loc"])
            problem = f"span {span.span_id} of trace {span.trace_id}: {where}: {err['msg']}"
            outcome, call, rows = "invalid", [], []
        metrics.extend(call)
        feedback.extend(rows)
        self._count(f"spans.{outcome}")
        if rows:
            self._count("feedback", len(rows))
        if result.unscored:
            self._count("feedback_unscored", result.unscored)
        return problem

    def _count(self, name: str, n: int = 1) -> None:
        self._counts[name] = self._counts.get(name, 0) + n

    def take_counts(self) -> dict[str, int]:
        """The counts since the last call (``spans.<outcome>``, ``feedback``, ...)."""
        counts, self._counts = self._counts, {}
        return counts


async def load_active_versions(db: Any) -> dict[str, str]:
    """Every prompt's active version, read from the registry's table."""
    async with db.reader.execute(
        "SELECT name, active_version FROM prompts WHERE active_version IS NOT NULL"
    ) as cur:
        return {str(name): str(version) for name, version in await cur.fetchall()}


def decoder_for(settings: Settings, db: Any) -> OtlpDecoder | None:
    """The OTLP topic's decoder per the settings, or ``None`` when no topic is read."""
    kafka, otlp = settings.kafka, settings.otlp
    if kafka.otlp_topic is None:
        return None
    config = MappingConfig(tuple(otlp.prompt_attributes), otlp.default_prompt, otlp.capture)

    async def load() -> Mapping[str, str]:
        return await load_active_versions(db)

    versions = ActiveVersions(load, otlp.active_versions_ttl_s)
    return OtlpDecoder(
        kafka.otlp_topic, kafka.otlp_encoding, otlp.max_record_bytes, config, versions
    )
