"""A rollout's persisted state: its status and where it stands (pure data, no I/O).

Its own module so that the decision (:mod:`.decision`) and the state machine
(:mod:`.machine`) both read it without importing each other.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RolloutState", "Status"]


class Status(enum.StrEnum):
    """Lifecycle of a rollout; ``PROMOTED``, ``ROLLED_BACK`` and ``NO_IMPROVEMENT`` are
    terminal. ``NO_IMPROVEMENT``: a ``require_win`` rollout reached its horizon without a
    significant win; the candidate is retired and the active version stays."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    NO_IMPROVEMENT = "no_improvement"


@dataclass(frozen=True, slots=True)
class RolloutState:
    """Everything needed to resume a rollout after a restart; see ``to_dict``/``from_dict``.

    ``step_started_at`` is when the current step's clock started, shifted by the time spent
    paused (``paused_at``: since when the rollout is paused), so the step's elapsed time
    counts running time only.
    """

    rollout_id: str
    prompt: str
    baseline_version: str
    candidate_version: str
    salt: str
    profile: str
    primary_metric: str = "feedback_score"
    higher_is_better: bool = True
    # Promote only on a significant win, else end as no_improvement at the horizon (the
    # optimizer's candidates); stored so a restart keeps it.
    require_win: bool = False
    # The quality signals whose feedback is the primary metric ("human", "eval:<name>"),
    # chosen from the prompt's configuration when the rollout is created and stored with
    # it, so a restart (or a changed configuration) decides the rollout on the same ones.
    signals: tuple[str, ...] = ("human",)
    status: Status = Status.PENDING
    step_index: int = 0
    weight: float = 0.0
    started_at: float | None = None
    step_started_at: float | None = None
    starving_since: float | None = None
    starvation_acted_at: float | None = None
    finished_at: float | None = None
    paused_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the status as its string value)."""
        out = dataclasses.asdict(self)
        out["status"] = self.status.value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutState:
        """Inverse of :meth:`to_dict`; unknown keys are rejected."""
        values = dict(data)
        values["status"] = Status(values.get("status", Status.PENDING.value))
        if "signals" in values:
            values["signals"] = tuple(values["signals"])
        return cls(**values)
