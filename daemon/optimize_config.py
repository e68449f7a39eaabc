"""Settings of the optimizer (the ``[optimization]`` section)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class OptimizationSettings(BaseModel):
    """Triggers, budgets, strategies, the validation gate and the hand-off to rollout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enable_automatic_optimization: bool = True
    optimization_interval_hours: float = Field(default=24.0, gt=0)
    max_concurrent_optimizations: int = Field(default=3, ge=1)
    optimization_timeout_minutes: float = Field(default=30.0, gt=0)
