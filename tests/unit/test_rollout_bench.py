"""The whole-machine bench builds the observation the daemon's accumulator would build."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from promptd.replacement.adjustment import compare, theta
from promptd.replacement.clustered import ClusteredSample
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
    "scenario",
    [
        "A/A 5 req/s",
        "drift 0.85→0.75, feedback minutes late, 5 req/s",
        "input size (R² 0.7) and history: A/A, 10 req/s",
        "clustered errors (5 % of users at 20 %): A/A, 10 req/s [v2 error test]",
    ],
)
def test_bench_observation_equals_the_accumulators(scenario: str) -> None:
    """Replaying one simulated run's calls and feedback through RolloutAccumulator (in
    storage order, with the run's pre-period history built by History.from_sums) gives
    the same raw and regression-adjusted estimates, error counts and SRM units as the
    bench's vectorised observation, after the run has moved through two steps."""
    bench = _bench()
    sc = next(s for s in bench.SCENARIOS if s.name == scenario)
    sim = bench.Simulation(sc, bench.scenario_profile(sc), runs=1, seed=42)
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
    bench_obs = sim.observation(0)
    names = _unit_names(sim.users.cluster[0])

    acc = RolloutAccumulator(
        "v1",
        "v2",
        "feedback_score",
        step_starts=list(sim.runs.starts[0]),
        srm_settle_s=bench.SRM_SETTLE_S,
        feedback_max_delay_s=bench.daemon_profile().feedback_max_delay_s,
        buckets=DEFAULT_BUCKETS,
        history=sim.history_table(0, names) if sc.history else None,
    )
    events: list[tuple[float, int, tuple[object, ...]]] = []
    index = 0
    for r, t, u, arm, log_lat, err, cost, score, arrives, size in sim.record:
        for j in range(r.size):
            rid = f"req-{index}"
            index += 1
            variant = "v2" if arm[j] else "v1"
            chars = int(size[j]) if size[j] >= 0 else None
            call = (float(t[j]), variant, names[u[j]], math.exp(log_lat[j]), not err[j],
                    None, float(cost[j]), rid, float(t[j]), None, "p", chars)  # fmt: skip
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

    clustered = ["primary", "log_latency", "cost"]
    if sc.errors_clustered:
        clustered.append("errors")
    else:
        errors = {s.step: s for s in bench_obs.errors if s.baseline.n + s.candidate.n}
        mine_errors = acc_obs.errors
        assert isinstance(mine_errors, ClusteredSample)
        assert {
            step: (b.n, b.total, c.n, c.total)
            for step, (b, c) in zip(mine_errors.steps, mine_errors.moments, strict=True)
        } == {s.step: (s.baseline.n, s.baseline.total, s.candidate.n, s.candidate.total)
              for s in errors.values()}  # fmt: skip
    for name in clustered:
        mine, theirs = getattr(acc_obs, name), getattr(bench_obs, name)
        assert isinstance(mine, ClusteredSample)
        assert isinstance(theirs, ClusteredSample)
        if theirs.covariates is None:
            # The bench leaves out a per-call covariate no call reports; the daemon keeps
            # it, all zeros (θ = 0: the same test).
            assert mine.covariates is None or not mine.covariates.sx.any(), name
        else:
            assert mine.covariates is not None
            assert mine.covariates.names == theirs.covariates.names
            assert np.allclose(theta(mine), theta(theirs), rtol=1e-9, atol=1e-12)
        for ratio, pooled in ((1.0, True), (1.1, False)):
            a, b = (
                compare(mine, alpha=0.05, min_samples=1, mde_sd=0.15, ratio=ratio, pooled=pooled),
                compare(theirs, alpha=0.05, min_samples=1, mde_sd=0.15, ratio=ratio, pooled=pooled),
            )
            assert (a[0].n_baseline, a[0].n_candidate) == (b[0].n_baseline, b[0].n_candidate)
            assert a[0].estimate == pytest.approx(b[0].estimate, rel=1e-9, abs=1e-12)
            assert a[0].se == pytest.approx(b[0].se, rel=1e-9)
            assert a[0].log_lr == pytest.approx(b[0].log_lr, rel=1e-9, abs=1e-9)
    assert acc_obs.units == bench_obs.units
    assert (
        acc.feedback.joined
        == bench_obs.primary.arm_totals()[0].n + bench_obs.primary.arm_totals()[1].n
    )
