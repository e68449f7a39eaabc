"""The span attribute names promptd reads, per convention and the version it follows.

Each field of a call is read from the first attribute present in its list, so a span of
any of these instrumentation styles maps to the same call. The versions named:

- ``semconv 1.37+``: the OpenTelemetry GenAI semantic conventions as of semantic
  conventions 1.37 and later, checked against ``opentelemetry-semantic-conventions``
  0.66b2 (schema 1.44) and the ``semantic-conventions-genai`` registry, where the GenAI
  conventions now live (``gen_ai.provider.name``, ``gen_ai.input.messages``,
  ``gen_ai.output.messages``, ``gen_ai.prompt.name``, the ``gen_ai.evaluation.result``
  event);
- ``semconv 1.27-1.36``: ``gen_ai.operation.name``, ``gen_ai.system``,
  ``gen_ai.usage.input_tokens`` / ``output_tokens`` (renamed from the ones below in 1.27);
- ``semconv <=1.26`` (previous names, still emitted by older instrumentations):
  ``gen_ai.usage.prompt_tokens`` / ``completion_tokens``, and the prompt and completion as
  the ``gen_ai.prompt`` / ``gen_ai.completion`` attributes of the span events
  ``gen_ai.content.prompt`` / ``gen_ai.content.completion``;
- ``OpenLLMetry``: Traceloop's flattened ``gen_ai.prompt.<i>.content`` /
  ``gen_ai.completion.<i>.content`` and ``llm.request.type``;
- ``OpenInference 0.1.42``: Arize's conventions (Phoenix), as in
  ``openinference-semantic-conventions`` 0.1.42;
- ``Langfuse``: its OpenTelemetry attributes (``langfuse.observation.*``);
- ``promptd``: promptd's own attributes, for what no convention names (the variant that
  served the call, the assignment unit, template variables).
"""

from __future__ import annotations

from typing import Final

# -- which spans are LLM calls -------------------------------------------------------

#: semconv 1.27+: the operation; only these are calls of a prompt (not embeddings,
#: tools, agents or retrieval).
OPERATION: Final = "gen_ai.operation.name"
LLM_OPERATIONS: Final = frozenset({"chat", "text_completion", "generate_content"})
#: Spans without ``gen_ai.operation.name`` (semconv <=1.26) that carry one of these are
#: GenAI calls: ``gen_ai.provider.name`` (1.37+), ``gen_ai.system`` (<=1.36).
GENAI_MARKERS: Final = ("gen_ai.provider.name", "gen_ai.system")
#: OpenInference 0.1.42: the span kind, ``LLM`` for a model call.
OPENINFERENCE_KIND: Final = "openinference.span.kind"
OPENINFERENCE_LLM: Final = "LLM"
#: OpenLLMetry: ``chat`` or ``completion`` for a model call.
OPENLLMETRY_REQUEST_TYPE: Final = "llm.request.type"
OPENLLMETRY_LLM: Final = frozenset({"chat", "completion"})
#: Langfuse: a model call is an observation of type ``generation``.
LANGFUSE_TYPE: Final = "langfuse.observation.type"
LANGFUSE_LLM: Final = "generation"

# -- what identifies the call ------------------------------------------------------

#: Default of ``otlp.prompt_attributes``: semconv 1.37+ ``gen_ai.prompt.name``, then
#: Langfuse's prompt name (set by its prompt management).
DEFAULT_PROMPT_ATTRIBUTES: Final = ("gen_ai.prompt.name", "langfuse.observation.prompt.name")
#: promptd: the prompt version that served the call (the routing attribute; the SDK's
#: ``otel_spans`` option sets it, an OpenTelemetry-only app sets it from the routing).
VARIANT: Final = "promptd.variant"
#: promptd: set by the SDK's ``otel_spans`` option on spans of calls the SDK already
#: published; such spans give no second call (their feedback joins this request id).
REQUEST_ID: Final = "promptd.request_id"
#: The assignment unit: promptd's, then OpenInference 0.1.42 / Langfuse ``user.id`` and
#: ``session.id``.
UNIT: Final = ("promptd.unit_id", "user.id", "session.id")

# -- measurements ------------------------------------------------------------------

#: semconv 1.27+ request model, semconv response model, OpenInference 0.1.42, Langfuse.
MODEL: Final = (
    "gen_ai.request.model",
    "gen_ai.response.model",
    "llm.model_name",
    "langfuse.observation.model.name",
)
#: semconv 1.27+, semconv <=1.26, OpenInference 0.1.42.
TOKENS_IN: Final = (
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.prompt_tokens",
    "llm.token_count.prompt",
)
TOKENS_OUT: Final = (
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.completion_tokens",
    "llm.token_count.completion",
)
#: No semconv attribute exists for cost: promptd's, then OpenInference 0.1.42.
COST: Final = ("promptd.cost_usd", "llm.cost.total")
#: promptd: an automatic quality score in 0..1.
QUALITY: Final = "promptd.quality"
#: semconv: the error class of a failed call (with the span status ERROR).
ERROR_TYPE: Final = "error.type"
#: Copied into the call's ``attributes`` when present: the semconv provider (1.37+, then
#: <=1.36) and the resource's service name.
PROVIDER: Final = ("gen_ai.provider.name", "gen_ai.system")
SERVICE_NAME: Final = "service.name"

# -- captured input and output ------------------------------------------------------

#: Template variables (what the optimizer renders a template with): promptd's, then
#: OpenInference 0.1.42's ``llm.prompt_template.variables`` (both a JSON object).
INPUT_VARIABLES: Final = ("promptd.input", "llm.prompt_template.variables")
#: semconv 1.37+ chat history (JSON or structured), kept as ``{"messages": [...]}``.
INPUT_MESSAGES: Final = "gen_ai.input.messages"
OUTPUT_MESSAGES: Final = "gen_ai.output.messages"
#: OpenInference 0.1.42 flattened messages: ``llm.input_messages.<i>.message.role`` ...
OI_INPUT_MESSAGES: Final = "llm.input_messages"
OI_OUTPUT_MESSAGES: Final = "llm.output_messages"
OI_MESSAGE_ROLE: Final = "message.role"
OI_MESSAGE_CONTENT: Final = "message.content"
#: OpenInference 0.1.42 plain input and output values.
INPUT_VALUE: Final = "input.value"
OUTPUT_VALUE: Final = "output.value"
#: promptd's output attribute.
OUTPUT: Final = "promptd.output"
#: OpenLLMetry flattened ``gen_ai.prompt.<i>.role`` / ``.content`` (and completion).
OLL_PROMPT: Final = "gen_ai.prompt"
OLL_COMPLETION: Final = "gen_ai.completion"
#: semconv <=1.26 span events and their attribute holding the text.
LEGACY_PROMPT_EVENT: Final = ("gen_ai.content.prompt", "gen_ai.prompt")
LEGACY_COMPLETION_EVENT: Final = ("gen_ai.content.completion", "gen_ai.completion")

# -- feedback ----------------------------------------------------------------------

#: semconv 1.37+: one span event per evaluation of the call.
EVALUATION_EVENT: Final = "gen_ai.evaluation.result"
EVALUATION_NAME: Final = "gen_ai.evaluation.name"
EVALUATION_SCORE: Final = "gen_ai.evaluation.score.value"
EVALUATION_LABEL: Final = "gen_ai.evaluation.score.label"
EVALUATION_EXPLANATION: Final = "gen_ai.evaluation.explanation"
#: OpenInference 0.1.42 span feedback: ``annotations.<i>.annotation.<field>`` and
#: ``evaluations.<i>.evaluation.<field>`` (the span's call), and the ``trace.`` forms
#: (the whole trace: episode feedback). Fields: name, score, label, explanation.
OI_FEEDBACK: Final = (
    ("annotations", "annotation", False),
    ("evaluations", "evaluation", False),
    ("trace.annotations", "annotation", True),
    ("trace.evaluations", "evaluation", True),
)
#: Labels taken as a score when an evaluation has no score in 0..1 (semconv's examples
#: and common judges' verdicts), lower-cased.
LABEL_SCORES: Final = {
    "pass": 1.0,
    "fail": 0.0,
    "correct": 1.0,
    "incorrect": 0.0,
    "relevant": 1.0,
    "not_relevant": 0.0,
    "irrelevant": 0.0,
    "good": 1.0,
    "bad": 0.0,
    "positive": 1.0,
    "negative": 0.0,
    "thumbs_up": 1.0,
    "thumbs_down": 0.0,
    "yes": 1.0,
    "no": 0.0,
    "true": 1.0,
    "false": 0.0,
}
