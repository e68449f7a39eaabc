"""Benchmark of the rollout statistics and state machine; prints one table.

Run: ``python bench/rollout_stats.py``. Pure and seeded; takes well under two minutes.
"""

from __future__ import annotations

import math
import time

import numpy as np
from scipy import stats

from promptd.replacement.machine import (
    ArmCounts,
    Moments,
    Observation,
    RolloutState,
    Start,
    Stratum,
    Tick,
    step,
)
from promptd.replacement.profiles import BALANCED
from promptd.replacement.stats import (
    combine_strata_arrays,
    fixed_horizon_total_n,
    sequential_reject_arrays,
)

RUNS = 2000
TICK = 100


def monitor(
    p_base: float, p_cand: float, weight: float, total: int, seed: int
) -> tuple[float, float, np.ndarray]:
    """(wrong-or-any decision rate, naive rate, first rollback per run) at every tick."""
    rng = np.random.default_rng(seed)
    ticks = total // TICK
    n_c = rng.binomial(TICK, weight, size=(RUNS, ticks))
    s_c, s_b = rng.binomial(n_c, p_cand), rng.binomial(TICK - n_c, p_base)
    n_b, s_b, n_c, s_c = (
        np.cumsum(a, axis=1)[..., None].astype(np.float64) for a in (TICK - n_c, s_b, n_c, s_c)
    )
    d, var, big_w = combine_strata_arrays((n_b, s_b, s_b), (n_c, s_c, s_c))
    enough = np.minimum(n_b, n_c)[..., 0] >= BALANCED.min_samples_for_test
    z, lw = sequential_reject_arrays(d, var, big_w, alpha=1, alternative="less")
    _, lb = sequential_reject_arrays(d, var, big_w, alpha=1, alternative="greater")
    worse = enough & (lw >= math.log(1 / BALANCED.alpha_worse))
    better = enough & (lb >= math.log(1 / BALANCED.alpha_better))
    naive = enough & (np.abs(z) >= stats.norm.ppf(0.975))
    first = np.where(worse.any(axis=1), worse.argmax(axis=1) + 1, np.inf) * TICK
    return float((worse | better).any(axis=1).mean()), float(naive.any(axis=1).mean()), first


def _observation(n: int, weight: float) -> Observation:
    n_c = round(n * weight)
    n_b = n - n_c
    stratum = Stratum(Moments(n_b, 0.8 * n_b, 0.8 * n_b), Moments(n_c, 0.8 * n_c, 0.8 * n_c))
    lat = Stratum(Moments(n_b, 0.0, 0.25 * n_b), Moments(n_c, 0.0, 0.25 * n_c))
    return Observation(
        primary=(stratum,),
        log_latency=(lat,),
        errors=(stratum,),
        cost=(lat,),
        units=ArmCounts(n_b, n_c),
        requests=ArmCounts(n_b, n_c),
    )


def ticks_per_second(rollouts: int = 1000, rounds: int = 5) -> float:
    """Controller throughput: machine.step(Tick) calls per second over many rollouts."""
    states = []
    for i in range(rollouts):
        state = RolloutState(f"r{i}", f"p{i}", "v1", "v2", f"s{i}", "balanced")
        states.append(step(state, Start(), 0.0, BALANCED)[0])
    obs = Tick(_observation(2000, 0.1))
    started = time.perf_counter()
    for r in range(rounds):
        states = [step(s, obs, 60.0 * (r + 1), BALANCED)[0] for s in states]
    return rollouts * rounds / (time.perf_counter() - started)


def main() -> None:
    """Print the table."""
    rows: list[tuple[str, str]] = []
    for rate in (0.80, 0.99):
        for weight in (0.5, 0.1):
            fp, naive, _ = monitor(rate, rate, weight, 20_000, seed=int(rate * 100 + weight * 10))
            rows.append(
                (
                    f"A/A p={rate} canary={weight:.0%}, 200 looks",
                    f"mSPRT {fp:.2%} | naive z {naive:.2%}",
                )
            )
    _, _, first = monitor(0.80, 0.72, 0.1, 6_000, seed=7)
    detected = np.isfinite(first)
    fixed_n = fixed_horizon_total_n(0.80, 0.72, 0.1)
    rows.append(
        (
            "0.80→0.72 at 10 % canary (≤ 6,000 req)",
            f"detected {detected.mean():.1%}, median {np.median(first):.0f} req "
            f"| fixed-horizon 80 % power: {fixed_n:.0f} req",
        )
    )
    rows.append(("machine.step ticks/s (1,000 rollouts)", f"{ticks_per_second():,.0f}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
