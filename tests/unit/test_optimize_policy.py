"""The trigger policy: a table of cases, no I/O."""

from __future__ import annotations

import pytest

from promptd.monitoring.triggers import OptimizationTrigger
from promptd.optimization import policy

LIMITS = policy.PolicyLimits(automatic=True, min_interval_s=3600.0, max_concurrent=2)
NOW = 100_000.0


def _trigger(kind: str = "degradation", prompt: str = "p") -> OptimizationTrigger:
    return OptimizationTrigger(prompt, kind, NOW, "test")  # type: ignore[arg-type]


def _state(last: float | None = None, running: tuple[str, ...] = ()) -> policy.PolicyState:
    prompts = {"p": policy.PromptRunState(last, None)} if last is not None else {}
    return policy.PolicyState(prompts, frozenset(running))


@pytest.mark.parametrize(
    ("state", "kind", "limits", "live", "run", "reason"),
    [
        (_state(), "degradation", LIMITS, (), True, "degradation"),
        (_state(), "feedback_volume", LIMITS, (), True, "feedback_volume"),
        (_state(running=("p",)), "manual", LIMITS, (), False, "already_running"),
        (_state(), "manual", LIMITS, ("p",), False, "rollout_in_progress"),
        (_state(running=("a", "b")), "degradation", LIMITS, (), False, "concurrency_cap"),
        (_state(running=("a", "b")), "manual", LIMITS, (), False, "concurrency_cap"),
        (
            _state(),
            "degradation",
            policy.PolicyLimits(False, 3600.0, 2),
            (),
            False,
            "automatic_disabled",
        ),
        (_state(), "manual", policy.PolicyLimits(False, 3600.0, 2), (), True, "manual"),
        (_state(last=NOW - 60), "degradation", LIMITS, (), False, "cooldown"),
        (_state(last=NOW - 60), "manual", LIMITS, (), True, "manual"),
        (_state(last=NOW - 3600), "schedule", LIMITS, (), True, "schedule"),
    ],
)
def test_decide_table(
    state: policy.PolicyState,
    kind: str,
    limits: policy.PolicyLimits,
    live: tuple[str, ...],
    run: bool,
    reason: str,
) -> None:
    """Each case gives the documented decision and reason code."""
    decision = policy.decide(state, _trigger(kind), NOW, limits, live)
    assert (decision.run, decision.reason) == (run, reason)


def test_started_then_finished_updates_running_and_timestamps() -> None:
    """A run marks the prompt running and records start, then finish, times."""
    s = policy.started(_state(), "p", NOW)
    assert s.running == {"p"}
    assert policy.decide(s, _trigger(), NOW + 1, LIMITS).reason == "already_running"
    s = policy.finished(s, "p", NOW + 10)
    assert s.running == frozenset()
    assert s.prompts["p"] == policy.PromptRunState(NOW, NOW + 10)
    assert policy.decide(s, _trigger(), NOW + 20, LIMITS).reason == "cooldown"


def test_schedule_waits_one_interval_after_registration_or_last_run() -> None:
    """Scheduled runs are due one interval after the later of registration and last run."""
    known = {"new": NOW - 10, "old": NOW - 7200, "p": NOW - 7200}
    state = _state(last=NOW - 100)
    assert policy.scheduled(state, known, NOW, LIMITS) == ["old"]
