"""Which candidate a run selects: the best on validation, unless its lead is noise.

Pure. Every candidate is scored on the same validation examples as the active version.
Only candidates whose validation mean beats the active version's are eligible. Among
them, the one with the best mean leads; a candidate whose mean is within
``tolerance_se`` standard errors of the leader's (the standard error of their paired
per-example differences) cannot be told from it on this validation split. Of those,
the run selects the one **closest to the active version**: the smallest change (fewest
changed lines of its messages, plus one for a changed model or parameter), then the
higher mean, then the earlier candidate.

This is the one-standard-error rule of model selection (Breiman et al., *Classification
and Regression Trees*, 1984): it keeps the search from trading a change it can justify
for a bigger one that won a validation coin flip. On a real small model, ``mipro``'s
best candidate carried a nonsense instruction and led the same demonstrations under the
original instruction by 0.955 to 0.947 on 26 examples; it then lost 20 points of exact
match on the test split.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from promptd.optimization.program import Program


@dataclass(frozen=True, slots=True)
class Option:
    """A candidate as selection sees it: per-example validation scores and its distance
    from the active version."""

    scores: Sequence[float]
    distance: float

    @property
    def mean(self) -> float:
        """Validation mean."""
        return float(np.mean(self.scores)) if len(self.scores) else 0.0


@dataclass(frozen=True, slots=True)
class Selection:
    """The selected option and why."""

    index: int
    best: int
    reason: str


def paired_se(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of the mean of ``a - b`` (infinite when they are not paired)."""
    if len(a) != len(b) or len(a) < 2:
        return math.inf if len(a) != len(b) else 0.0
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(d.std(ddof=1) / math.sqrt(len(d)))


def select(
    options: Sequence[Option], baseline: Sequence[float], tolerance_se: float
) -> Selection | None:
    """The option to gate, or ``None`` when none beats ``baseline`` on validation."""
    base = float(np.mean(baseline)) if len(baseline) else 0.0
    eligible = [i for i, o in enumerate(options) if o.mean > base]
    if not eligible:
        return None
    best = max(eligible, key=lambda i: (options[i].mean, -i))
    lead = options[best]
    # A tiny slack: a lead of exactly one standard error is within it, whatever the
    # rounding of the two sums.
    close = [
        i
        for i in eligible
        if lead.mean - options[i].mean
        <= tolerance_se * paired_se(lead.scores, options[i].scores) + 1e-12
    ]
    chosen = min(close, key=lambda i: (options[i].distance, -options[i].mean, i))
    if chosen == best:
        reason = f"best validation mean {lead.mean:.4f}"
    else:
        picked = options[chosen]
        reason = (
            f"validation mean {picked.mean:.4f}, within {tolerance_se:g} standard error(s) "
            f"of the best ({lead.mean:.4f}, candidate {best}) and closer to the active "
            f"version ({picked.distance:g} changes against {lead.distance:g})"
        )
    return Selection(chosen, best, reason)


def _lines(program: Program) -> list[str]:
    """The messages' non-blank lines, each with its role (blank lines are layout)."""
    return [
        f"{role}: {line.strip()}"
        for role, content in program.messages
        for line in content.split("\n")
        if line.strip()
    ]


def distance(program: Program, active: Program) -> int:
    """How much ``program`` changes ``active``: changed non-blank lines of the messages
    (a replaced line counts once), plus one for a changed model, parameters or extras."""
    ops = difflib.SequenceMatcher(None, _lines(active), _lines(program), autojunk=False)
    changed = sum(
        max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops.get_opcodes() if tag != "equal"
    )
    changed += program.model != active.model
    changed += program.params != active.params
    changed += program.extras != active.extras
    return changed


def total_distance(programs: Mapping[str, Program], active: Mapping[str, Program]) -> int:
    """:func:`distance` summed over a target's steps."""
    return sum(distance(programs[p], active[p]) for p in active)
