"""Real OpenTelemetry spans for the OTLP tests: the Python SDK records them, its OTLP
encoder turns them into an ``ExportTraceServiceRequest``, and :func:`collector_records`
frames that as the Collector's Kafka exporter does.

Two instrumentation styles: :func:`genai_call` writes the GenAI semantic conventions as
an instrumentation following them does (current names, or the previous ones with
``legacy=True``); :func:`openinference_call` writes OpenInference's attributes with the
names from ``openinference-semantic-conventions``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from openinference.semconv.trace import (
    AnnotationAttributes,
    MessageAttributes,
    OpenInferenceSpanKindValues,
    SpanAttributes,
)
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from promptd.daemon.otlp.wire import Encoding, encode, split_by_trace


class Recorder:
    """A tracer provider of its own (never the global one) that keeps finished spans."""

    def __init__(self, service: str = "support-bot") -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer: Tracer = self.provider.get_tracer("app")

    def take(self) -> list[ReadableSpan]:
        """The spans finished since the last call."""
        spans = list(self.exporter.get_finished_spans())
        self.exporter.clear()
        return spans

    def request(self) -> ExportTraceServiceRequest:
        """The finished spans as the OTLP exporters encode them."""
        return encode_spans(self.take())


def genai_call(
    tracer: Tracer,
    *,
    prompt: str | None = "summarize",
    variant: str | None = "v1",
    model: str = "gpt-4o-mini",
    text: str = "Lyon",
    answer: str = "Lyon",
    start_ns: int = 1_800_000_000_000_000_000,
    duration_ms: float = 250.0,
    score: float | None = None,
    label: str | None = None,
    error: str | None = None,
    unit: str | None = None,
    legacy: bool = False,
) -> None:
    """One chat call as the GenAI conventions describe it (``legacy``: semconv <=1.26)."""
    span = tracer.start_span(f"chat {model}", kind=SpanKind.CLIENT, start_time=start_ns)
    attrs: dict[str, Any] = {"gen_ai.request.model": model, "gen_ai.response.model": model}
    if legacy:
        attrs |= {"gen_ai.system": "openai", "gen_ai.usage.prompt_tokens": 12}
        attrs["gen_ai.usage.completion_tokens"] = 3
        span.add_event("gen_ai.content.prompt", {"gen_ai.prompt": text}, timestamp=start_ns)
        span.add_event("gen_ai.content.completion", {"gen_ai.completion": answer})
    else:
        attrs |= {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai"}
        attrs |= {"gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 3}
        user = [{"role": "user", "parts": [{"type": "text", "content": text}]}]
        out = [{"role": "assistant", "parts": [{"type": "text", "content": answer}]}]
        attrs["gen_ai.input.messages"] = json.dumps(user)
        attrs["gen_ai.output.messages"] = json.dumps(out)
    if prompt is not None:
        attrs["gen_ai.prompt.name"] = prompt
    if variant is not None:
        attrs["promptd.variant"] = variant
    if unit is not None:
        attrs["promptd.unit_id"] = unit
    span.set_attributes(attrs)
    if error is not None:
        span.set_attribute("error.type", error)
        span.set_status(Status(StatusCode.ERROR, "the provider answered 500"))
    end_ns = start_ns + int(duration_ms * 1e6)
    if score is not None or label is not None:
        evaluation: dict[str, Any] = {"gen_ai.evaluation.name": "Relevance"}
        if score is not None:
            evaluation["gen_ai.evaluation.score.value"] = score
        if label is not None:
            evaluation["gen_ai.evaluation.score.label"] = label
        span.add_event("gen_ai.evaluation.result", evaluation, timestamp=end_ns)
    span.end(end_time=end_ns)


def openinference_call(
    tracer: Tracer,
    *,
    prompt: str = "city",
    variant: str | None = None,
    variables: dict[str, Any] | None = None,
    answer: str = "Lyon",
    start_ns: int = 1_800_000_000_000_000_000,
    score: float | None = None,
    trace_score: float | None = None,
) -> None:
    """One LLM span as OpenInference instrumentations write it (Phoenix and friends)."""
    span = tracer.start_span("ChatCompletion", start_time=start_ns)
    variables = variables or {"text": "Ship it to Lyon."}
    attrs: dict[str, Any] = {
        SpanAttributes.OPENINFERENCE_SPAN_KIND: OpenInferenceSpanKindValues.LLM.value,
        SpanAttributes.LLM_MODEL_NAME: "gpt-4o-mini",
        SpanAttributes.LLM_TOKEN_COUNT_PROMPT: 20,
        SpanAttributes.LLM_TOKEN_COUNT_COMPLETION: 2,
        SpanAttributes.LLM_COST_TOTAL: 0.00042,
        SpanAttributes.LLM_PROMPT_TEMPLATE_VARIABLES: json.dumps(variables),
        SpanAttributes.INPUT_VALUE: json.dumps(variables),
        SpanAttributes.OUTPUT_VALUE: answer,
        f"{SpanAttributes.LLM_INPUT_MESSAGES}.0.{MessageAttributes.MESSAGE_ROLE}": "user",
        f"{SpanAttributes.LLM_INPUT_MESSAGES}.0.{MessageAttributes.MESSAGE_CONTENT}": "hi",
        f"{SpanAttributes.LLM_OUTPUT_MESSAGES}.0.{MessageAttributes.MESSAGE_ROLE}": "assistant",
        f"{SpanAttributes.LLM_OUTPUT_MESSAGES}.0.{MessageAttributes.MESSAGE_CONTENT}": answer,
        SpanAttributes.USER_ID: "user-7",
        "gen_ai.prompt.name": prompt,
    }
    if variant is not None:
        attrs["promptd.variant"] = variant
    if score is not None:
        attrs |= _annotation(SpanAttributes.ANNOTATIONS, "correctness", score)
    if trace_score is not None:
        attrs |= _annotation(SpanAttributes.TRACE_ANNOTATIONS, "helpfulness", trace_score)
    span.set_attributes(attrs)
    span.end(end_time=start_ns + 120_000_000)


def _annotation(prefix: str, name: str, score: float) -> dict[str, Any]:
    return {
        f"{prefix}.0.{AnnotationAttributes.ANNOTATION_NAME}": name,
        f"{prefix}.0.{AnnotationAttributes.ANNOTATION_SCORE}": score,
        f"{prefix}.0.{AnnotationAttributes.ANNOTATION_ANNOTATOR_KIND}": "HUMAN",
    }


def other_spans(tracer: Tracer, start_ns: int = 1_800_000_000_000_000_000) -> None:
    """Spans that are not LLM calls: an HTTP server span, an embeddings call, a tool."""
    for name, attrs in (
        ("GET /answer", {"http.request.method": "GET"}),
        ("embeddings m", {"gen_ai.operation.name": "embeddings", "gen_ai.prompt.name": "p"}),
        ("execute_tool f", {"gen_ai.operation.name": "execute_tool"}),
    ):
        span = tracer.start_span(name, start_time=start_ns, attributes=attrs)
        span.end(end_time=start_ns + 1_000_000)


def collector_records(
    request: ExportTraceServiceRequest, encoding: Encoding, by_trace: bool = False
) -> list[tuple[bytes | None, bytes]]:
    """(key, value) records as the Collector's Kafka exporter writes ``request``: one
    unkeyed record, or with ``partition_traces_by_id`` one per trace keyed by its hex id."""
    if not by_trace:
        return [(None, encode(request, encoding))]
    return [(key.encode(), encode(one, encoding)) for key, one in split_by_trace(request)]


def values(records: Sequence[tuple[bytes | None, bytes]]) -> list[bytes]:
    """The values of ``records``."""
    return [value for _key, value in records]
