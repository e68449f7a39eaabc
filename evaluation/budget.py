"""An evaluator's budget: evaluations started per minute and dollars per UTC day (pure).

:meth:`Budget.admit` decides before an evaluation starts and records it when admitted;
:meth:`Budget.spend` adds what it cost once known (litellm's price of the judge's call).
A call refused here is counted by the caller and never waits: the budget bounds the
work, not a queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final, Literal

DAY_S: Final = 86_400.0
MINUTE_S: Final = 60.0

Refusal = Literal["budget_rate", "budget_cost"]


def utc_day(now: float) -> int:
    """The UTC day number of epoch time ``now`` (a day budget starts at 00:00 UTC)."""
    return int(now // DAY_S)


@dataclass
class Budget:
    """Limits of one evaluator (``None``: no limit) and what it used."""

    per_minute: int | None = None
    usd_per_day: float | None = None
    day: int = -1
    spent_usd: float = 0.0
    _starts: deque[float] = field(default_factory=deque)

    def admit(self, now: float) -> Refusal | None:
        """``None`` and the start recorded when another evaluation may start at ``now``;
        else why not."""
        self._roll(now)
        if self.usd_per_day is not None and self.spent_usd >= self.usd_per_day:
            return "budget_cost"
        starts = self._starts
        while starts and starts[0] <= now - MINUTE_S:
            starts.popleft()
        if self.per_minute is not None and len(starts) >= self.per_minute:
            return "budget_rate"
        starts.append(now)
        return None

    def spend(self, usd: float, now: float) -> None:
        """Add the cost of an evaluation finished at ``now``."""
        self._roll(now)
        self.spent_usd += usd

    def restore(self, spent_today_usd: float, now: float) -> None:
        """Start from what was spent earlier today (read from storage after a restart)."""
        self.day = utc_day(now)
        self.spent_usd = spent_today_usd

    def _roll(self, now: float) -> None:
        day = utc_day(now)
        if day != self.day:
            self.day = day
            self.spent_usd = 0.0
