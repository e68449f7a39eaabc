"""The whole-machine bench builds the observation the daemon's accumulator would build."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from promptd.replacement.clustered import ClusteredSample, estimate
from promptd.replacement.observations import DEFAULT_BUCKETS, RolloutAccumulator, unit_bucket

BENCH = Path(__file__).resolve().parents[2] / "bench" / "rollout_stats.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rollout_stats_bench", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _unit_names(clusters: np.ndarray) -> list[str]:
    """A unit name per simulated user whose CRC bucket is the user's simulated bucket."""
    names = []
    for user, bucket in enumerate(clusters):
        k = 0
        while unit_bucket(f"user-{user}-{k}") != bucket:
            k += 1
        names.append(f"user-{user}-{k}")
    return names


@pytest.mark.parametrize(
    "scenario", ["A/A 5 req/s", "drift 0.85→0.75, feedback minutes late, 5 req/s"]
)
def test_bench_observation_equals_the_accumulators(scenario: str) -> None:
    """Replaying one simulated run's calls and feedback through RolloutAccumulator (in
    storage order) gives the same estimates, error counts and SRM units as the bench's
    vectorised observation, after the run has moved through two steps."""
    bench = _bench()
    sc = next(s for s in bench.SCENARIOS if s.name == scenario)
    sim = bench.Simulation(sc, bench.daemon_profile(), runs=1, seed=42)
    sim.record = []
    active = np.array([0])
    tick = 0
    while sim.runs.states[0].step_index < 2:
        sim.traffic(tick, active)
        sim.feedback(tick)
        sim.decide(tick, active)
        tick += 1
        assert tick < 2000, "the run did not reach step 2"
    now = tick * bench.TICK_S
    state = sim.runs.states[0]
    bench_obs = sim.observation(0, sim.cross_products(active), 0)

    acc = RolloutAccumulator(
        "v1",
        "v2",
        "feedback_score",
        step_starts=list(sim.runs.starts[0]),
        srm_settle_s=bench.SRM_SETTLE_S,
        feedback_max_delay_s=bench.daemon_profile().feedback_max_delay_s,
        buckets=DEFAULT_BUCKETS,
    )
    names = _unit_names(sim.users.cluster[0])
    events: list[tuple[float, int, tuple[object, ...]]] = []
    index = 0
    for r, t, u, arm, log_lat, err, cost, score, arrives in sim.record:
        for j in range(r.size):
            rid = f"req-{index}"
            index += 1
            variant = "v2" if arm[j] else "v1"
            call = (float(t[j]), variant, names[u[j]], math.exp(log_lat[j]), not err[j],
                    None, float(cost[j]), rid, float(t[j]))  # fmt: skip
            events.append((float(t[j]), 0, call))
            # The bench hands feedback over at the end of the tick it arrives in.
            if math.floor(arrives[j] / bench.TICK_S) * bench.TICK_S < now:
                events.append((float(arrives[j]), 1, (rid, float(score[j]), float(arrives[j]))))
    events.sort(key=lambda e: (e[0], e[1]))
    for _, kind, event in events:
        if kind == 0:
            acc.add_metric(*event)  # type: ignore[arg-type]
        else:
            acc.add_feedback(*event)  # type: ignore[arg-type]
    acc_obs = acc.observation(state)

    for name in ("primary", "log_latency", "cost"):
        mine, theirs = getattr(acc_obs, name), getattr(bench_obs, name)
        assert isinstance(mine, ClusteredSample)
        assert isinstance(theirs, ClusteredSample)
        for ratio, pooled in ((1.0, True), (1.1, False)):
            a, b = (
                estimate(mine, ratio=ratio, pooled=pooled),
                estimate(theirs, ratio=ratio, pooled=pooled),
            )
            assert (a.n_baseline, a.n_candidate) == (b.n_baseline, b.n_candidate)
            assert a.d == pytest.approx(b.d, rel=1e-9, abs=1e-12)
            assert a.var == pytest.approx(b.var, rel=1e-9)
    errors = {s.step: s for s in bench_obs.errors if s.baseline.n + s.candidate.n}
    assert {s.step: s for s in acc_obs.errors} == errors
    assert acc_obs.units == bench_obs.units
    assert (
        acc.feedback.joined
        == bench_obs.primary.arm_totals()[0].n + bench_obs.primary.arm_totals()[1].n
    )
