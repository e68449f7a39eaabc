"""``POST /v1/traces``: OTLP/HTTP trace export, published to the OTLP topic.

Any OTLP/HTTP exporter can point at the daemon (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=
http://daemon:8787/v1/traces``, with ``Authorization: Bearer <admin token>`` in
``OTEL_EXPORTER_OTLP_TRACES_HEADERS`` when a token is set). The body is an
``ExportTraceServiceRequest`` as protobuf (``application/x-protobuf``) or OTLP JSON
(``application/json``), gzip or not. It is not mapped here: the route splits it into one
record per trace, keyed by trace id and encoded as the topic's ``kafka.otlp_encoding``
(what the Collector's Kafka exporter writes with ``partition_traces_by_id``), and answers
200 once the broker has acknowledged every record. Ingestion then reads them like any
record of the topic, so nothing is stored twice or lost on a crash.

Answers: 200 with an empty ``ExportTraceServiceResponse`` in the request's encoding; 400
for a body that is not OTLP; 401 without the admin token (when one is set); 413 for a
body over 1 MiB or a trace too big for one record; 415 for another Content-Type; 503
(``Retry-After``) while Kafka cannot take the records, which OTLP exporters retry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import structlog
from aiohttp import web

from promptd.daemon.http import json_error, require_admin
from promptd.daemon.kafka import Headers, KafkaSendError
from promptd.daemon.otlp.wire import (
    CONTENT_TYPES,
    Encoding,
    WireError,
    encode,
    parse,
    split_by_trace,
)
from promptd.daemon.settings import Settings

log = structlog.get_logger("promptd.api.traces")

Record = tuple[bytes | None, bytes | None, Headers]
Publish = Callable[[str, Sequence[Record]], Awaitable[None]]

#: Largest record the route publishes: Apache Kafka's default ``message.max.bytes`` is
#: about 1 MB, and the daemon's producer caps requests there too.
MAX_PUBLISHED_BYTES = 1_000_000
_ENCODING_OF: dict[str, Encoding] = {
    "application/x-protobuf": "otlp_proto",
    "application/json": "otlp_json",
}
_UNSUPPORTED = "Content-Type must be application/x-protobuf or application/json"


def add_routes(app: web.Application, settings: Settings, publish: Publish) -> None:
    """Register ``POST /v1/traces`` (only when ``kafka.otlp_topic`` is set)."""
    topic = settings.kafka.otlp_topic
    if topic is None:
        return
    limit = min(settings.otlp.max_record_bytes, MAX_PUBLISHED_BYTES)
    encoding: Encoding = settings.kafka.otlp_encoding

    async def export(request: web.Request) -> web.StreamResponse:
        denied = require_admin(request)
        if denied is not None:
            return denied
        given = _ENCODING_OF.get(request.content_type)
        if given is None:
            return json_error(415, _UNSUPPORTED)
        try:
            traces = split_by_trace(parse(await request.read(), given))
        except WireError as exc:
            return json_error(400, exc.detail)
        records: list[Record] = [(key.encode(), encode(one, encoding), []) for key, one in traces]
        too_big = next((r for r in records if r[1] is not None and len(r[1]) > limit), None)
        if too_big is not None:
            return json_error(
                413, f"trace {too_big[0]!r} is over {limit} bytes as one {encoding} record"
            )
        try:
            await publish(topic, records)
        except KafkaSendError as exc:
            log.warning("otlp_publish_failed", error=str(exc), records=len(records))
            response = json_error(503, f"Kafka cannot take the spans now: {exc.reason}")
            response.headers["Retry-After"] = "5"
            return response
        log.debug("otlp_traces_published", traces=len(records), encoding=given)
        body = b"" if given == "otlp_proto" else b"{}"
        return web.Response(body=body, content_type=CONTENT_TYPES[given])

    app.router.add_post("/v1/traces", export)
