"""Settings of the optimizer (the ``[optimization]`` section).

The degradation and feedback-volume thresholds live in ``[monitoring]`` (the monitor
emits those triggers); this section decides what happens with a trigger: whether a run
starts (policy), what it may spend (budgets), how examples are split, which search
strategies the bandit may choose from and how each searches, how the one selected
candidate is gated, whether it goes to a rollout, and where runs are tracked.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MetricName = str  # exact_match | token_f1 | rouge_l | llm_judge | "package.module:function"
BUILTIN_METRICS = ("exact_match", "token_f1", "rouge_l", "llm_judge")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LLMSettings(_Section):
    """One model reached through litellm: any provider litellm supports.

    ``model`` is a litellm model string (``openai/gpt-4o-mini``,
    ``anthropic/claude-3-5-haiku-latest``, ``ollama/llama3``, ...). The key is read from
    the environment variable named by ``api_key_env`` at call time, so it never sits in
    the configuration file; unset means litellm's own provider defaults
    (``OPENAI_API_KEY``, ...).
    """

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

    def cache_identity(self) -> dict[str, Any]:
        """What makes two calls with the same messages the same call (the cache key)."""
        return {
            "model": self.model,
            "api_base": self.api_base,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "extra": self.extra,
        }


class SplitSettings(_Section):
    """Deterministic train / validation / test split of a prompt's examples.

    Each example lands in a split by a hash of ``salt`` and its ``request_id``, so an
    example stays in its split across runs and restarts: a test example is never seen by
    any run's search. The test share is what train and validation leave.
    """

    train: float = Field(default=0.4, gt=0, lt=1)
    validation: float = Field(default=0.3, gt=0, lt=1)
    salt: str = Field(default="promptd", min_length=1, max_length=200)
    # Caps keep the cost of one candidate's evaluation bounded on busy prompts.
    max_validation: int = Field(default=60, ge=2, le=10_000)
    max_test: int = Field(default=200, ge=2, le=10_000)
    # Fewer usable examples than these: the run ends as "not_enough_examples".
    min_validation: int = Field(default=5, ge=2)
    min_test: int = Field(default=30, ge=2)

    @model_validator(mode="after")
    def _test_left(self) -> SplitSettings:
        if self.train + self.validation >= 1.0:
            raise ValueError("train + validation must leave a share for the test split")
        return self


class EvaluationSettings(_Section):
    """The one evaluator every strategy and the gate use."""

    # The model that runs candidate and active templates on examples (normally the
    # model the app uses in production); unset = no offline search nor gate (see
    # ``without_evaluation``).
    model: LLMSettings | None = None
    metric: MetricName = "token_f1"
    # The judge model for ``metric = "llm_judge"`` (defaults to the evaluation model).
    judge: LLMSettings | None = None
    # Examples scored at least this count as correct references (their own output);
    # corrections are always references.
    reference_min_score: float = Field(default=0.8, ge=0, le=1)
    # Resamples for the gate's randomization test and the gain's interval.
    bootstrap_samples: int = Field(default=4_000, ge=200, le=100_000)

    @model_validator(mode="after")
    def _metric_known(self) -> EvaluationSettings:
        if self.metric not in BUILTIN_METRICS and ":" not in self.metric:
            raise ValueError(
                f"unknown metric {self.metric!r}: use one of {', '.join(BUILTIN_METRICS)} "
                "or 'package.module:function'"
            )
        return self


class FewShotSettings(_Section):
    """Random search over demonstration sets (BootstrapFewShotWithRandomSearch)."""

    max_demos: int = Field(default=4, ge=1, le=50)
    # Demo sets tried, each scored on the validation split.
    num_candidates: int = Field(default=6, ge=1, le=100)
    # An example's own output is a demonstration when rated at least this;
    # corrections always are.
    min_score: float = Field(default=0.8, ge=0, le=1)
    # Longer inputs/outputs are cut to this many characters inside a demonstration.
    max_demo_chars: int = Field(default=1_000, ge=50)


class InstructionSettings(_Section):
    """Instruction rewrites that see earlier scores (COPRO: breadth x depth)."""

    # Proposals per round (breadth).
    n_candidates: int = Field(default=4, ge=1, le=20)
    # Rounds; each later round sees every earlier candidate with its validation score.
    depth: int = Field(default=2, ge=1, le=10)
    # Poorly rated training examples (with feedback, corrections) shown to the proposer.
    worst_examples: int = Field(default=6, ge=0, le=50)
    max_example_chars: int = Field(default=600, ge=50)


class MiproSettings(_Section):
    """Joint instruction x demo-set search with optuna's TPE sampler (MIPROv2)."""

    num_instructions: int = Field(default=4, ge=1, le=50)
    num_demo_sets: int = Field(default=4, ge=1, le=50)
    num_trials: int = Field(default=12, ge=1, le=500)
    minibatch_size: int = Field(default=8, ge=1, le=1_000)
    # The best few by minibatch mean are re-scored on the full validation split.
    top_k_full_eval: int = Field(default=3, ge=1, le=20)


class KnnSettings(_Section):
    """Nearest-neighbour few-shot: demonstrations retrieved per request from a pool of
    trusted train-split examples (see promptd.demos), the ``knn`` strategy's search, and
    the daemon's pool refresh."""

    # The search: the number of demos, then the distance cut-off (lexical distances are
    # in [0, 1], cosine distances in [0, 2]), then the instruction, on a validation
    # minibatch; the best few on all of validation.
    k_values: tuple[int, ...] = Field(default=(1, 2, 4, 8), min_length=1)
    max_distances: tuple[float, ...] = Field(default=(0.9, 0.8, 0.6))
    # Instructions tried: the active one, plus proposals when a proposer is configured.
    num_instructions: int = Field(default=2, ge=1, le=20)
    minibatch_size: int = Field(default=16, ge=1, le=1_000)
    top_k_full_eval: int = Field(default=3, ge=1, le=20)
    # A pool holds at most this many demos (the most recent feedback first).
    max_pool: int = Field(default=2_000, ge=1, le=100_000)
    max_demo_chars: int = Field(default=1_000, ge=50)
    # The embedding retriever (through litellm); unset: lexical retrieval only.
    embedding: LLMSettings | None = None
    # Self-consistency vote over this many samples, tried on the best candidate (0: off;
    # it multiplies the model calls per request by n, in the gate too).
    ensemble_n: int = Field(default=0, ge=0, le=20)
    ensemble_temperature: float = Field(default=0.7, gt=0, le=2)
    # The daemon rebuilds the pools of prompts whose active version takes demos from
    # one; a new snapshot with at least ``refresh_min_new`` demos the pinned one lacks
    # triggers a run (0: the refresh never triggers runs).
    pool_refresh_minutes: float = Field(default=60.0, gt=0)
    refresh_min_new: int = Field(default=20, ge=0)
    # Snapshots no version pins are deleted after this many days (the newest is kept).
    pool_retention_days: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _ranges(self) -> KnnSettings:
        if any(k < 1 or k > 50 for k in self.k_values):
            raise ValueError("knn.k_values must be between 1 and 50")
        if any(d < 0 or d > 2 for d in self.max_distances):
            raise ValueError("knn.max_distances must be between 0 and 2")
        return self


class GepaSettings(_Section):
    """The ``gepa`` package's reflective evolutionary search (optional dependency)."""

    # Example evaluations gepa may spend; unset: what the run's call budget allows.
    max_metric_calls: int | None = Field(default=None, ge=1)
    reflection_minibatch_size: int = Field(default=3, ge=1, le=50)


class SelectionSettings(_Section):
    """Thompson sampling over strategies, with a prior shared across prompts.

    Each strategy has a Beta posterior: ``prior_alpha``/``prior_beta``, plus the outcomes of
    every prompt's runs weighted by ``shared_weight`` (what other prompts teach), plus
    this prompt's own outcomes at full weight. A run's gate pass is a success and its
    gate failure a failure; an optimizer rollout that wins online adds
    ``online_weight`` successes, one that ends without a win adds as many failures.
    """

    enabled: bool = True
    prior_alpha: float = Field(default=1.0, gt=0)
    prior_beta: float = Field(default=1.0, gt=0)
    shared_weight: float = Field(default=0.5, ge=0, le=1)
    online_weight: float = Field(default=1.0, ge=0, le=10)


class TrackingSettings(_Section):
    """Optional MLflow tracking (``pip install 'promptd[tracking]'``)."""

    # e.g. "file:///var/lib/promptd/mlruns", "sqlite:///mlflow.db", "http://mlflow:5000";
    # unset: no tracking.
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = Field(default="promptd", min_length=1)
    # Where a new experiment keeps the templates (artifacts); unset: beside a sqlite:///
    # store's file (``<dir>/mlflow-artifacts``), else the tracking server's default.
    mlflow_artifact_location: str | None = None


class OptimizationSettings(_Section):
    """Triggers, budgets, splits, search, the gate, the hand-off to rollout, tracking."""

    # Off: only manual runs (POST /v1/optimize/{prompt}, `promptd optimize`).
    enable_automatic_optimization: bool = True
    # The schedule, and also the minimum interval between two runs of one prompt.
    optimization_interval_hours: float = Field(default=24.0, gt=0)
    max_concurrent_optimizations: int = Field(default=3, ge=1)
    optimization_timeout_minutes: float = Field(default=30.0, gt=0)
    # How often the schedule is checked (seconds).
    schedule_check_interval_s: float = Field(default=300.0, gt=0)

    # The strategies a triggered run may use; the bandit picks one per run (a manual run
    # may name several, which then share the run's budget).
    strategies: tuple[str, ...] = Field(default=("fewshot", "instruction", "mipro"), min_length=1)
    # The proposer for `instruction` and `mipro`, and gepa's reflection model.
    proposer: LLMSettings | None = None
    fewshot: FewShotSettings = FewShotSettings()
    instruction: InstructionSettings = InstructionSettings()
    mipro: MiproSettings = MiproSettings()
    knn: KnnSettings = KnnSettings()
    gepa: GepaSettings = GepaSettings()
    selection: SelectionSettings = SelectionSettings()
    tracking: TrackingSettings = TrackingSettings()
    # Candidates longer than this (characters) are discarded.
    max_template_chars: int = Field(default=20_000, ge=100)
    # Selection: a candidate whose validation mean is within this many standard errors
    # (of the paired per-example differences) of the best one cannot be told from it;
    # of those, the run gates the one closest to the active version. 0: always the best.
    candidate_tolerance_se: float = Field(default=1.0, ge=0, le=5)

    splits: SplitSettings = SplitSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    # The gate passes the selected candidate when the one-sided randomization test's
    # confidence that it beats the active version on the test split reaches this, and
    # its mean gain reaches ``min_gain`` (absolute, in the metric's 0..1 units).
    min_confidence_for_deployment: float = Field(default=0.95, gt=0, lt=1)
    min_gain: float = Field(default=0.02, ge=0, le=1)
    # Without an evaluation model: reject every candidate, or register the proposal and
    # let a conservative online rollout (promoting only on a significant win) decide.
    without_evaluation: Literal["reject", "conservative_rollout"] = "conservative_rollout"
    conservative_profile: str = "conservative"
    # Start a rollout for the winner; off = register it as a waiting candidate.
    auto_deploy: bool = True

    # Per-run budgets. The search stops when it reaches one, keeping what the gate needs.
    max_cost_usd: float = Field(default=1.0, gt=0)
    max_llm_calls: int = Field(default=400, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    # Concurrent model calls of one run.
    max_concurrency: int = Field(default=4, ge=1, le=64)
    # Retries of one LLM request on rate limits and transient errors (backoff doubles).
    max_retries: int = Field(default=3, ge=0, le=10)
    retry_backoff_s: float = Field(default=1.0, ge=0)

    # Example store: only examples this recent, at most this many per run.
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
