"""Judge calibration: calls scored by people and by an evaluator, per prompt (pure).

A pair is one human feedback event on a call and one evaluator's score of that call.
:class:`Pairs` keeps them per ``(prompt, evaluator)`` over a trailing window (at most
``max_pairs``, newest kept), once each however often they are offered (the engine meets a
pair from both sides: the judge's result finds the feedback already stored, or the
feedback arrives and finds the result). :func:`report` computes the agreement;
:func:`below_floor` says whether a judge's agreement is, with the interval's confidence,
below its floor, which is what the ``judge_agreement_low`` alert fires on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from .agreement import Estimate, cohen_kappa, spearman

Key = tuple[str, str]  # (prompt, evaluator)


@dataclass(frozen=True, slots=True)
class Pair:
    """A human score and an evaluator's score of the same call."""

    ts: float
    human: float
    judge: float
    # The human feedback event's id: one pair per (feedback event, evaluator).
    feedback_id: str
    # The variant that served the call (what a per-arm comparison splits on).
    variant: str = ""


@dataclass(frozen=True, slots=True)
class Report:
    """Agreement of one evaluator with people on one prompt."""

    prompt: str
    evaluator: str
    pairs: int
    spearman: Estimate | None
    kappa: Estimate | None
    human_mean: float | None
    judge_mean: float | None
    # Over consecutive periods of the window (oldest first): (period start, rho, n).
    history: tuple[tuple[float, float | None, int], ...] = ()

    def as_dict(self) -> dict[str, object]:
        """JSON form."""
        return {
            "prompt": self.prompt,
            "evaluator": self.evaluator,
            "pairs": self.pairs,
            "spearman": self.spearman.as_dict() if self.spearman else None,
            "kappa": self.kappa.as_dict() if self.kappa else None,
            "human_mean": self.human_mean,
            "judge_mean": self.judge_mean,
            "history": [
                {"start": start, "spearman": rho, "pairs": n} for start, rho, n in self.history
            ],
        }


@dataclass
class Pairs:
    """The pairs of every (prompt, evaluator), within ``window_s`` of the newest time."""

    window_s: float
    max_pairs: int
    _by_key: dict[Key, deque[Pair]] = field(default_factory=dict)
    _seen: dict[Key, set[str]] = field(default_factory=dict)

    def add(self, prompt: str, evaluator: str, pair: Pair) -> bool:
        """Keep ``pair``; False when it was already kept."""
        key = (prompt, evaluator)
        seen = self._seen.setdefault(key, set())
        if pair.feedback_id in seen:
            return False
        kept = self._by_key.setdefault(key, deque())
        if kept and pair.ts < kept[-1].ts:
            # Late pairs (a restart's rebuild, feedback stamped earlier) keep time order.
            items = sorted([*kept, pair], key=lambda p: p.ts)
            kept.clear()
            kept.extend(items)
        else:
            kept.append(pair)
        seen.add(pair.feedback_id)
        while len(kept) > self.max_pairs:
            seen.discard(kept.popleft().feedback_id)
        return True

    def prune(self, now: float) -> None:
        """Forget pairs older than the window."""
        for key, kept in self._by_key.items():
            while kept and kept[0].ts < now - self.window_s:
                self._seen[key].discard(kept.popleft().feedback_id)

    def keys(self) -> Iterator[Key]:
        """Every (prompt, evaluator) with pairs."""
        return (k for k, v in self._by_key.items() if v)

    def get(self, prompt: str, evaluator: str) -> list[Pair]:
        """The pairs of ``(prompt, evaluator)``, oldest first."""
        return list(self._by_key.get((prompt, evaluator), ()))


def report(
    prompt: str,
    evaluator: str,
    pairs: list[Pair],
    confidence: float,
    binary_threshold: float,
    min_pairs: int,
    periods: int = 0,
    now: float = 0.0,
    window_s: float = 0.0,
) -> Report:
    """Agreement over ``pairs`` (statistics only from ``min_pairs`` on); with ``periods``,
    Spearman's rho over that many equal periods of ``window_s`` ending at ``now``."""
    n = len(pairs)
    human = [p.human for p in pairs]
    judge = [p.judge for p in pairs]
    rho = kappa = None
    if n >= min_pairs:
        rho = spearman(human, judge, confidence)
        kappa = cohen_kappa(
            [h >= binary_threshold for h in human],
            [j >= binary_threshold for j in judge],
            confidence,
        )
    history: list[tuple[float, float | None, int]] = []
    if periods > 0 and window_s > 0:
        width = window_s / periods
        for i in range(periods):
            start = now - window_s + i * width
            part = [p for p in pairs if start <= p.ts < start + width]
            est = spearman([p.human for p in part], [p.judge for p in part], confidence)
            history.append((start, est.value if est else None, len(part)))
    return Report(
        prompt,
        evaluator,
        n,
        rho,
        kappa,
        sum(human) / n if n else None,
        sum(judge) / n if n else None,
        tuple(history),
    )


def below_floor(report: Report, spearman_floor: float, kappa_floor: float) -> str | None:
    """Why agreement is below a floor with the interval's confidence (its upper end is
    under the floor), or ``None``."""
    reasons = []
    rho, kappa = report.spearman, report.kappa
    if rho is not None and rho.high < spearman_floor:
        reasons.append(
            f"Spearman's rho {rho.value:.2f} (interval {rho.low:.2f}..{rho.high:.2f}) "
            f"is below the floor {spearman_floor:g}"
        )
    if kappa is not None and kappa.high < kappa_floor:
        reasons.append(
            f"Cohen's kappa {kappa.value:.2f} (interval {kappa.low:.2f}..{kappa.high:.2f}) "
            f"is below the floor {kappa_floor:g}"
        )
    if not reasons:
        return None
    return f"{report.evaluator} on {report.prompt} over {report.pairs} pairs: " + "; ".join(reasons)
