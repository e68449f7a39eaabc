"""The trigger policy: pure decisions on whether a trigger starts an optimization run.

Like Alertmanager's ``needsUpdate``, :func:`decide` takes the state, the trigger and
``now`` and returns a :class:`Decision` with a stable reason code; it does no I/O. The
runner persists :class:`PromptRunState` in the ``optimization_policy`` table and keeps
the set of running prompts, so the decisions are the same after a restart.

Order of the checks (the first that applies wins):

1. ``already_running`` — the prompt has a run in progress;
2. ``automatic_disabled`` — automatic optimization is off (manual triggers still run);
3. ``cooldown`` — the last run of the prompt started less than the minimum interval ago
   (manual triggers are exempt: an operator asked for it);
4. ``rollout_in_progress`` — the prompt has a live rollout (its A/B test would be
   disturbed, and the candidate would have no baseline to beat);
5. ``concurrency_cap`` — ``max_concurrent_optimizations`` runs are in progress;
6. otherwise run, with the trigger's kind as the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from promptd.monitoring.triggers import OptimizationTrigger


@dataclass(frozen=True, slots=True)
class PolicyLimits:
    """The settings the policy needs."""

    automatic: bool
    min_interval_s: float
    max_concurrent: int


@dataclass(frozen=True, slots=True)
class PromptRunState:
    """What the policy remembers of one prompt (timestamps, not booleans)."""

    last_started_at: float | None = None
    last_finished_at: float | None = None


@dataclass(frozen=True, slots=True)
class PolicyState:
    """Per-prompt history plus the prompts with a run in progress."""

    prompts: Mapping[str, PromptRunState]
    running: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Decision:
    """Run or skip, with a stable reason code and a sentence for people."""

    run: bool
    reason: str
    detail: str


def decide(
    state: PolicyState,
    trigger: OptimizationTrigger,
    now: float,
    limits: PolicyLimits,
    live_rollouts: Iterable[str] = (),
) -> Decision:
    """Whether ``trigger`` starts a run now."""
    prompt = trigger.prompt
    if prompt in state.running:
        return Decision(False, "already_running", f"{prompt!r} already has a run in progress")
    manual = trigger.kind == "manual"
    if not manual and not limits.automatic:
        return Decision(False, "automatic_disabled", "enable_automatic_optimization is off")
    last = state.prompts.get(prompt, PromptRunState()).last_started_at
    if not manual and last is not None and now - last < limits.min_interval_s:
        wait = limits.min_interval_s - (now - last)
        return Decision(
            False,
            "cooldown",
            f"last run of {prompt!r} started {now - last:.0f}s ago; "
            f"next automatic run in {wait:.0f}s",
        )
    if prompt in set(live_rollouts):
        return Decision(
            False, "rollout_in_progress", f"{prompt!r} has a live rollout; finish it first"
        )
    if len(state.running) >= limits.max_concurrent:
        return Decision(
            False,
            "concurrency_cap",
            f"{len(state.running)} runs in progress (max_concurrent_optimizations="
            f"{limits.max_concurrent})",
        )
    return Decision(True, trigger.kind, trigger.reason)


def started(state: PolicyState, prompt: str, now: float) -> PolicyState:
    """The state after a run of ``prompt`` started at ``now``."""
    prev = state.prompts.get(prompt, PromptRunState())
    prompts = {**state.prompts, prompt: PromptRunState(now, prev.last_finished_at)}
    return PolicyState(prompts, state.running | {prompt})


def finished(state: PolicyState, prompt: str, now: float) -> PolicyState:
    """The state after the run of ``prompt`` ended (however it ended) at ``now``."""
    prev = state.prompts.get(prompt, PromptRunState())
    prompts = {**state.prompts, prompt: PromptRunState(prev.last_started_at, now)}
    return PolicyState(prompts, state.running - {prompt})


def scheduled(
    state: PolicyState, known_since: Mapping[str, float], now: float, limits: PolicyLimits
) -> list[str]:
    """Prompts due for a scheduled run: one interval after their last run, or after
    they became known (a prompt registered today is not optimized at once)."""
    due = []
    for prompt, since in sorted(known_since.items()):
        last = state.prompts.get(prompt, PromptRunState()).last_started_at
        anchor = max(since, last) if last is not None else since
        if now - anchor >= limits.min_interval_s:
            due.append(prompt)
    return due
