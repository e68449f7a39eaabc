"""OpenTelemetry spans to calls and feedback: real spans from the OpenTelemetry SDK, encoded
by its OTLP encoder and framed as the Collector's Kafka exporter frames them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openinference.semconv.trace import SpanAttributes
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as semconv

from promptd.daemon.otlp import conventions as c
from promptd.daemon.otlp.decoder import ActiveVersions, OtlpDecoder
from promptd.daemon.otlp.mapping import MappingConfig, is_llm_call
from promptd.daemon.otlp.wire import Encoding, parse
from promptd.storage.rows import (
    FeedbackRow,
    FeedbackView,
    MetricRow,
    MetricView,
    feedback_views,
    metric_views,
)
from tests.otel_spans import (
    Recorder,
    collector_records,
    genai_call,
    openinference_call,
    other_spans,
    values,
)

START = 1_800_000_000_000_000_000


def _decoder(encoding: Encoding = "otlp_proto", **config: Any) -> OtlpDecoder:
    return OtlpDecoder("otlp", encoding, 4 * 1024 * 1024, MappingConfig(**config))


def _decode(
    decoder: OtlpDecoder, raws: list[bytes]
) -> tuple[tuple[MetricView, ...], tuple[FeedbackView, ...], list[Any]]:
    metrics: list[MetricRow] = []
    feedback: list[FeedbackRow] = []
    rejections = [decoder.decode_into(raw, metrics, feedback) for raw in raws]
    return metric_views(metrics), feedback_views(feedback), [r for r in rejections if r]


@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
def test_genai_conventions_span_maps_to_a_call_and_its_evaluation(encoding: Encoding) -> None:
    """A chat span as the GenAI conventions write it becomes one call (prompt, variant,
    model, latency, tokens, input messages, output text) and its evaluation event the
    call's feedback, in both Collector encodings."""
    rec = Recorder()
    genai_call(rec.tracer, score=0.75, unit="user-3", text="Where?", answer="Lyon")
    [(key, value)] = collector_records(rec.request(), encoding)
    assert key is None  # the exporter's default: no key
    [call], [fb], dead = _decode(_decoder(encoding), [value])
    assert dead == []
    assert (call.prompt, call.variant, call.model) == ("summarize", "v1", "gpt-4o-mini")
    assert call.latency_ms == pytest.approx(250.0)
    assert call.ts == pytest.approx(START / 1e9)
    assert (call.tokens_in, call.tokens_out, call.success) == (12, 3, True)
    assert call.unit_id == "user-3"
    assert json.loads(call.input or "")["messages"][0]["parts"][0]["content"] == "Where?"
    assert json.loads(call.output or "") == "Lyon"
    assert call.request_id == f"{call.episode_id}-{call.event_id.rsplit(':', 1)[1]}"
    assert json.loads(call.attributes or "")["gen_ai.provider.name"] == "openai"
    assert json.loads(call.attributes or "")["service.name"] == "support-bot"
    assert (fb.request_id, fb.prompt, fb.variant) == (call.request_id, "summarize", "v1")
    assert (fb.score, fb.kind, fb.episode_id) == (0.75, "relevance", call.episode_id)
    assert fb.source == "eval:Relevance"  # the app's automatic evaluation, not people's


def test_previous_genai_names_map_the_same() -> None:
    """semconv <=1.26 spans (gen_ai.system, prompt/completion tokens, content events, no
    operation name) give the same call."""
    rec = Recorder()
    genai_call(rec.tracer, legacy=True, text="Where?", answer="Lyon")
    [call], _, dead = _decode(_decoder(), [rec.request().SerializeToString()])
    assert dead == []
    assert (call.tokens_in, call.tokens_out, call.model) == (12, 3, "gpt-4o-mini")
    assert (json.loads(call.input or ""), json.loads(call.output or "")) == ("Where?", "Lyon")


def test_failed_span_is_an_unsuccessful_call_with_its_error_type() -> None:
    """Status ERROR and error.type make an unsuccessful call naming the error."""
    rec = Recorder()
    genai_call(rec.tracer, error="RateLimitError")
    [call], _, _ = _decode(_decoder(), [rec.request().SerializeToString()])
    assert (call.success, call.error) == (False, "RateLimitError")


def test_openinference_span_maps_variables_cost_and_annotations() -> None:
    """OpenInference's names: template variables become the input (what the optimizer
    renders), cost and tokens are read, span annotations are the call's feedback and
    trace annotations the whole trace's (episode feedback)."""
    rec = Recorder()
    variables = {"text": "Please ship 3 boxes to Oslo."}
    openinference_call(rec.tracer, variables=variables, score=1.0, trace_score=0.5)
    [call], feedback, dead = _decode(_decoder(), [rec.request().SerializeToString()])
    assert dead == []
    assert (call.prompt, call.model, call.tokens_in, call.tokens_out) == (
        "city",
        "gpt-4o-mini",
        20,
        2,
    )
    assert call.cost_usd == pytest.approx(0.00042)
    assert call.unit_id == "user-7"
    assert json.loads(call.input or "") == variables
    assert json.loads(call.output or "") == "Lyon"
    on_call, on_trace = sorted(feedback, key=lambda f: f.request_id is None)
    assert (on_call.request_id, on_call.kind, on_call.score) == (
        call.request_id,
        "correctness",
        1.0,
    )
    assert (on_trace.request_id, on_trace.episode_id) == (None, call.episode_id)
    assert (on_trace.kind, on_trace.score) == ("helpfulness", 0.5)
    assert on_call.source is None
    assert on_trace.source is None


def test_non_llm_spans_are_skipped_and_counted() -> None:
    """HTTP, embeddings and tool spans give no call; an LLM span without a prompt name is
    skipped as no_prompt unless a default prompt is configured; all are counted."""
    rec = Recorder()
    other_spans(rec.tracer)
    genai_call(rec.tracer, prompt=None)
    genai_call(rec.tracer)
    raw = rec.request().SerializeToString()
    decoder = _decoder()
    metrics, _, dead = _decode(decoder, [raw])
    assert (len(metrics), dead) == (1, [])
    assert decoder.take_counts() == {"spans.not_llm": 3, "spans.no_prompt": 1, "spans.call": 1}
    defaulted = _decoder(default_prompt="chat")
    metrics, _, _ = _decode(defaulted, [raw])
    assert sorted(m.prompt for m in metrics) == ["chat", "summarize"]


@pytest.mark.parametrize(
    ("attrs", "is_call"),
    [
        ({"gen_ai.operation.name": "chat"}, True),
        ({"gen_ai.operation.name": "generate_content"}, True),
        ({"gen_ai.operation.name": "embeddings", "gen_ai.system": "openai"}, False),
        ({"gen_ai.system": "openai"}, True),
        ({"openinference.span.kind": "LLM"}, True),
        ({"openinference.span.kind": "CHAIN", "gen_ai.system": "openai"}, False),
        ({"llm.request.type": "completion"}, True),
        ({"langfuse.observation.type": "generation"}, True),
        ({"langfuse.observation.type": "span"}, False),
        ({"http.request.method": "GET"}, False),
    ],
)
def test_which_spans_are_llm_calls(attrs: dict[str, Any], is_call: bool) -> None:
    """Each style's marker of a model call, and the operations that are not calls."""
    assert is_llm_call(attrs) is is_call


def test_span_without_variant_takes_the_active_version() -> None:
    """Without promptd.variant the call is attributed to the prompt's active version, or
    to ``default`` for a prompt the registry does not know."""
    rec = Recorder()
    genai_call(rec.tracer, variant=None)
    genai_call(rec.tracer, variant=None, prompt="unknown-prompt")
    decoder = _decoder()
    decoder.versions = ActiveVersions(None)
    decoder.versions._versions = {"summarize": "v7"}
    metrics, _, _ = _decode(decoder, [rec.request().SerializeToString()])
    assert sorted(m.variant for m in metrics) == ["default", "v7"]


async def test_active_versions_reload_after_their_ttl() -> None:
    """The active versions are loaded on refresh and reloaded only once the TTL passed."""
    loads: list[int] = []

    async def load() -> dict[str, str]:
        loads.append(1)
        return {"summarize": f"v{len(loads)}"}

    versions = ActiveVersions(load, ttl_s=3600)
    await versions.refresh()
    await versions.refresh()
    assert (versions.get("summarize"), len(loads)) == ("v1", 1)


def test_span_published_by_the_sdk_gives_only_its_feedback() -> None:
    """A span carrying promptd.request_id (the SDK's otel_spans option) is no second
    call; feedback recorded on it joins that request id."""
    rec = Recorder()
    with rec.tracer.start_as_current_span("handler") as span:
        span.set_attributes(
            {"gen_ai.operation.name": "chat", "gen_ai.prompt.name": "summarize"}
            | {"promptd.variant": "v2", "promptd.request_id": "req-42"}
        )
        span.add_event("gen_ai.evaluation.result", {"gen_ai.evaluation.score.label": "pass"})
    decoder = _decoder()
    metrics, [fb], _ = _decode(decoder, [rec.request().SerializeToString()])
    assert metrics == ()
    assert (fb.request_id, fb.variant, fb.score) == ("req-42", "v2", 1.0)
    assert decoder.take_counts() == {"spans.published_by_sdk": 1, "feedback": 1}


def test_span_evaluations_are_an_evaluators_feedback() -> None:
    """A span's evaluations (semconv events, OpenInference ``evaluations``) are the app's
    automatic evaluations: their source is ``eval:<name>``, the name cut to an evaluator
    name, so every reader of people's feedback leaves them out."""
    rec = Recorder()
    with rec.tracer.start_as_current_span("chat") as span:
        span.set_attributes(
            {"gen_ai.operation.name": "chat", "gen_ai.prompt.name": "summarize"}
            | {"evaluations.0.evaluation.name": "faithful", "evaluations.0.evaluation.score": 1.0}
        )
        for name in ("LLM judge / v2", "", "__x"):
            attrs: dict[str, Any] = {"gen_ai.evaluation.score.value": 0.5}
            if name:
                attrs["gen_ai.evaluation.name"] = name
            span.add_event("gen_ai.evaluation.result", attrs)
    _, feedback, _ = _decode(_decoder(), [rec.request().SerializeToString()])
    assert sorted(f.source or "" for f in feedback) == [
        "eval:LLM_judge___v2",
        "eval:faithful",
        "eval:otel",
        "eval:x",
    ]


def test_unscored_evaluations_are_counted_not_stored() -> None:
    """An evaluation score outside 0..1 without a known label gives no feedback."""
    rec = Recorder()
    genai_call(rec.tracer, score=4.0)
    genai_call(rec.tracer, score=4.0, label="incorrect")
    decoder = _decoder()
    _, feedback, _ = _decode(decoder, [rec.request().SerializeToString()])
    assert [f.score for f in feedback] == [0.0]
    assert decoder.take_counts()["feedback_unscored"] == 1


def test_both_framings_decode_to_the_same_rows_with_stable_ids() -> None:
    """otlp_proto and otlp_json (hex ids, split per trace like partition_traces_by_id)
    give identical rows, and reading a record twice gives the same event ids."""
    rec = Recorder()
    for i in range(3):
        genai_call(rec.tracer, start_ns=START + i * 10**9, score=0.5)
    request = rec.request()
    proto = values(collector_records(request, "otlp_proto"))
    by_trace = collector_records(request, "otlp_json", by_trace=True)
    assert len(by_trace) == 3
    for key, value in by_trace:
        trace_id = json.loads(value)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"]
        assert key == trace_id.encode()
        assert len(trace_id) == 32
    from_proto = _decode(_decoder(), proto + proto)
    from_json = _decode(_decoder("otlp_json"), values(by_trace))
    assert sorted(from_proto[0])[::2] == sorted(from_json[0])
    assert sorted(from_proto[1])[::2] == sorted(from_json[1])


@pytest.mark.parametrize(
    ("encoding", "raw", "reason"),
    [
        ("otlp_json", b"{not json", "not_json"),
        ("otlp_json", b"[1, 2]", "not_object"),
        ("otlp_json", b'{"resourceSpans": 3}', "invalid"),
        (
            "otlp_json",
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
            "invalid",
        ),
        ("otlp_proto", b"\xff\xff\xff", "invalid"),
        ("otlp_proto", None, "invalid"),
        ("otlp_proto", b"\n" * 5000, "oversized"),
    ],
)
def test_records_that_are_not_otlp_get_the_usual_dead_letter_reasons(
    encoding: Encoding, raw: bytes | None, reason: str
) -> None:
    """Bad records are rejected with the wire contract's reason codes."""
    decoder = OtlpDecoder("otlp", encoding, 4096, MappingConfig())
    rejection = decoder.decode_into(raw, [], [])
    assert rejection is not None
    assert rejection.reason == reason, rejection.detail


def test_an_invalid_span_dead_letters_its_record_and_keeps_the_others() -> None:
    """A span that maps to an invalid call (prompt name over 200 characters) makes the
    record a dead letter naming it; the record's valid span is still stored."""
    rec = Recorder()
    genai_call(rec.tracer, prompt="p" * 300)
    genai_call(rec.tracer)
    decoder = _decoder()
    [call], _, [rejection] = _decode(decoder, [rec.request().SerializeToString()])
    assert call.prompt == "summarize"
    assert rejection.reason == "invalid"
    assert "prompt" in rejection.detail
    assert decoder.take_counts() == {"spans.invalid": 1, "spans.call": 1}


def test_json_encoding_round_trips_hex_ids() -> None:
    """OTLP JSON carries hex trace and span ids, which parse back to the same bytes."""
    rec = Recorder()
    genai_call(rec.tracer)
    request = rec.request()
    [(_, value)] = collector_records(request, "otlp_json")
    span = json.loads(value)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    original = request.resource_spans[0].scope_spans[0].spans[0]
    assert (span["traceId"], span["spanId"]) == (original.trace_id.hex(), original.span_id.hex())
    assert parse(value, "otlp_json") == request


def test_attribute_names_match_the_published_conventions() -> None:
    """The names read are the ones the official packages publish (semconv GenAI
    attributes, OpenInference's), so a typo cannot hide."""
    assert c.OPERATION == semconv.GEN_AI_OPERATION_NAME
    assert c.DEFAULT_PROMPT_ATTRIBUTES[0] == semconv.GEN_AI_PROMPT_NAME
    assert c.TOKENS_IN[:2] == (
        semconv.GEN_AI_USAGE_INPUT_TOKENS,
        semconv.GEN_AI_USAGE_PROMPT_TOKENS,
    )
    assert c.TOKENS_OUT[:2] == (
        semconv.GEN_AI_USAGE_OUTPUT_TOKENS,
        semconv.GEN_AI_USAGE_COMPLETION_TOKENS,
    )
    assert c.MODEL[:2] == (semconv.GEN_AI_REQUEST_MODEL, semconv.GEN_AI_RESPONSE_MODEL)
    assert c.GENAI_MARKERS == (semconv.GEN_AI_PROVIDER_NAME, semconv.GEN_AI_SYSTEM)
    assert (c.INPUT_MESSAGES, c.OUTPUT_MESSAGES) == (
        semconv.GEN_AI_INPUT_MESSAGES,
        semconv.GEN_AI_OUTPUT_MESSAGES,
    )
    assert (c.EVALUATION_NAME, c.EVALUATION_SCORE, c.EVALUATION_LABEL) == (
        semconv.GEN_AI_EVALUATION_NAME,
        semconv.GEN_AI_EVALUATION_SCORE_VALUE,
        semconv.GEN_AI_EVALUATION_SCORE_LABEL,
    )
    assert (c.LEGACY_PROMPT_EVENT[1], c.LEGACY_COMPLETION_EVENT[1]) == (
        semconv.GEN_AI_PROMPT,
        semconv.GEN_AI_COMPLETION,
    )
    assert c.OPENINFERENCE_KIND == SpanAttributes.OPENINFERENCE_SPAN_KIND
    assert c.TOKENS_IN[2] == SpanAttributes.LLM_TOKEN_COUNT_PROMPT
    assert c.TOKENS_OUT[2] == SpanAttributes.LLM_TOKEN_COUNT_COMPLETION
    assert c.MODEL[2] == SpanAttributes.LLM_MODEL_NAME
    assert c.COST[1] == SpanAttributes.LLM_COST_TOTAL
    assert c.INPUT_VARIABLES[1] == SpanAttributes.LLM_PROMPT_TEMPLATE_VARIABLES
    assert (c.INPUT_VALUE, c.OUTPUT_VALUE) == (
        SpanAttributes.INPUT_VALUE,
        SpanAttributes.OUTPUT_VALUE,
    )
    assert [p for p, _, _ in c.OI_FEEDBACK] == [
        SpanAttributes.ANNOTATIONS,
        SpanAttributes.EVALUATIONS,
        SpanAttributes.TRACE_ANNOTATIONS,
        SpanAttributes.TRACE_EVALUATIONS,
    ]
