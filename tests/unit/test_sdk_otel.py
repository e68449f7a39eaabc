"""The SDK's otel_spans option: promptd's calls annotate the app's current span."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import promptd
from promptd.daemon.otlp.decoder import OtlpDecoder
from promptd.daemon.otlp.mapping import MappingConfig
from promptd.sdk import Client, SdkConfig
from tests.otel_spans import Recorder


@pytest.fixture
def sdk() -> Iterator[Client]:
    """A client with the option on that publishes nothing."""
    client = Client(SdkConfig(bootstrap_servers=None, registry=False, otel_spans=True))
    yield client
    client.close(0.1)


class _Answer:
    model = "gpt-4o-mini"

    class usage:  # the shape of an OpenAI response
        prompt_tokens = 11
        completion_tokens = 4


def test_call_sets_genai_attributes_on_the_current_span(sdk: Client) -> None:
    """Inside the app's span, an instrumented call sets the prompt, model, tokens, the
    variant that served it and its request id on that span."""
    rec = Recorder()

    @promptd.instrument("summarize", version="v3", unit_id="user", client=sdk)
    def answer(user: str) -> Any:
        return _Answer()

    with rec.tracer.start_as_current_span("POST /answer"):
        answer("user-9")
    [span] = rec.take()
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.prompt.name"] == "summarize"
    assert (attrs["promptd.variant"], attrs["promptd.unit_id"]) == ("v3", "user-9")
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (11, 4)
    assert str(attrs["promptd.request_id"]).startswith(sdk._prefix)


def test_failed_call_sets_error_type(sdk: Client) -> None:
    """A call that raises names its exception type on the span."""
    rec = Recorder()

    @promptd.instrument("summarize", client=sdk)
    def answer() -> str:
        raise TimeoutError

    with rec.tracer.start_as_current_span("job"), pytest.raises(TimeoutError):
        answer()
    [span] = rec.take()
    assert (span.attributes or {})["error.type"] == "TimeoutError"


def test_annotated_span_is_not_a_second_call_but_carries_feedback(sdk: Client) -> None:
    """The daemon reads an SDK-annotated span as already published: no call, while an
    evaluation recorded on it joins the SDK's request id."""
    rec = Recorder()

    @promptd.instrument("summarize", version="v3", client=sdk)
    def answer() -> str:
        return "ok"

    with rec.tracer.start_as_current_span("POST /answer") as span:
        answer()
        span.add_event("gen_ai.evaluation.result", {"gen_ai.evaluation.score.value": 1.0})
    raw = rec.request().SerializeToString()
    decoder = OtlpDecoder("otlp", "otlp_proto", 1 << 20, MappingConfig())
    metrics: list[Any] = []
    feedback: list[Any] = []
    assert decoder.decode_into(raw, metrics, feedback) is None
    assert metrics == []
    [row] = feedback
    assert row[5] == promptd.last_request_id()


def test_option_off_never_imports_opentelemetry() -> None:
    """Without the option neither opentelemetry nor protobuf is imported, by the import
    or by instrumented calls."""
    code = (
        "import sys, promptd\n"
        "c = promptd.sdk.Client(promptd.SdkConfig(registry=False))\n"
        "f = promptd.instrument('p', client=c)(lambda: 'x')\n"
        "f()\n"
        "print([m for m in ('opentelemetry', 'google.protobuf') if m in sys.modules])\n"
        "c.close(0.1)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
