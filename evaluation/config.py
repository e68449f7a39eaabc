"""Settings of online evaluation (the ``[evaluation]`` section of the daemon's settings).

An evaluator is a scorer, a selector of prompts, a sample rate and a budget (Langfuse's
model: template + model + filter + sampling). Each is declared once::

    [[evaluation.evaluators]]
    name = "valid_json"            # its results are feedback with source "eval:valid_json"
    type = "json_schema"           # json_schema | regex | contains | length | function | judge
    prompts = ["support-*"]        # prompt names or shell-style selectors; ["*"]: every prompt
    sample_rate = 0.1

Everything is checked when the daemon starts: unknown keys, bad values, a regex that does
not compile, a function that does not import, an ``only_if`` naming no code check, two
evaluators with one name. The errors name the evaluator and the field.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, field_validator, model_validator

from promptd.events import EVALUATOR_NAME_PATTERN, SOURCE_PREFIX
from promptd.optimization.config import LLMSettings

EvaluatorName = Annotated[str, Field(pattern=rf"^{EVALUATOR_NAME_PATTERN}$")]

#: The judge's default instructions around the rubric (placeholders: rubric, low, high).
DEFAULT_JUDGE_SYSTEM = (
    "You are an impartial evaluator of an AI assistant's answers.\n"
    "Criteria: {rubric}\n"
    "Reply with one number from {low} to {high} ({high} is best) on the first line, "
    "then at most one sentence of reasons."
)
#: The judge's default user message (placeholders: input, output, reference_block).
DEFAULT_JUDGE_USER = "Input:\n{input}\n\nAnswer to evaluate:\n{output}\n{reference_block}\nScore:"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Evaluator(_Section):
    """What every evaluator has: a name, the prompts it serves, a sample rate, a budget."""

    name: EvaluatorName
    # Prompt names or shell-style selectors ("*", "support-*"); a call is evaluated when
    # its prompt matches any of them.
    prompts: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=lambda: ["*"], min_length=1
    )
    # Share of the selected calls evaluated, decided by a hash of request_id (and the
    # evaluator's name): reproducible, and both arms of a rollout are sampled alike.
    sample_rate: float = Field(default=0.1, gt=0, le=1)
    # Budget: evaluations started per minute and dollars per UTC day; calls beyond it are
    # counted (promptd_evaluation_skipped_total{reason="budget_*"}), never queued.
    max_calls_per_minute: int | None = Field(default=None, ge=1)
    max_cost_usd_per_day: float | None = Field(default=None, gt=0)

    @property
    def source(self) -> str:
        """The ``source`` of this evaluator's feedback events."""
        return f"{SOURCE_PREFIX}{self.name}"

    @property
    def is_judge(self) -> bool:
        """True for an LLM judge (paid, may fail), false for a code check."""
        return False

    def selects(self, prompt: str) -> bool:
        """Whether this evaluator serves ``prompt``."""
        return any(fnmatch.fnmatchcase(prompt, pattern) for pattern in self.prompts)


class JsonSchemaCheck(_Evaluator):
    """The output is JSON and follows a JSON schema: ``schema`` when given, else the output
    schema of the prompt version that served the call (without one: JSON is enough)."""

    type: Literal["json_schema"]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from jsonschema import validators
            from jsonschema.exceptions import SchemaError

            try:
                validators.validator_for(value).check_schema(value)
            except SchemaError as exc:
                raise ValueError(f"schema is not a valid JSON schema: {exc.message}") from None
        return value


class RegexCheck(_Evaluator):
    """The output matches a regular expression (Python ``re``; ``search`` or ``fullmatch``)."""

    type: Literal["regex"]
    pattern: str = Field(min_length=1, max_length=2000)
    mode: Literal["search", "fullmatch"] = "search"
    ignore_case: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"pattern does not compile: {exc}") from None
        return value

    def compiled(self) -> re.Pattern[str]:
        """The compiled pattern."""
        return re.compile(self.pattern, re.IGNORECASE if self.ignore_case else 0)


class ContainsCheck(_Evaluator):
    """The output contains all (or, with ``require = "any"``, one) of ``texts``."""

    type: Literal["contains"]
    texts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    require: Literal["all", "any"] = "all"
    ignore_case: bool = False


class LengthCheck(_Evaluator):
    """The output's length in characters is within bounds (inclusive)."""

    type: Literal["length"]
    min_chars: int | None = Field(default=None, ge=0)
    max_chars: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _bounded(self) -> LengthCheck:
        if self.min_chars is None and self.max_chars is None:
            raise ValueError("set min_chars, max_chars or both")
        if (
            self.min_chars is not None
            and self.max_chars is not None
            and self.min_chars > self.max_chars
        ):
            raise ValueError("min_chars is above max_chars")
        return self


class FunctionCheck(_Evaluator):
    """A function of yours, ``"package.module:function"``, called as
    ``fn(output: str, input: Any) -> bool | float`` (a float is the score, 0..1). It runs
    in a worker thread, at most ``timeout_s``; an exception is the call failing the check."""

    type: Literal["function"]
    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("function")
    @classmethod
    def _imports(cls, value: str) -> str:
        load_function(value)
        return value


def load_function(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:function"``; a clear ``ValueError`` when it cannot."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc!r}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{module_name!r} has no function {attr!r}")
    return fn  # type: ignore[no-any-return]


class JudgeEvaluator(_Evaluator):
    """An LLM judge through litellm: the rubric, the call's input and output (never its
    variant), and the call's correction as a reference when people gave one."""

    type: Literal["judge"]
    rubric: str = Field(min_length=1, max_length=8000)
    # The judge's model (a litellm model string) and where it is served.
    model: str = Field(min_length=1)
    api_base: str | None = None
    api_key_env: str | None = None
    temperature: float = Field(default=0.0, ge=0, le=2)
    max_tokens: int = Field(default=64, ge=1)
    request_timeout_s: float = Field(default=30.0, gt=0)
    input_cost_per_token: float = Field(default=0.0, ge=0)
    output_cost_per_token: float = Field(default=0.0, ge=0)
    extra: dict[str, Any] = Field(default_factory=dict)
    # The judge answers a number from scale[0] (worst) to scale[1] (best); it becomes
    # (n - low) / (high - low).
    scale: tuple[float, float] = (1.0, 5.0)
    # How the answer becomes a score: "text" reads the number (or yes/no) it wrote;
    # "logprobs" asks the server for the token probabilities (OpenAI's logprobs and
    # top_logprobs) and takes the expected score under them at the first position where a
    # scale value is among the top_logprobs most likely tokens (G-Eval's weighting), with
    # the text as the fallback. Integer scale values and yes/no words count.
    scoring: Literal["text", "logprobs"] = "text"
    top_logprobs: int = Field(default=10, ge=1, le=20)
    # Give the judge the call's correction (latest from people) as the reference answer.
    use_reference: bool = True
    # Run only on outputs that pass these code checks (by name); the checks run here
    # whether or not they sampled the call themselves.
    only_if: list[str] = Field(default_factory=list)
    # Retries of a failed request (connection, 5xx, rate limit) before it counts as failed.
    retries: int = Field(default=1, ge=0, le=5)
    system_prompt: str = DEFAULT_JUDGE_SYSTEM
    user_prompt: str = DEFAULT_JUDGE_USER

    @property
    def is_judge(self) -> bool:
        """An LLM judge."""
        return True

    @model_validator(mode="after")
    def _scale_and_prompts(self) -> JudgeEvaluator:
        low, high = self.scale
        if not low < high:
            raise ValueError("scale must be [low, high] with low < high")
        try:
            self.system_prompt.format(rubric="", low=0, high=1)
            self.user_prompt.format(input="", output="", reference_block="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"system_prompt may use {{rubric}}, {{low}}, {{high}} and user_prompt "
                f"{{input}}, {{output}}, {{reference_block}}: {exc!r}"
            ) from None
        return self

    def llm(self) -> LLMSettings:
        """The model settings as the litellm client takes them."""
        return LLMSettings(
            model=self.model,
            api_base=self.api_base,
            api_key_env=self.api_key_env,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            request_timeout_s=self.request_timeout_s,
            input_cost_per_token=self.input_cost_per_token,
            output_cost_per_token=self.output_cost_per_token,
            extra=self.extra
            if self.scoring == "text"
            else {**self.extra, "logprobs": True, "top_logprobs": self.top_logprobs},
        )


CodeCheck = JsonSchemaCheck | RegexCheck | ContainsCheck | LengthCheck | FunctionCheck
Evaluator = Annotated[
    JsonSchemaCheck | RegexCheck | ContainsCheck | LengthCheck | FunctionCheck | JudgeEvaluator,
    Discriminator("type"),
]


class AgreementSettings(_Section):
    """How agreement between people's scores and an evaluator's is tracked and alerted."""

    # Pairs (a call with both a human score and the evaluator's) older than this are
    # forgotten; the statistics are over the pairs of this trailing window.
    window_s: float = Field(default=7 * 86400.0, gt=0)
    # Pairs kept per (prompt, evaluator), newest first.
    max_pairs: int = Field(default=5000, ge=10)
    # Recompute (metrics, alert) this often.
    interval_s: float = Field(default=60.0, gt=0)
    # Confidence level of the intervals.
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    # No statistic, and so no alert, below this many pairs.
    min_pairs: int = Field(default=30, ge=4)
    # A judge's agreement alert fires when the upper end of the interval is below the floor
    # (agreement is below it with that confidence): Spearman's rho, and Cohen's kappa of
    # the scores cut at binary_threshold (pass >= threshold).
    spearman_floor: float = Field(default=0.3, ge=-1, le=1)
    kappa_floor: float = Field(default=0.2, ge=-1, le=1)
    binary_threshold: float = Field(default=0.5, gt=0, le=1)


Decision = Literal["monitor", "optimizer", "rollout"]
"""The decisions whose quality signal a prompt chooses."""
DECISIONS: tuple[Decision, ...] = ("monitor", "optimizer", "rollout")

Signal = Annotated[str, Field(pattern=rf"^(human|{SOURCE_PREFIX}{EVALUATOR_NAME_PATTERN})$")]
Signals = Annotated[list[Signal], Field(min_length=1)]


class SignalChoice(_Section):
    """Which quality signal drives each decision of the selected prompts: ``"human"``
    (people's and apps' feedback, the default), ``"eval:<evaluator>"``, or several (the
    feedback of any of them counts)."""

    prompts: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(min_length=1)
    # The monitor's windows (feedback_count, feedback_mean), hence its feedback rules, the
    # degradation trigger and the feedback-volume trigger.
    monitor: Signals = Field(default_factory=lambda: ["human"])
    # The optimizer's example scores, demonstrations and trusted-example threshold.
    optimizer: Signals = Field(default_factory=lambda: ["human"])
    # The rollout's primary metric (feedback_score); an evaluator named here is also
    # paired with people's scores for the judge-drift check.
    rollout: Signals = Field(default_factory=lambda: ["human"])

    def selects(self, prompt: str) -> bool:
        """Whether this choice is ``prompt``'s."""
        return any(fnmatch.fnmatchcase(prompt, pattern) for pattern in self.prompts)

    def of(self, decision: Decision) -> tuple[str, ...]:
        """The signals of ``decision``, each once, in the order given."""
        chosen: list[str] = getattr(self, decision)
        return tuple(dict.fromkeys(chosen))


class EvaluationSettings(_Section):
    """Evaluators and the engine that runs them."""

    enabled: bool = True
    evaluators: list[Evaluator] = Field(default_factory=list)
    # Per prompt (names or selectors, the first entry that selects a prompt wins): which
    # signal drives its monitor, optimizer and rollouts. Default: people's feedback.
    signals: list[SignalChoice] = Field(default_factory=list)
    # Evaluations the app makes itself and sends with a source (OpenTelemetry span
    # evaluations, feedback events with source "eval:<name>"): names a signal may use
    # besides the evaluators'.
    external: list[EvaluatorName] = Field(default_factory=list)
    # Sampled calls waiting for their evaluation; beyond it they are counted
    # (reason="queue_full") and never evaluated. Ingestion never waits for it.
    queue_size: int = Field(default=1000, ge=1, le=1_000_000)
    # Evaluations run at the same time (the judge's requests).
    concurrency: int = Field(default=4, ge=1, le=256)
    # How often the durable cursor is saved (a crash re-reads at most this much).
    cursor_interval_s: float = Field(default=1.0, gt=0)
    # How often results not yet acknowledged by the broker are (re)published.
    outbox_interval_s: float = Field(default=1.0, gt=0)
    # An evaluator is down after this many failed evaluations in a row (metric, alert,
    # readiness detail); while down it is tried once per probe_interval_s, other sampled
    # calls are skipped and counted (reason="outage").
    outage_after_failures: int = Field(default=3, ge=1)
    probe_interval_s: float = Field(default=30.0, gt=0)
    # Results per evaluator shown by GET /v1/evaluators/{name}.
    recent_results: int = Field(default=20, ge=0, le=1000)
    agreement: AgreementSettings = Field(default_factory=AgreementSettings)

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationSettings:
        names = [e.name for e in self.evaluators]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"evaluator names must be unique: {', '.join(twice)}")
        checks = {e.name for e in self.evaluators if not e.is_judge}
        for e in self.evaluators:
            if isinstance(e, JudgeEvaluator):
                unknown = [n for n in e.only_if if n not in checks]
                if unknown:
                    raise ValueError(
                        f"evaluator {e.name!r}: only_if names no code check: "
                        f"{', '.join(unknown)} (code checks: {', '.join(sorted(checks)) or 'none'})"
                    )
        self._signals_name_evaluators({*names, *self.external})
        return self

    def _signals_name_evaluators(self, names: set[str]) -> None:
        for index, choice in enumerate(self.signals):
            for decision in DECISIONS:
                for signal in choice.of(decision):
                    name = signal.removeprefix(SOURCE_PREFIX)
                    if signal != "human" and name not in names:
                        raise ValueError(
                            f"signals[{index}].{decision}: {signal!r} names no evaluator "
                            f"(evaluators and external: {', '.join(sorted(names)) or 'none'})"
                        )

    def signals_for(self, prompt: str, decision: Decision) -> tuple[str, ...]:
        """The quality signals of ``prompt``'s ``decision`` (``("human",)`` by default)."""
        for choice in self.signals:
            if choice.selects(prompt):
                return choice.of(decision)
        return ("human",)

    def by_name(self) -> dict[str, Evaluator]:
        """The evaluators by name."""
        return {e.name: e for e in self.evaluators}

    @property
    def active(self) -> bool:
        """True when evaluation is on and something is configured."""
        return self.enabled and bool(self.evaluators)
