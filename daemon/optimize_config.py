"""Settings of the optimizer (the ``[optimization]`` section).

The degradation and feedback-volume thresholds live in ``[monitoring]`` (the monitor
emits those triggers); this section decides what happens with a trigger: whether a run
starts (policy), what it may spend (budgets), how candidates are produced (strategies,
proposer model), how they are validated (evaluation model, metric, gate) and whether the
winner goes to a rollout.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

StrategyName = Literal["fewshot", "instruction", "gepa"]
MetricName = str  # exact_match | token_f1 | rouge_l | llm_judge | "package.module:function"
BUILTIN_METRICS = ("exact_match", "token_f1", "rouge_l", "llm_judge")


class LLMSettings(BaseModel):
    """One model reached through litellm: any provider litellm supports.

    ``model`` is a litellm model string (``openai/gpt-4o-mini``,
    ``anthropic/claude-3-5-haiku-latest``, ``ollama/llama3``, ...). The key is read from
    the environment variable named by ``api_key_env`` at call time, so it never sits in
    the configuration file; unset means litellm's own provider defaults
    (``OPENAI_API_KEY``, ...).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    api_base: str | None = None
    api_key_env: str | None = None
    temperature: float = Field(default=0.7, ge=0, le=2)
    max_tokens: int = Field(default=1024, ge=1)
    # Per-request timeout (seconds); the whole run has its own timeout on top.
    request_timeout_s: float = Field(default=60.0, gt=0)
    # Prices for models litellm's bundled cost map does not know (self-hosted, new ones),
    # in USD per token; litellm's own figures win when it knows the model.
    input_cost_per_token: float = Field(default=0.0, ge=0)
    output_cost_per_token: float = Field(default=0.0, ge=0)
    # Passed through to litellm.acompletion unchanged (e.g. {"top_p": 0.9}).
    extra: dict[str, Any] = Field(default_factory=dict)

    def api_key(self) -> str | None:
        """The key for the call.

        From the variable named by ``api_key_env`` (``KeyError`` naming it when unset);
        without ``api_key_env``, a placeholder when ``api_base`` points at a server of your
        own (vLLM, Ollama, LM Studio ... usually need no key, but OpenAI-style clients
        insist on one), else ``None`` so litellm uses the provider's usual variable.
        """
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise KeyError(f"environment variable {self.api_key_env} (api_key_env) is not set")
            return value
        return "no-key" if self.api_base else None


class FewShotSettings(BaseModel):
    """Demonstrations bootstrapped from well-rated production examples."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_demos: int = Field(default=4, ge=1, le=50)
    # Only examples whose mean feedback score is at least this become demonstrations.
    min_score: float = Field(default=0.8, ge=0, le=1)
    # Longer inputs/outputs are cut to this many characters inside a demonstration.
    max_demo_chars: int = Field(default=1_000, ge=50)


class InstructionSettings(BaseModel):
    """Instruction rewrites by the proposer model (breadth x depth, like COPRO)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Rewrites asked for per round (breadth).
    n_candidates: int = Field(default=3, ge=1, le=20)
    # Rounds; each later round sees the previous round's proposals (depth).
    depth: int = Field(default=1, ge=1, le=5)
    # Worst-rated examples (with feedback, comments, corrections) shown to the proposer.
    worst_examples: int = Field(default=8, ge=0, le=50)
    max_example_chars: int = Field(default=800, ge=50)


class EvaluationSettings(BaseModel):
    """The offline validation gate on held-out production examples."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The model that runs the candidate and the active template on held-out inputs;
    # unset = no offline evaluation (see ``without_evaluation``).
    model: LLMSettings | None = None
    metric: MetricName = "token_f1"
    # The judge model for ``metric = "llm_judge"`` (defaults to the evaluation model).
    judge: LLMSettings | None = None
    held_out_size: int = Field(default=20, ge=2, le=1_000)
    bootstrap_samples: int = Field(default=2_000, ge=100, le=100_000)
    # Examples scored at least this count as correct references (their own output).
    reference_min_score: float = Field(default=0.8, ge=0, le=1)

    @model_validator(mode="after")
    def _metric_known(self) -> EvaluationSettings:
        if self.metric not in BUILTIN_METRICS and ":" not in self.metric:
            raise ValueError(
                f"unknown metric {self.metric!r}: use one of {', '.join(BUILTIN_METRICS)} "
                "or 'package.module:function'"
            )
        return self


class OptimizationSettings(BaseModel):
    """Triggers, budgets, strategies, the validation gate and the hand-off to rollout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Off: only manual runs (POST /v1/optimize/{prompt}, `promptd optimize`).
    enable_automatic_optimization: bool = True
    # The schedule, and also the minimum interval between two runs of one prompt.
    optimization_interval_hours: float = Field(default=24.0, gt=0)
    max_concurrent_optimizations: int = Field(default=3, ge=1)
    optimization_timeout_minutes: float = Field(default=30.0, gt=0)
    # How often the schedule is checked (seconds).
    schedule_check_interval_s: float = Field(default=300.0, gt=0)

    strategies: tuple[StrategyName, ...] = ("fewshot", "instruction")
    # The proposer for `instruction` and the reflection model for `gepa`.
    proposer: LLMSettings | None = None
    fewshot: FewShotSettings = FewShotSettings()
    instruction: InstructionSettings = InstructionSettings()
    # Candidates longer than this (characters) are discarded.
    max_template_chars: int = Field(default=20_000, ge=100)

    evaluation: EvaluationSettings = EvaluationSettings()
    # Probability (paired bootstrap) that a candidate beats the active version.
    min_confidence_for_deployment: float = Field(default=0.8, gt=0, le=1)
    # Without an evaluation model: reject every candidate, or register the best one and
    # let a conservative online rollout be the validation.
    without_evaluation: Literal["reject", "conservative_rollout"] = "conservative_rollout"
    conservative_profile: str = "conservative"
    # Start a rollout for the winner; off = register it as a waiting candidate.
    auto_deploy: bool = True

    # Per-run budgets; a run that reaches one stops generating and evaluates what it has.
    max_cost_usd: float = Field(default=1.0, gt=0)
    max_llm_calls: int = Field(default=200, ge=1)
    # Retries of one LLM request on rate limits and transient errors (backoff doubles).
    max_retries: int = Field(default=3, ge=0, le=10)
    retry_backoff_s: float = Field(default=1.0, ge=0)

    # Example store: only examples this recent, at most this many per query.
    example_max_age_days: float = Field(default=30.0, gt=0)
    max_examples: int = Field(default=2_000, ge=10)

    @property
    def min_interval_s(self) -> float:
        """Cooldown between two runs of one prompt, in seconds."""
        return self.optimization_interval_hours * 3600.0

    @property
    def timeout_s(self) -> float:
        """Timeout of one run, in seconds."""
        return self.optimization_timeout_minutes * 60.0
