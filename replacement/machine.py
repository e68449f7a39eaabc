"""The rollout state machine: pure, no I/O, modelled on h11's ``_state.py``.

``step(state, event, now, profile) -> (new_state, actions)`` is the whole API. The controller
(the async shell) feeds it events — a periodic :class:`Tick` carrying an :class:`Observation`
computed from SQLite, and the manual commands :class:`Pause`, :class:`Resume`,
:class:`Promote`, :class:`Rollback` — and executes the returned actions in order
(:class:`SetWeight`, :class:`RecordDecision`, :class:`PromoteCandidate`,
:class:`RollbackCandidate`, :class:`RetireCandidate`, :class:`RaiseAlert`,
:class:`ResolveAlert`).

Which event is legal in which status is data (:data:`TRANSITIONS`); an illegal event raises
:class:`IllegalTransition` naming the status and the event, and since states are immutable the
caller's state is untouched. Manual commands are legal in every live status and are applied
before anything the data says, so they always win.

What a tick decides is :func:`.decision.evaluate` (SRM, primary metric, guardrails, samples,
time, completion); this module applies it: rollback, a pause asked by a check (judge
drift), promotion, the end of a ``require_win``
rollout without a win (``no_improvement``), advance, or hold — and, while holding without
enough samples past the starvation grace period, the starvation alert (raised once per
episode, resolved when data returns or the rollout ends) and the profile's starvation action.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .decision import (
    ArmCounts,
    Details,
    Observation,
    evaluate,
    has_significant_result,
    winner,
)
from .profiles import RolloutProfile
from .state import RolloutState, Status
from .stats import Moments, Stratum

__all__ = [
    "TERMINAL",
    "TRANSITIONS",
    "Action",
    "ArmCounts",
    "Event",
    "IllegalTransition",
    "Moments",
    "Observation",
    "Pause",
    "Promote",
    "PromoteCandidate",
    "RaiseAlert",
    "RecordDecision",
    "ResolveAlert",
    "Resume",
    "RetireCandidate",
    "Rollback",
    "RollbackCandidate",
    "RolloutState",
    "SetWeight",
    "Start",
    "Status",
    "Stratum",
    "Tick",
    "evaluate",
    "has_significant_result",
    "no_improvement",
    "promote",
    "rollback",
    "step",
    "winner",
]


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """Begin the rollout at its first step."""


@dataclass(frozen=True, slots=True)
class Tick:
    """Periodic evaluation with the latest observation."""

    observation: Observation


@dataclass(frozen=True, slots=True)
class Pause:
    """Manual pause: hold the current weight and stop evaluating."""

    reason: str = "manual pause"


@dataclass(frozen=True, slots=True)
class Resume:
    """Manual resume of a paused rollout; the current step's clock goes on from where the
    pause stopped it."""

    reason: str = "manual resume"


@dataclass(frozen=True, slots=True)
class Promote:
    """Manual promotion of the candidate, whatever the data says."""

    reason: str = "manual promote"


@dataclass(frozen=True, slots=True)
class Rollback:
    """Manual rollback to the baseline, whatever the data says."""

    reason: str = "manual rollback"


Event = Start | Tick | Pause | Resume | Promote | Rollback

# --- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetWeight:
    """Publish routing with this candidate weight (0.0 sends everyone to the baseline)."""

    weight: float


@dataclass(frozen=True, slots=True)
class RecordDecision:
    """Append to the audit log: ``kind`` is start, advance, hold, promote, rollback,
    no_improvement, pause or resume."""

    kind: str
    reason: str
    details: Mapping[str, float | int | str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PromoteCandidate:
    """Make the candidate the active version (the old one stays in history as backup)."""


@dataclass(frozen=True, slots=True)
class RollbackCandidate:
    """Retire the candidate; the baseline stays active."""


@dataclass(frozen=True, slots=True)
class RetireCandidate:
    """The candidate did not prove a win: retire it; the baseline stays active."""


@dataclass(frozen=True, slots=True)
class RaiseAlert:
    """Notify operators that the rollout is starved of traffic or feedback."""

    reason: str


@dataclass(frozen=True, slots=True)
class ResolveAlert:
    """The starvation alert raised earlier is over (data returned, or the rollout ended)."""

    reason: str


Action = (
    SetWeight
    | RecordDecision
    | PromoteCandidate
    | RollbackCandidate
    | RetireCandidate
    | RaiseAlert
    | ResolveAlert
)

# --- state --------------------------------------------------------------------------------


class IllegalTransition(Exception):
    """An event that is not legal in the rollout's current status; the state is unchanged."""

    def __init__(self, status: Status, event: Event) -> None:
        self.status = status
        self.event = event
        super().__init__(f"event {type(event).__name__} is illegal in rollout status {status}")


TERMINAL = frozenset({Status.PROMOTED, Status.ROLLED_BACK, Status.NO_IMPROVEMENT})

TRANSITIONS: Mapping[Status, Mapping[type[Any], frozenset[Status]]] = {
    Status.PENDING: {
        Start: frozenset({Status.RUNNING}),
        Promote: frozenset({Status.PROMOTED}),
        Rollback: frozenset({Status.ROLLED_BACK}),
    },
    Status.RUNNING: {
        Tick: frozenset(
            {
                Status.RUNNING,
                Status.PAUSED,
                Status.PROMOTED,
                Status.ROLLED_BACK,
                Status.NO_IMPROVEMENT,
            }
        ),
        Pause: frozenset({Status.PAUSED}),
        Promote: frozenset({Status.PROMOTED}),
        Rollback: frozenset({Status.ROLLED_BACK}),
    },
    Status.PAUSED: {
        Tick: frozenset({Status.PAUSED}),
        Resume: frozenset({Status.RUNNING}),
        Promote: frozenset({Status.PROMOTED}),
        Rollback: frozenset({Status.ROLLED_BACK}),
    },
    Status.PROMOTED: {},
    Status.ROLLED_BACK: {},
    Status.NO_IMPROVEMENT: {},
}
"""Legal events per status, with the statuses each may lead to (checked after every step)."""


def step(
    state: RolloutState, event: Event, now: float, profile: RolloutProfile
) -> tuple[RolloutState, list[Action]]:
    """Apply ``event`` at time ``now`` (seconds); return the new state and actions to run."""
    allowed = TRANSITIONS[state.status].get(type(event))
    if allowed is None:
        raise IllegalTransition(state.status, event)
    new_state, actions = _dispatch(state, event, now, profile)
    # The table is the contract: a handler leading elsewhere is a bug, not a decision.
    if new_state.status not in allowed:
        raise AssertionError(f"{type(event).__name__} led {state.status} to {new_state.status}")
    return new_state, actions


def _dispatch(
    state: RolloutState, event: Event, now: float, profile: RolloutProfile
) -> tuple[RolloutState, list[Action]]:
    match event:
        case Start():
            first = profile.steps[0].weight
            new = dataclasses.replace(
                state,
                status=Status.RUNNING,
                step_index=0,
                weight=first,
                started_at=now,
                step_started_at=now,
            )
            return new, [SetWeight(first), RecordDecision("start", "rollout started")]
        case Pause(reason=reason):
            return _paused(state, now), [RecordDecision("pause", reason)]
        case Resume(reason=reason):
            new = dataclasses.replace(
                state,
                status=Status.RUNNING,
                step_started_at=_resumed_clock(state, now),
                paused_at=None,
            )
            return _fed(new, [RecordDecision("resume", reason)])
        case Promote(reason=reason):
            return promote(state, now, reason, {})
        case Rollback(reason=reason):
            return rollback(state, now, reason, {})
        case Tick(observation=obs):
            if state.status is Status.PAUSED:
                return state, []  # paused rollouts are not evaluated
            return _tick(state, obs, now, profile)
    raise IllegalTransition(state.status, event)  # pragma: no cover - exhaustive match


def _paused(state: RolloutState, now: float) -> RolloutState:
    """The rollout paused at ``now``: its step clock stops until it resumes."""
    return dataclasses.replace(state, status=Status.PAUSED, paused_at=now)


def _resumed_clock(state: RolloutState, now: float) -> float:
    """The step's start once resumed at ``now``: shifted by the time paused, so the step
    keeps the time it had run (a pause is not a reason to wait the whole step again).
    A pause stored without its time (by an older daemon) restarts the step, as it did."""
    if state.paused_at is None or state.step_started_at is None:
        return now
    return state.step_started_at + (now - state.paused_at)


def _end(state: RolloutState, now: float, **changes: Any) -> tuple[RolloutState, list[Action]]:
    """A terminal state; a starvation alert still firing is resolved with it."""
    new = dataclasses.replace(
        state, finished_at=now, starving_since=None, starvation_acted_at=None, **changes
    )
    if state.starvation_acted_at is None:
        return new, []
    return new, [ResolveAlert(f"rollout ended ({new.status})")]


def promote(
    state: RolloutState, now: float, reason: str, details: Mapping[str, float | int | str]
) -> tuple[RolloutState, list[Action]]:
    """Terminal promotion: full weight, then the version switch, then the audit record."""
    new, resolved = _end(state, now, status=Status.PROMOTED, weight=1.0)
    return new, [
        SetWeight(1.0),
        PromoteCandidate(),
        RecordDecision("promote", reason, details),
        *resolved,
    ]


def rollback(
    state: RolloutState, now: float, reason: str, details: Mapping[str, float | int | str]
) -> tuple[RolloutState, list[Action]]:
    """Terminal rollback: weight 0 first (users leave the candidate at once), then record."""
    new, resolved = _end(state, now, status=Status.ROLLED_BACK, weight=0.0)
    return new, [
        SetWeight(0.0),
        RollbackCandidate(),
        RecordDecision("rollback", reason, details),
        *resolved,
    ]


def no_improvement(
    state: RolloutState, now: float, reason: str, details: Mapping[str, float | int | str]
) -> tuple[RolloutState, list[Action]]:
    """Terminal end without a win: weight 0, the candidate retired, the baseline stays."""
    new, resolved = _end(state, now, status=Status.NO_IMPROVEMENT, weight=0.0)
    return new, [
        SetWeight(0.0),
        RetireCandidate(),
        RecordDecision("no_improvement", reason, details),
        *resolved,
    ]


def _tick(
    state: RolloutState, obs: Observation, now: float, profile: RolloutProfile
) -> tuple[RolloutState, list[Action]]:
    verdict = evaluate(state, obs, now, profile)
    # JSON has no infinities (a test without data has an infinite standard error).
    details = {
        k: v for k, v in verdict.details.items() if not isinstance(v, float) or math.isfinite(v)
    }
    if verdict.kind == "rollback":
        return rollback(state, now, verdict.reason, details)
    if verdict.kind == "promote":
        return promote(state, now, verdict.reason, details)
    if verdict.kind == "no_improvement":
        return no_improvement(state, now, verdict.reason, details)
    if verdict.kind == "pause":
        # A check that pauses (judge drift) waits for a person: it is not a rollback.
        return _paused(state, now), [RecordDecision("pause", verdict.reason, details)]
    if verdict.kind == "advance":
        index = state.step_index + 1
        weight = profile.steps[index].weight
        new = dataclasses.replace(state, step_index=index, weight=weight, step_started_at=now)
        return _fed(new, [SetWeight(weight), RecordDecision("advance", verdict.reason, details)])
    return _hold(state, verdict.reason, verdict.starving, details, now, profile)


def _fed(state: RolloutState, actions: list[Action]) -> tuple[RolloutState, list[Action]]:
    """Not starving (any more): clear the episode and resolve its alert if one was raised."""
    new = dataclasses.replace(state, starving_since=None, starvation_acted_at=None)
    if state.starvation_acted_at is not None:
        actions = [ResolveAlert("the rollout has enough samples again"), *actions]
    return new, actions


def _hold(
    state: RolloutState,
    reason: str,
    starving: bool,
    details: Details,
    now: float,
    profile: RolloutProfile,
) -> tuple[RolloutState, list[Action]]:
    """Hold; when starved past the grace period, alert once and apply the starvation action."""
    if not starving:
        return _fed(state, [RecordDecision("hold", reason, details)])
    since = state.starving_since if state.starving_since is not None else now
    new = dataclasses.replace(state, starving_since=since)
    if now - since < profile.starvation_grace_s:
        return new, [RecordDecision("hold", reason, details)]
    starved = f"starved for {now - since:.0f}s (grace {profile.starvation_grace_s:.0f}s): {reason}"
    action = profile.starvation_action
    if action == "rollback":
        # The rollback is the signal (and alerted as a rollback): no alert to resolve later.
        return rollback(new, now, starved, details)
    alert: list[Action] = []
    if state.starvation_acted_at is None:
        new = dataclasses.replace(new, starvation_acted_at=now)
        alert = [RaiseAlert(starved)]
    if action == "pause":
        return _paused(new, now), [*alert, RecordDecision("pause", starved, details)]
    return new, [*alert, RecordDecision("hold", starved, details)]
