"""The in-process hand-off from the monitor to the optimizer.

The monitor puts an :class:`OptimizationTrigger` on :class:`TriggerQueue` when a
degradation alert fires or a prompt's new feedback reaches the volume threshold; the
optimizer's trigger policy consumes them (and decides, e.g. cooldown, whether to run).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal

TriggerKind = Literal["degradation", "feedback_volume", "schedule", "manual", "pool_refresh"]


@dataclass(frozen=True, slots=True)
class OptimizationTrigger:
    """A reason to consider optimizing ``prompt`` now."""

    prompt: str
    kind: TriggerKind
    at: float
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


class TriggerQueue:
    """A bounded queue of triggers; when full the oldest is dropped (and counted)."""

    def __init__(self, maxsize: int = 1000) -> None:
        self._queue: asyncio.Queue[OptimizationTrigger] = asyncio.Queue(maxsize)
        self.dropped = 0

    def put(self, trigger: OptimizationTrigger) -> None:
        """Enqueue without waiting; drop the oldest trigger when full."""
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(trigger)

    async def get(self) -> OptimizationTrigger:
        """Wait for the next trigger."""
        return await self._queue.get()

    def qsize(self) -> int:
        """Triggers waiting."""
        return self._queue.qsize()
