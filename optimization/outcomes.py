"""How a run ends: its status (did it finish) and its outcome (what it found and did).

Runs, their rows, the API, metrics and the bandit all name these values; the stored
strings are the enum values, so rows written before the enums existed read back alike.
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    """Whether a run finished (``outcome`` says how) or why it did not."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    # A stop cut it short and it could not be resumed (its plan no longer applies).
    INTERRUPTED = "interrupted"


class Outcome(StrEnum):
    """What a completed run found and did with it."""

    NONE = "none"
    NOT_ENOUGH_EXAMPLES = "not_enough_examples"
    # A pipeline run needs an evaluation model (nothing can be proposed unscored).
    NO_EVALUATION_MODEL = "no_evaluation_model"
    BUDGET_EXHAUSTED = "budget_exhausted"
    NO_CANDIDATE = "no_candidate"
    NO_IMPROVEMENT = "no_improvement_on_validation"
    GATE_FAILED = "gate_failed"
    GATE_PASSED = "gate_passed"
    # Without an evaluation model: a candidate proposed unscored.
    PROPOSED = "proposed"
    REJECTED_WITHOUT_EVALUATION = "rejected_without_evaluation"
    # The hand-off: what became of a gated (or proposed) candidate.
    REGISTER_FAILED = "register_failed"
    PARENT_CHANGED = "parent_changed"
    CANDIDATE_WAITING = "candidate_waiting"
    DEPLOYED = "deployed"


#: Outcomes that hand a candidate to the registry.
HANDED_OFF = frozenset({Outcome.GATE_PASSED, Outcome.PROPOSED})
#: Outcomes that say the search found nothing better than the active version.
SEARCH_FAILED = frozenset({Outcome.GATE_FAILED, Outcome.NO_IMPROVEMENT})


def gate_success(outcome: Outcome, gate_passed: bool | None) -> float | None:
    """The bandit's gate evidence of a run: 1 when its candidate passed the gate
    (whatever the hand-off did with it afterwards), 0 when the search found nothing
    better (gate failed, or no improvement on validation), ``None`` when the run could
    not tell (too few examples, budget spent before a candidate, no evaluation)."""
    if gate_passed:
        return 1.0
    if outcome in SEARCH_FAILED:
        return 0.0
    return None
