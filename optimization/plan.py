"""What fixes a run: its plan, persisted when it starts and read back on resume.

A run optimizes a **target**: one prompt, or a pipeline of several. Either way the plan
lists the target's steps, each with the version that was active when the run started
(the parent of what the run may register) and that version's program; a prompt is a
target of one step. With the strategies, the seed, the example snapshot and the budget,
the plan makes a run deterministic up to the models' answers, which are all stored, so a
resumed run replays what it did at no cost (see :mod:`promptd.optimization.run`).

The plan's row columns: ``strategies``, ``seed``, ``snapshot``, ``selection``,
``parent_version`` (a prompt's parent; ``None`` for a pipeline) and ``target`` (JSON:
the kind, a pipeline's definition and step versions, and the run's budget). Rows written
before ``target`` held a prompt's budget read back with the configured budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from promptd.optimization.config import OptimizationSettings
from promptd.optimization.examples import Snapshot
from promptd.optimization.program import Program
from promptd.replacement.pipelines import Pipeline


class BudgetRequest(BaseModel):
    """A run's own budget, asked for with a manual run (every field optional: unset
    means the configured maximum)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_llm_calls: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_cost_usd: float | None = Field(default=None, gt=0)
    timeout_minutes: float | None = Field(default=None, gt=0)


class BudgetTooLarge(ValueError):
    """A requested budget beyond the configured maximum (names the setting)."""


@dataclass(frozen=True, slots=True)
class RunBudget:
    """What one run may spend: paid calls (retries included), tokens, dollars, time."""

    llm_calls: int
    cost_usd: float
    tokens: int | None
    timeout_s: float

    @classmethod
    def configured(cls, settings: OptimizationSettings) -> RunBudget:
        """The configured per-run budget (every automatic run's)."""
        return cls(
            settings.max_llm_calls, settings.max_cost_usd, settings.max_tokens, settings.timeout_s
        )

    @classmethod
    def within(cls, settings: OptimizationSettings, request: BudgetRequest | None) -> RunBudget:
        """``request`` checked against the configured maximum (:class:`BudgetTooLarge`
        naming the first field beyond it)."""
        top = cls.configured(settings)
        if request is None:
            return top
        asked = (
            ("max_llm_calls", request.max_llm_calls, top.llm_calls, "max_llm_calls"),
            ("max_cost_usd", request.max_cost_usd, top.cost_usd, "max_cost_usd"),
            ("max_tokens", request.max_tokens, top.tokens, "max_tokens"),
            (
                "timeout_minutes",
                request.timeout_minutes,
                top.timeout_s / 60.0,
                "optimization_timeout_minutes",
            ),
        )
        for name, value, limit, setting in asked:
            if value is not None and limit is not None and value > limit:
                raise BudgetTooLarge(
                    f"budget.{name} {value:g} exceeds the configured maximum "
                    f"(optimization.{setting} = {limit:g})"
                )
        return cls(
            request.max_llm_calls or top.llm_calls,
            request.max_cost_usd or top.cost_usd,
            request.max_tokens or top.tokens,
            request.timeout_minutes * 60.0 if request.timeout_minutes else top.timeout_s,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the run row."""
        return {
            "llm_calls": self.llm_calls,
            "cost_usd": self.cost_usd,
            "tokens": self.tokens,
            "timeout_s": self.timeout_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, settings: OptimizationSettings) -> RunBudget:
        """Inverse of :meth:`to_dict`; the configured budget for rows without one."""
        if not data:
            return cls.configured(settings)
        tokens = data.get("tokens")
        return cls(
            int(data["llm_calls"]),
            float(data["cost_usd"]),
            None if tokens is None else int(tokens),
            float(data["timeout_s"]),
        )


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step of the target: its prompt, the version active at the start, its program."""

    prompt: str
    version: str
    program: Program


@dataclass(frozen=True)
class RunPlan:
    """Everything that fixes a run (see the module docstring)."""

    run_id: str
    target: str  # the prompt's or the pipeline's name (policy, bandit, events)
    steps: tuple[StepPlan, ...]
    strategies: tuple[str, ...]
    selection: dict[str, Any]
    seed: int
    snapshot: Snapshot
    budget: RunBudget
    trigger_kind: str
    trigger_reason: str
    started_at: float
    pipeline: Pipeline | None = None
    elapsed_s: float = 0.0
    resumes: int = 0

    @property
    def prompt(self) -> str:
        """The target's name (what logs, events and the run row call ``prompt``)."""
        return self.target

    @property
    def active(self) -> dict[str, Program]:
        """Every step's program at the start."""
        return {s.prompt: s.program for s in self.steps}

    @property
    def versions(self) -> dict[str, str]:
        """Every step's version at the start (the parents)."""
        return {s.prompt: s.version for s in self.steps}

    @property
    def remaining_s(self) -> float:
        """Time left of the run's budget (after earlier lives)."""
        return max(self.budget.timeout_s - self.elapsed_s, 0.0)

    def row(self) -> dict[str, Any]:
        """The plan's columns of a new run row."""
        target: dict[str, Any] = {"kind": "prompt", "budget": self.budget.to_dict()}
        if self.pipeline is not None:
            target |= {
                "kind": "pipeline",
                "pipeline": self.pipeline.to_dict(),
                "versions": self.versions,
            }
        return {
            "strategies": list(self.strategies),
            "parent_version": None if self.pipeline is not None else self.steps[0].version,
            "seed": self.seed,
            "snapshot": self.snapshot.to_dict(),
            "selection": self.selection,
            "target": target,
        }
