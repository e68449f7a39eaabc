"""Settings of the monitor (the ``[monitoring]`` section)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class MonitoringSettings(BaseModel):
    """Windows, alert rules, sinks and the optimization trigger thresholds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    rules: list[dict[str, Any]] = Field(default_factory=list)
    performance_degradation_threshold: float = Field(default=0.15, gt=0, lt=1)
    feedback_volume_threshold: int = Field(default=50, ge=1)
