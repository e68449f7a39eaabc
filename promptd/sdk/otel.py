"""The SDK's ``otel_spans`` option: each instrumented call annotates the app's current span.

With ``promptd.configure(otel_spans=True)`` (or ``PROMPTD_SDK_OTEL_SPANS=true``), every
call of an ``@promptd.instrument`` function sets on the span current around it (the
app's own, e.g. an HTTP handler's or a framework's) the GenAI attributes of the call, so
promptd's calls show up in the team's existing traces:

- ``gen_ai.prompt.name``, ``gen_ai.request.model``, ``gen_ai.usage.input_tokens`` and
  ``gen_ai.usage.output_tokens`` (GenAI semantic conventions 1.37+), and ``error.type``
  when the call raised;
- ``promptd.variant`` (the version that served it), ``promptd.request_id`` and
  ``promptd.unit_id``.

``gen_ai.operation.name`` is not set: the current span is the app's, not necessarily a
model call. The daemon reads such spans (when they reach its OTLP topic) as already
published by the SDK: no second call, but feedback recorded on them joins the call by
``promptd.request_id``. ``opentelemetry-api`` is imported on the first annotated call
only (``pip install 'promptd[otel]'``); with the option off it is never imported.
"""

from __future__ import annotations

from typing import Any

_trace: Any = None


def annotate_current_span(
    prompt: str,
    variant: str,
    request_id: str,
    unit_id: str | None,
    model: str,
    tokens_in: int | None,
    tokens_out: int | None,
    error: str | None,
) -> None:
    """Set the call's attributes on the current span, if one is recording."""
    global _trace
    if _trace is None:
        from opentelemetry import trace

        _trace = trace
    span = _trace.get_current_span()
    if not span.is_recording():
        return
    values: dict[str, Any] = {
        "gen_ai.prompt.name": prompt,
        "gen_ai.request.model": model,
        "gen_ai.usage.input_tokens": tokens_in,
        "gen_ai.usage.output_tokens": tokens_out,
        "error.type": error,
        "promptd.variant": variant,
        "promptd.request_id": request_id,
        "promptd.unit_id": unit_id,
    }
    span.set_attributes({k: v for k, v in values.items() if v is not None})
