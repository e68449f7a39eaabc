"""One span to a call (a MetricEvent's fields) and its feedback, pure.

The attribute names and the conventions they follow are in :mod:`.conventions`. The
rules, documented for operators in ``docs/opentelemetry.md``:

- a span is a call when it is an LLM operation (``gen_ai.operation.name`` ``chat``,
  ``text_completion`` or ``generate_content``; without an operation name, a
  ``gen_ai.provider.name`` or ``gen_ai.system``; OpenInference kind ``LLM``; OpenLLMetry
  request type ``chat`` or ``completion``; a Langfuse ``generation``); every other span is
  skipped (``not_llm``);
- its prompt is the first of ``otlp.prompt_attributes`` on the span, then on its resource,
  then ``otlp.default_prompt``; without one it is skipped (``no_prompt``);
- its variant is ``promptd.variant``, else the prompt's active version, else ``default``;
- a span the SDK already published (``promptd.request_id``) gives no second call
  (``published_by_sdk``), only its feedback, joined to that request id;
- ids are deterministic, so a span read twice is stored once: the call's ``event_id``
  is ``otel:<trace id>:<span id>``, its ``request_id`` ``<trace id>-<span id>``, its
  ``episode_id`` the trace id;
- the span's evaluations (``gen_ai.evaluation.result`` events, OpenInference
  ``evaluations``) are the app's automatic evaluations: feedback with the source
  ``eval:<evaluation name>``, read as an evaluator's, not as people's; OpenInference
  ``annotations`` stay people's feedback (no source).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from promptd.daemon.otlp import conventions as c
from promptd.events import (
    MAX_ATTRIBUTE_VALUE_CHARS,
    MAX_CAPTURE_BYTES,
    MAX_COMMENT_CHARS,
    MAX_ERROR_CHARS,
    MAX_KIND_CHARS,
    SOURCE_PREFIX,
)

#: The variant of a call whose span names none, for a prompt with no active version.
DEFAULT_VARIANT: Final = "default"

Attributes = Mapping[str, Any]

_HEADS = re.compile(r"^(.+?)\.\d+\.", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class EventView:
    """A span event: name, time (ns since the epoch) and attributes."""

    name: str
    time_ns: int
    attributes: Attributes


@dataclass(frozen=True, slots=True)
class SpanView:
    """What the mapping reads of a span (plain values; see :mod:`.decoder`)."""

    trace_id: str
    span_id: str
    start_ns: int
    end_ns: int
    failed: bool
    status_message: str
    attributes: Attributes
    resource: Attributes = field(default_factory=dict)
    events: Sequence[EventView] = ()
    #: The prefixes of the span's indexed attributes (``llm.input_messages`` of
    #: ``llm.input_messages.0.message.role``), so a style the span does not use costs a
    #: set lookup rather than a scan of its attributes.
    indexed: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        # One regex pass over all keys (one per line) rather than one match per key.
        heads = _HEADS.findall("\n".join(self.attributes))
        object.__setattr__(self, "indexed", frozenset(heads))


@dataclass(frozen=True, slots=True)
class MappingConfig:
    """The operator's choices (``[otlp]`` settings)."""

    prompt_attributes: tuple[str, ...] = c.DEFAULT_PROMPT_ATTRIBUTES
    default_prompt: str | None = None
    capture: bool = True


@dataclass(slots=True)
class SpanResult:
    """A mapped span: the call's fields (or why there is none) and its feedback."""

    metric: dict[str, Any] | None = None
    skipped: str | None = None
    feedback: list[dict[str, Any]] = field(default_factory=list)
    #: Feedback found on the span without a usable score (counted, not stored).
    unscored: int = 0

    @property
    def outcome(self) -> str:
        """``call`` or the reason the span gave none."""
        return self.skipped or "call"


def is_llm_call(attrs: Attributes) -> bool:
    """Whether a span's attributes describe one model call (see the module docstring)."""
    operation = attrs.get(c.OPERATION)
    if operation is not None:
        return operation in c.LLM_OPERATIONS
    if attrs.get(c.OPENINFERENCE_KIND) is not None:
        return attrs.get(c.OPENINFERENCE_KIND) == c.OPENINFERENCE_LLM
    if attrs.get(c.OPENLLMETRY_REQUEST_TYPE) in c.OPENLLMETRY_LLM:
        return True
    if attrs.get(c.LANGFUSE_TYPE) == c.LANGFUSE_LLM:
        return True
    return any(attrs.get(marker) for marker in c.GENAI_MARKERS)


def map_span(
    span: SpanView, config: MappingConfig, active_version: Callable[[str], str | None]
) -> SpanResult:
    """The call and feedback of ``span``, or the reason it has none."""
    attrs = span.attributes
    # A span the SDK annotated (not necessarily a model call itself) still carries the
    # call's feedback.
    if not is_llm_call(attrs) and c.REQUEST_ID not in attrs:
        return SpanResult(skipped="not_llm")
    prompt = (
        _first_str(attrs, config.prompt_attributes)
        or _first_str(span.resource, config.prompt_attributes)
        or config.default_prompt
    )
    if prompt is None:
        return SpanResult(skipped="no_prompt")
    variant = _str(attrs.get(c.VARIANT)) or active_version(prompt) or DEFAULT_VARIANT
    model = _first_str(attrs, c.MODEL) or "unknown"
    published = _str(attrs.get(c.REQUEST_ID))
    request_id = published or f"{span.trace_id}-{span.span_id}"
    result = SpanResult()
    _feedback(span, {"prompt": prompt, "variant": variant, "model": model}, request_id, result)
    if published:
        result.skipped = "published_by_sdk"
        return result
    result.metric = _call(span, config, prompt, variant, model, request_id)
    return result


def _call(
    span: SpanView,
    config: MappingConfig,
    prompt: str,
    variant: str,
    model: str,
    request_id: str,
) -> dict[str, Any]:
    attrs = span.attributes
    error = _str(attrs.get(c.ERROR_TYPE))
    failed = span.failed or error is not None
    metric: dict[str, Any] = {
        "type": "metric",
        "event_id": f"otel:{span.trace_id}:{span.span_id}",
        "ts": span.start_ns / 1e9,
        "prompt": prompt,
        "variant": variant,
        "model": model,
        "request_id": request_id,
        "episode_id": span.trace_id,
        "unit_id": _first_str(attrs, c.UNIT),
        # A span that ends before it starts is refused by validation (negative latency).
        "latency_ms": (span.end_ns - span.start_ns) / 1e6,
        "success": not failed,
        "error": (error or span.status_message or "error")[:MAX_ERROR_CHARS] if failed else None,
        "tokens_in": _first_int(attrs, c.TOKENS_IN),
        "tokens_out": _first_int(attrs, c.TOKENS_OUT),
        "cost_usd": _first_float(attrs, c.COST),
        "quality": _float(attrs.get(c.QUALITY)),
        "attributes": _call_attributes(span),
    }
    if config.capture:
        metric["input"] = _capped(input_of(span))
        metric["output"] = _capped(output_of(span))
    return {k: v for k, v in metric.items() if v is not None}


def _call_attributes(span: SpanView) -> dict[str, str]:
    out = {"otel.trace_id": span.trace_id, "otel.span_id": span.span_id}
    provider = _first_str(span.attributes, c.PROVIDER)
    if provider:
        out["gen_ai.provider.name"] = provider[:MAX_ATTRIBUTE_VALUE_CHARS]
    service = _str(span.resource.get(c.SERVICE_NAME))
    if service:
        out["service.name"] = service[:MAX_ATTRIBUTE_VALUE_CHARS]
    return out


# -- captured input and output -----------------------------------------------------


def input_of(span: SpanView) -> dict[str, Any] | str | None:
    """The call's input: template variables when the span names them (what the optimizer
    renders a template with), else the chat history as ``{"messages": [...]}``, else text."""
    attrs = span.attributes
    for key in c.INPUT_VARIABLES:
        variables = _json_value(attrs.get(key))
        if isinstance(variables, dict):
            return variables
    messages = _chat(span, c.INPUT_MESSAGES, c.OI_INPUT_MESSAGES, c.OLL_PROMPT)
    if messages:
        return {"messages": messages}
    return _text_value(attrs.get(c.INPUT_VALUE)) or _event_text(span, c.LEGACY_PROMPT_EVENT)


def output_of(span: SpanView) -> dict[str, Any] | str | None:
    """The call's output: the text of the first answer when it is text, else the answer."""
    attrs = span.attributes
    given = _json_value(attrs.get(c.OUTPUT))
    if isinstance(given, dict | str):
        return given
    messages = _chat(span, c.OUTPUT_MESSAGES, c.OI_OUTPUT_MESSAGES, c.OLL_COMPLETION)
    if messages:
        return _answer(messages[0])
    return _text_value(attrs.get(c.OUTPUT_VALUE)) or _event_text(span, c.LEGACY_COMPLETION_EVENT)


def _chat(span: SpanView, semconv: str, openinference: str, openllmetry: str) -> list[Any]:
    """Messages from the first style that has them: semconv 1.37+ (one attribute), then
    OpenInference's and OpenLLMetry's flattened ``<prefix>.<i>...`` attributes."""
    return (
        _messages(span.attributes.get(semconv))
        or _indexed_messages(span, openinference, ".message.")
        or _indexed_messages(span, openllmetry, ".")
    )


def _answer(message: dict[str, Any]) -> dict[str, Any] | str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    parts = message.get("parts")
    if isinstance(parts, list):
        texts = [p.get("content") for p in parts if isinstance(p, dict) and p.get("type") == "text"]
        strings = [t for t in texts if isinstance(t, str)]
        if strings and len(strings) == len(parts):
            return "".join(strings)
    return message


def _messages(value: Any) -> list[dict[str, Any]] | None:
    value = _json_value(value)
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return value
    return None


_INDEX = re.compile(r"(\d+)(.+)")


def _indexed_messages(span: SpanView, prefix: str, middle: str) -> list[dict[str, Any]]:
    """``<prefix>.<i><middle><field>`` attributes as a list of ``{field: value}``."""
    fields = _indexed(span, prefix, middle)
    return [fields[i] for i in sorted(fields) if "content" in fields[i]]


def _indexed(span: SpanView, prefix: str, middle: str) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    if prefix not in span.indexed:
        return out
    start = prefix + "."
    for key, value in span.attributes.items():
        if not key.startswith(start):
            continue
        found = _INDEX.fullmatch(key[len(start) :])
        if found is None or not found.group(2).startswith(middle):
            continue
        name = found.group(2)[len(middle) :]
        if name and "." not in name:
            out.setdefault(int(found.group(1)), {})[name] = value
    return out


def _event_text(span: SpanView, spec: tuple[str, str]) -> str | None:
    name, key = spec
    for event in span.events:
        if event.name == name:
            text = _str(event.attributes.get(key))
            if text:
                return text
    # Some instrumentations put the same attribute on the span itself.
    return _str(span.attributes.get(key))


def _text_value(value: Any) -> dict[str, Any] | str | None:
    parsed = _json_value(value)
    return parsed if isinstance(parsed, dict) else _str(value)


def _capped(value: Any) -> Any:
    """``value`` when it fits the capture cap, else ``None``: an oversized capture is
    dropped rather than the call refused."""
    if value is None:
        return None
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    return value if size <= MAX_CAPTURE_BYTES else None


# -- feedback ----------------------------------------------------------------------


def _feedback(span: SpanView, call: dict[str, str], request_id: str, result: SpanResult) -> None:
    """Append the span's feedback to ``result``: semconv evaluation events, then
    OpenInference annotations and evaluations (span-level: the call; trace-level: the
    trace as an episode)."""
    base = f"otel:{span.trace_id}:{span.span_id}"
    # Feedback on the call names the call; feedback on the whole trace, its episode.
    on_call = {**call, "request_id": request_id, "episode_id": span.trace_id}
    on_trace = {**call, "episode_id": span.trace_id}
    for i, event in enumerate(span.events):
        if event.name == c.EVALUATION_EVENT:
            a = event.attributes
            found = _verdict(
                a.get(c.EVALUATION_NAME), a.get(c.EVALUATION_SCORE), a.get(c.EVALUATION_LABEL)
            )
            when = event.time_ns or span.end_ns
            extra = {
                "event_id": f"{base}:eval:{i}",
                "ts": when / 1e9,
                "source": evaluation_source(a.get(c.EVALUATION_NAME)),
            }
            _add(result, found, {**on_call, **extra}, a.get(c.EVALUATION_EXPLANATION))
    for prefix, kind, whole_trace in c.OI_FEEDBACK:
        for i, f in sorted(_indexed(span, prefix, f".{kind}.").items()):
            found = _verdict(f.get("name"), f.get("score"), f.get("label"))
            extra = {"event_id": f"{base}:{prefix}:{i}", "ts": span.end_ns / 1e9}
            if kind == "evaluation":
                extra["source"] = evaluation_source(f.get("name"))
            target = on_trace if whole_trace else on_call
            _add(result, found, {**target, **extra}, f.get("explanation"))


def evaluation_source(name: Any) -> str:
    """The ``source`` of an app's automatic evaluation carried by its spans:
    ``eval:<name>``, the name cut to an evaluator name (characters other than letters,
    digits, ``_``, ``.`` and ``-`` become ``_``; ``eval:otel`` without a usable name)."""
    text = _str(name) or ""
    cleaned = _NOT_IN_NAME.sub("_", text.strip()).lstrip("_.-")[:64]
    return f"{SOURCE_PREFIX}{cleaned or 'otel'}"


def _add(
    result: SpanResult, verdict: tuple[str, float] | None, fields: dict[str, Any], text: Any
) -> None:
    if verdict is None:
        result.unscored += 1
        return
    kind, score = verdict
    comment = _str(text)
    if comment:
        fields["comment"] = comment[:MAX_COMMENT_CHARS]
    result.feedback.append({"type": "feedback", **fields, "score": score, "kind": kind})


def _verdict(name: Any, score: Any, label: Any) -> tuple[str, float] | None:
    """(kind, score in 0..1) of one evaluation, or ``None`` without a usable score: a
    score outside 0..1 counts only through a known label (pass/fail, correct, ...)."""
    value = _float(score)
    if value is None or not 0.0 <= value <= 1.0:
        value = c.LABEL_SCORES.get(str(label).strip().lower()) if label is not None else None
    if value is None:
        return None
    kind = (_str(name) or "quality").strip().lower()[:MAX_KIND_CHARS] or "quality"
    return kind, value


_NOT_IN_NAME: Final = re.compile(r"[^A-Za-z0-9_.\-]")


# -- attribute values ---------------------------------------------------------------


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _first_str(attrs: Attributes, keys: Sequence[str]) -> str | None:
    for key in keys:
        value = _str(attrs.get(key))
        if value is not None:
            return value
    return None


def _first_int(attrs: Attributes, keys: Sequence[str]) -> int | None:
    for key in keys:
        value = attrs.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _first_float(attrs: Attributes, keys: Sequence[str]) -> float | None:
    for key in keys:
        value = _float(attrs.get(key))
        if value is not None:
            return value
    return None


def _json_value(value: Any) -> Any:
    """Structured attribute values as they are; JSON text parsed (text that is not JSON
    stays text)."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value
