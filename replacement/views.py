"""What ``GET /v1/rollouts`` and ``GET /v1/rollouts/{id}`` show (pure, no I/O).

A live rollout is described from its in-memory aggregates; an ended one from the snapshot
written with its terminal transition (:func:`snapshot`), so ``arms``, ``statistics``,
``winner`` and ``has_significant_result`` are always there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from promptd.replacement import decision
from promptd.replacement.catalog import CATALOG
from promptd.replacement.observations import RolloutAccumulator
from promptd.replacement.profiles import RolloutProfile
from promptd.replacement.state import RolloutState, Status
from promptd.storage.rollouts import StoredRollout

_LIVE = (Status.RUNNING.value, Status.PAUSED.value)


def snapshot(
    state: RolloutState,
    acc: RolloutAccumulator,
    profile: RolloutProfile,
    statistics: Mapping[str, Any],
) -> dict[str, Any]:
    """The statistics of a rollout at this moment: arms, last test statistics, winner."""
    obs = acc.observation(state)
    best = decision.winner(obs, profile, higher_is_better=state.higher_is_better)
    return {
        "arms": acc.arm_summary(),
        "statistics": dict(statistics),
        "winner": best,
        "has_significant_result": best is not None,
        "feedback": {
            "joined": acc.feedback.joined,
            "unmatched": acc.feedback.unmatched,
            "waiting": acc.feedback.waiting,
        },
        # Calls left out for a timestamp too far ahead of their storage (event time).
        "calls": {"future": acc.future_calls},
        "adjustment": adjustment(acc, statistics),
    }


def adjustment(acc: RolloutAccumulator, statistics: Mapping[str, Any]) -> dict[str, Any]:
    """The regression adjustment (CUPED): the units' history, and per metric its
    covariates, their slopes and the variance reduction at the last tick."""
    metrics = {}
    for spec in CATALOG:
        names = acc.layout.get(spec.name, ())
        if not names:
            continue
        metrics[spec.name] = {
            "covariates": list(names),
            "theta": {n: statistics.get(f"{spec.name}_theta_{n}") for n in names},
            "variance_reduction": statistics.get(f"{spec.name}_variance_reduction"),
        }
    history = acc.history
    return {
        "enabled": acc.adjust,
        "history": history.summary() if history is not None else None,
        "metrics": metrics,
    }


def starvation(
    state: Mapping[str, Any], profile: RolloutProfile | None, now: float
) -> dict[str, Any]:
    """The starvation state: ``starved`` once the grace period has passed (alert raised)."""
    since = state.get("starving_since")
    return {
        "starving": since is not None,
        "starving_since": since,
        "starving_for_s": now - since if since is not None else 0.0,
        "starved": state.get("starvation_acted_at") is not None,
        "alerted_at": state.get("starvation_acted_at"),
        "grace_s": profile.starvation_grace_s if profile is not None else None,
        "action": profile.starvation_action if profile is not None else None,
    }


def summary(row: StoredRollout, state: Mapping[str, Any]) -> dict[str, Any]:
    """The fields every rollout view has. A pipeline rollout names its ``pipeline`` and
    lists its ``members`` (every step with its baseline and candidate, ``null`` for an
    unchanged step); ``prompt`` and the versions are then its first changed step's."""
    return {
        "id": row.id,
        "pipeline": row.pipeline,
        "members": [m.model_dump() for m in row.members],
        "prompt": row.prompt,
        "baseline_version": row.baseline,
        "candidate_version": row.candidate,
        "status": state["status"],
        "step": state["step_index"],
        "weight": state["weight"] if state["status"] in _LIVE else 0.0,
        "require_win": bool(state.get("require_win", False)),
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def profile_view(profile: RolloutProfile | None) -> dict[str, Any] | None:
    """The profile's error budget, guardrail margins and the ``require_win`` horizon."""
    if profile is None:
        return None
    return {
        "budget": profile.budget(),
        "margins": profile.margins(),
        "feedback_max_delay_s": profile.feedback_max_delay_s,
        "win_horizon": {
            "step": profile.last_test_step,
            "max_duration_s": profile.win_max_duration_s,
            "max_samples_per_arm": profile.win_max_samples_per_arm,
        },
    }


EMPTY_FINAL: Mapping[str, Any] = {
    "arms": None,
    "statistics": None,
    "winner": None,
    "has_significant_result": False,
    "feedback": None,
    "calls": None,
    "adjustment": None,
}
"""What an ended rollout shows when it ended before snapshots were stored."""
