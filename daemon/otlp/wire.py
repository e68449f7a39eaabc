"""OTLP trace records as the OpenTelemetry Collector's Kafka exporter writes them.

The exporter (``exporter/kafkaexporter`` in opentelemetry-collector-contrib) writes one
Kafka record per export: the value is a whole ``ExportTraceServiceRequest``, as protobuf
(``encoding: otlp_proto``, the default) or as OTLP JSON (``otlp_json``). The record key
is empty unless ``partition_traces_by_id`` is set, in which case the request is split
into one record per trace and keyed by the trace id in lowercase hex; headers carry only
what ``include_metadata_keys`` and ``record_headers`` add, never the encoding. So the
encoding of a topic is a setting (``kafka.otlp_encoding``), as it is for the Collector's
own Kafka receiver.

OTLP JSON is the protobuf JSON mapping with one difference that matters: trace and span
ids are hex strings, not base64. :func:`parse` and :func:`encode` translate them, so the
JSON is read and written with protobuf's own ``json_format``, never by hand.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from typing import Any, Final, Literal

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

Encoding = Literal["otlp_proto", "otlp_json"]
ENCODINGS: Final = ("otlp_proto", "otlp_json")
#: The Content-Type of each encoding (OTLP/HTTP).
CONTENT_TYPES: Final = {"otlp_proto": "application/x-protobuf", "otlp_json": "application/json"}

_ID_FIELDS: Final = ("traceId", "spanId", "parentSpanId")


class WireError(ValueError):
    """A record that is not OTLP trace data; ``reason`` is a dead-letter reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse(raw: bytes, encoding: Encoding) -> ExportTraceServiceRequest:
    """Decode one record value; raises :class:`WireError` naming why it is not OTLP."""
    if encoding == "otlp_proto":
        return _parse_proto(raw)
    return _parse_json(raw)


def _parse_proto(raw: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(raw)
    except (DecodeError, RecursionError) as exc:
        raise WireError(
            "invalid", f"not an OTLP ExportTraceServiceRequest (protobuf): {exc}"
        ) from None
    return request


def _parse_json(raw: bytes) -> ExportTraceServiceRequest:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8 as well as bad JSON.
        raise WireError("not_json", f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise WireError("not_object", "the record is JSON but not an object")
    try:
        _ids_to_base64(data)
        return json_format.ParseDict(data, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except (json_format.ParseError, WireError, TypeError, AttributeError, RecursionError) as exc:
        raise WireError(
            "invalid", f"not an OTLP ExportTraceServiceRequest (JSON): {str(exc)[:300]}"
        ) from None


def encode(request: ExportTraceServiceRequest, encoding: Encoding) -> bytes:
    """The record value of ``request`` in ``encoding``, as the Collector writes it."""
    if encoding == "otlp_proto":
        return request.SerializeToString()
    data = json_format.MessageToDict(request, use_integers_for_enums=True)
    _ids_to_hex(data)
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def split_by_trace(
    request: ExportTraceServiceRequest,
) -> list[tuple[str, ExportTraceServiceRequest]]:
    """One request per trace, keyed by the trace id in hex, in the order first seen: what
    the exporter's ``partition_traces_by_id`` does before encoding."""
    traces: dict[bytes, _Trace] = {}
    for r, resource_spans in enumerate(request.resource_spans):
        for s, scope_spans in enumerate(resource_spans.scope_spans):
            for span in scope_spans.spans:
                trace = traces.setdefault(span.trace_id, _Trace())
                trace.scope(r, resource_spans, s, scope_spans).spans.add().CopyFrom(span)
    return [(trace_id.hex(), trace.request) for trace_id, trace in traces.items()]


class _Trace:
    """The request of one trace, with the resources and scopes of its spans copied once."""

    def __init__(self) -> None:
        self.request = ExportTraceServiceRequest()
        self._resources: dict[int, ResourceSpans] = {}
        self._scopes: dict[tuple[int, int], ScopeSpans] = {}

    def scope(
        self, r: int, resource_spans: ResourceSpans, s: int, scope_spans: ScopeSpans
    ) -> ScopeSpans:
        target = self._scopes.get((r, s))
        if target is not None:
            return target
        resource = self._resources.get(r)
        if resource is None:
            resource = self._resources[r] = self.request.resource_spans.add()
            resource.resource.CopyFrom(resource_spans.resource)
            resource.schema_url = resource_spans.schema_url
        target = self._scopes[(r, s)] = resource.scope_spans.add()
        target.scope.CopyFrom(scope_spans.scope)
        target.schema_url = scope_spans.schema_url
        return target


def spans_of(
    request: ExportTraceServiceRequest,
) -> Iterator[tuple[ResourceSpans, ScopeSpans, Span]]:
    """Every span of ``request`` with its resource and scope."""
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield resource_spans, scope_spans, span


def _spans_json(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for resource_spans in _list(data.get("resourceSpans", data.get("resource_spans"))):
        scopes = resource_spans.get("scopeSpans", resource_spans.get("scope_spans"))
        for scope_spans in _list(scopes):
            for span in _list(scope_spans.get("spans")):
                yield span
                yield from _list(span.get("links"))


def _list(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise WireError("invalid", "resourceSpans, scopeSpans, spans and links are lists")
    return value


def _ids_to_base64(data: dict[str, Any]) -> None:
    for item in _spans_json(data):
        for name in _ID_FIELDS:
            snake = _snake(name)
            key = name if name in item else snake if snake in item else None
            if key is None:
                continue
            value = item[key]
            if not isinstance(value, str):
                raise WireError("invalid", f"{name} must be a hex string")
            try:
                item[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise WireError("invalid", f"{name} is not hex: {value[:40]!r}") from None


def _ids_to_hex(data: dict[str, Any]) -> None:
    for item in _spans_json(data):
        for name in _ID_FIELDS:
            if name in item:
                try:
                    item[name] = base64.b64decode(item[name]).hex()
                except binascii.Error:  # pragma: no cover - MessageToDict wrote it
                    raise WireError("invalid", f"{name} is not base64") from None


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)
