"""An evaluator's outage state: down after failures in a row, probed while down (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Change = Literal["down", "up"] | None


@dataclass
class Health:
    """Consecutive failures of one evaluator and what follows from them."""

    failures_to_down: int
    probe_interval_s: float
    consecutive_failures: int = 0
    down_since: float | None = None
    last_error: str | None = None
    last_probe: float = 0.0

    @property
    def up(self) -> bool:
        """False while the evaluator is down."""
        return self.down_since is None

    def may_try(self, now: float) -> bool:
        """Whether an evaluation should be attempted now (always while up; one probe per
        ``probe_interval_s`` while down)."""
        if self.down_since is None:
            return True
        if now - self.last_probe >= self.probe_interval_s:
            self.last_probe = now
            return True
        return False

    def failed(self, now: float, error: str) -> Change:
        """Record a failed evaluation; ``"down"`` when this one starts an outage."""
        self.consecutive_failures += 1
        self.last_error = error
        if self.down_since is None and self.consecutive_failures >= self.failures_to_down:
            self.down_since = now
            self.last_probe = now
            return "down"
        return None

    def succeeded(self) -> Change:
        """Record a successful evaluation; ``"up"`` when it ends an outage."""
        self.consecutive_failures = 0
        if self.down_since is not None:
            self.down_since = None
            return "up"
        return None
