"""How many calls a rollout needs to decide: evaluations at 10 % versus people at 1 %.

    python bench/rollout_signals.py [--runs 20] [--max-calls 3000000] [--seed 1]

A rollout of an optimizer's candidate (``require_win``: it promotes only on a significant
win, ends as no_improvement at the horizon, rolls back when worse) runs through the real
:class:`~promptd.replacement.observations.RolloutAccumulator` and state machine
(:func:`promptd.replacement.machine.step`) with the ``balanced`` profile, its step
durations set to 0 so that only the samples decide (what a busy app reaches first).

The traffic: each call is good with the arm's probability (the baseline 0.70; the
candidate 0.75, 0.70 or 0.65); people rate 1 % of the calls (thumbs: 1 for a good call,
else 0); or an evaluator scores 10 % of them (sampled by request, both arms alike), agreeing
with the truth with probability ``agreement`` and otherwise answering at random (0/1,
half each) — the judge's noise, whose effect on the agreement is what the calibration
measures (Cohen's kappa with the truth ≈ ``agreement``). Units are distinct per call;
routing is by the step's weight. Only calls that carry a score are fed (the rest cannot
move the primary metric); a tick every 1,000 calls. The table shows, per signal and
candidate, the share of runs ending in each decision and the median number of calls (of
all the app's calls, scored or not) until the decision.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np

from promptd.replacement import machine
from promptd.replacement.observations import RolloutAccumulator
from promptd.replacement.profiles import BALANCED, RolloutProfile
from promptd.replacement.state import RolloutState, Status

PROFILE: RolloutProfile = BALANCED.model_copy(
    update={"steps": tuple(s.model_copy(update={"min_duration_s": 0.0}) for s in BALANCED.steps)}
)
CHUNK = 1000
RATE_PER_S = 100.0
BASELINE = 0.70


@dataclass(frozen=True)
class Signal:
    """A quality signal: the share of calls it scores and its agreement with the truth."""

    label: str
    rate: float
    agreement: float
    source: str | None


SIGNALS = (
    Signal("people, 1 %", 0.01, 1.0, None),
    Signal("evaluator, 10 %, agreement 1.0", 0.10, 1.0, "eval:judge"),
    Signal("evaluator, 10 %, agreement 0.8", 0.10, 0.8, "eval:judge"),
    Signal("evaluator, 10 %, agreement 0.6", 0.10, 0.6, "eval:judge"),
)


def run(signal: Signal, candidate: float, seed: int, max_calls: int) -> tuple[str, int]:
    """One rollout: its outcome and the calls the app made until it."""
    rng = np.random.default_rng(seed)
    signals = ("human",) if signal.source is None else (signal.source,)
    acc = RolloutAccumulator("v1", "v2", "feedback_score", step_starts=[0.0], signals=signals)
    state = RolloutState(
        "ro", "p", "v1", "v2", "s", PROFILE.name, require_win=True, signals=signals
    )
    state, _ = machine.step(state, machine.Start(), 0.0, PROFILE)
    calls = 0
    while calls < max_calls:
        scored = np.flatnonzero(rng.random(CHUNK) < signal.rate)
        in_candidate = rng.random(len(scored)) < state.weight
        good = rng.random(len(scored)) < np.where(in_candidate, candidate, BASELINE)
        agrees = rng.random(len(scored)) < signal.agreement
        score = np.where(agrees, good, rng.random(len(scored)) < 0.5).astype(float)
        for offset, cand, value in zip(scored, in_candidate, score, strict=True):
            at = (calls + offset) / RATE_PER_S
            rid = f"r{calls + offset}"
            variant = "v2" if cand else "v1"
            acc.add_metric(at, variant, rid, 100.0, True, None, 0.001, rid, at)
            acc.add_feedback(rid, float(value), at, ts=at, source=signal.source)
        calls += CHUNK
        now = calls / RATE_PER_S
        state, _ = machine.step(state, machine.Tick(acc.observation(state)), now, PROFILE)
        if state.status is not Status.RUNNING:
            return state.status.value, calls
        while len(acc.step_starts) <= state.step_index:
            acc.start_step(state.step_index, now)
    return "undecided", calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--max-calls", type=int, default=3_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.monotonic()
    print(
        f"{'signal':<34}{'candidate':>10}{'promoted':>10}{'no_impr.':>10}{'rolled b.':>10}"
        f"{'undecided':>10}{'median calls':>14}"
    )
    for signal in SIGNALS:
        for candidate in (0.75, 0.70, 0.65):
            results = [
                run(signal, candidate, args.seed * 10_000 + i, args.max_calls)
                for i in range(args.runs)
            ]
            share = {k: sum(r[0] == k for r in results) / len(results) for k in _OUTCOMES}
            median = statistics.median(r[1] for r in results)
            print(
                f"{signal.label:<34}{candidate - BASELINE:>+10.2f}"
                + "".join(f"{share[k]:>10.0%}" for k in _OUTCOMES)
                + f"{median:>14,.0f}",
                flush=True,
            )
    print(f"\n{time.monotonic() - started:.0f} s in all ({args.runs} runs per row)")


_OUTCOMES = ("promoted", "no_improvement", "rolled_back", "undecided")

if __name__ == "__main__":
    main()
