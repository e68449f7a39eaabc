"""Which strategy a triggered run uses: Thompson sampling with a prior shared across prompts.

Pure: :func:`choose` takes the strategies that can run, the recorded outcomes and a
random generator, and returns a :class:`Choice` that says which strategy and why. The
runner persists outcomes (``optimization_outcomes``) and shows the choice in
``/v1/optimizations``.

Each strategy ``s`` has a Beta posterior for "a run of ``s`` on this prompt succeeds":

    alpha = prior_alpha + shared_weight * S_other(s) + S_prompt(s)
    beta  = prior_beta  + shared_weight * F_other(s) + F_prompt(s)

where ``S``/``F`` are the success and failure counts of ``s`` on this prompt and on every
other prompt. Other prompts teach a new prompt which strategy tends to work (the shared
prior), at a discount, while the prompt's own history takes over as it grows. A run
whose candidate passes the gate is a success, one that fails it a failure; the online
result adds ``online_weight`` more: a success when the rollout promotes the candidate on
a significant win, a failure when it ends without one. Runs that could not gate
(too few examples, budget spent before a candidate) teach nothing.

The chosen strategy is the one with the highest posterior draw; a strategy never tried
anywhere has the flat prior and is therefore explored early.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Evidence:
    """Pseudo-counts one run contributed for its strategy on its prompt."""

    prompt: str
    strategy: str
    successes: float
    failures: float


@dataclass(frozen=True, slots=True)
class Posterior:
    """A strategy's Beta posterior for one prompt."""

    alpha: float
    beta: float
    runs_here: int
    runs_elsewhere: int

    @property
    def mean(self) -> float:
        """Posterior mean success rate."""
        return self.alpha / (self.alpha + self.beta)


@dataclass(frozen=True, slots=True)
class Choice:
    """The strategy chosen for a run, and why."""

    strategy: str
    method: str  # thompson | manual | only_one | disabled
    reason: str
    draws: dict[str, float] = field(default_factory=dict)
    posteriors: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the run row and the API."""
        return {
            "strategy": self.strategy,
            "method": self.method,
            "reason": self.reason,
            "draws": {k: round(v, 4) for k, v in self.draws.items()},
            "posteriors": self.posteriors,
        }


def posterior(
    strategy: str,
    prompt: str,
    outcomes: Iterable[Evidence],
    prior_alpha: float,
    prior_beta: float,
    shared_weight: float,
) -> Posterior:
    """The Beta posterior of ``strategy`` on ``prompt``."""
    alpha, beta, here, elsewhere = prior_alpha, prior_beta, 0, 0
    for o in outcomes:
        if o.strategy != strategy:
            continue
        if o.prompt == prompt:
            alpha += o.successes
            beta += o.failures
            here += 1
        else:
            alpha += shared_weight * o.successes
            beta += shared_weight * o.failures
            elsewhere += 1
    return Posterior(alpha, beta, here, elsewhere)


def choose(
    available: Sequence[str],
    prompt: str,
    outcomes: Sequence[Evidence],
    rng: random.Random,
    *,
    prior_alpha: float = 1.0,
    prior_beta: float = 1.0,
    shared_weight: float = 0.5,
) -> Choice:
    """Thompson sampling: draw from each available strategy's posterior, take the best."""
    if not available:
        raise ValueError("no strategy is available")
    posts = {
        s: posterior(s, prompt, outcomes, prior_alpha, prior_beta, shared_weight) for s in available
    }
    shown = {
        s: {
            "alpha": round(p.alpha, 3),
            "beta": round(p.beta, 3),
            "mean": round(p.mean, 4),
            "runs_here": p.runs_here,
            "runs_elsewhere": p.runs_elsewhere,
        }
        for s, p in posts.items()
    }
    if len(available) == 1:
        only = available[0]
        return Choice(only, "only_one", f"{only!r} is the only available strategy", {}, shown)
    draws = {s: rng.betavariate(p.alpha, p.beta) for s, p in posts.items()}
    best = max(available, key=lambda s: (draws[s], -available.index(s)))
    p = posts[best]
    return Choice(
        best,
        "thompson",
        f"highest posterior draw {draws[best]:.3f} (mean {p.mean:.3f} from "
        f"{p.runs_here} runs on this prompt, {p.runs_elsewhere} elsewhere)",
        draws,
        shown,
    )
