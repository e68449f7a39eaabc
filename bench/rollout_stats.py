"""The whole rollout machine under simulated traffic; prints the issue 10 tables.

Run: ``python bench/rollout_stats.py`` (``--runs N`` per scenario, ``--jobs J`` processes,
``--only NAME`` for one scenario). Seeded: the same command prints the same table.

What is simulated, through the real pure code: every tick (10 s) of every run calls
:func:`promptd.replacement.machine.step` with the ``balanced`` profile exactly as the daemon
builds it (``promptd.daemon.rollout_profiles.profile_lookup``), so the primary test, every
guardrail, the sample-ratio check, the step plan and the starvation rules all act. The observation a
run's machine sees is what the controller's accumulator
(:class:`~promptd.replacement.observations.RolloutAccumulator`) would compute from the same
events — calls filed by their step and arm, feedback joined to its call, units hashed into
the same cluster buckets — built here with numpy across runs for speed
(``tests/unit/test_rollout_bench.py`` checks that both agree on one run's events).

The traffic: Poisson arrivals; each call from a user of a finite population; sticky routing
by a uniform per-user bucket; SDKs that cache routing for 30 s (a call uses the weight of
up to 30 s ago); one thumbs feedback per call, Bernoulli with the arm's rate at the time of
the call (plus a per-user effect for the correlated scenario), arriving after a delay; a
1 % error rate, lognormal latency (σ 0.5 in log) and cost per call.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from promptd.daemon.rollout_profiles import profile_lookup
from promptd.daemon.settings import RolloutSettings
from promptd.replacement.clustered import ClusteredSample
from promptd.replacement.machine import (
    ArmCounts,
    Observation,
    RolloutState,
    SetWeight,
    Start,
    Status,
    Tick,
    step,
)
from promptd.replacement.observations import DEFAULT_BUCKETS
from promptd.replacement.profiles import RolloutProfile
from promptd.replacement.stats import Moments, Stratum

TICK_S = 10.0
ROUTING_TTL_S = 30.0
SRM_SETTLE_S = 2 * ROUTING_TTL_S + 1.0  # as the controller sets it
MAX_TIME_S = 8 * 3600.0
LATENCY_SIGMA = 0.5
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Metric slots of the per-cell arrays: clustered metrics first, then errors.
PRIMARY, LATENCY, COST, ERRORS = 0, 1, 2, 3
CLUSTERED = (PRIMARY, LATENCY, COST)


@dataclass(frozen=True)
class Scenario:
    """One simulated world; :meth:`p_base` is the baseline's thumbs-up rate at call time."""

    name: str
    rate: float
    p_start: float = 0.8
    p_end: float | None = None  # a baseline drifting linearly to this over an hour
    quality_delta: float = 0.0
    icc: float = 0.0
    calls_per_user: float = 3.0
    feedback_delay: tuple[str, float] = ("exp", 5.0)
    error_base: float = 0.01
    error_cand: float = 0.01
    latency_ratio: float = 1.0
    cost_ratio: float = 1.0
    srm_loss: float = 0.0
    equal: bool = True  # an equal candidate: every rollback is wrong
    require_win: bool = False
    seed: int = 0

    def p_base(self, t: FloatArray) -> FloatArray:
        """The baseline's rate at call times ``t`` (a drift lasts about the plan's hour)."""
        if self.p_end is None:
            return np.full(t.shape, self.p_start)
        share = np.clip(t / 3600.0, 0.0, 1.0)
        return np.asarray(self.p_start + (self.p_end - self.p_start) * share)


DRIFT = {"p_start": 0.85, "p_end": 0.75}


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("A/A 1 req/s", 1.0, seed=1),
    Scenario("A/A 5 req/s", 5.0, seed=2),
    Scenario("A/A 20 req/s", 20.0, seed=3),
    Scenario("drift 0.85→0.75, immediate feedback, 5 req/s", 5.0, **DRIFT, seed=4),
    Scenario("drift 0.85→0.75, immediate feedback, 20 req/s", 20.0, **DRIFT, seed=5),
    Scenario(
        "drift 0.85→0.75, feedback minutes late, 5 req/s",
        5.0,
        **DRIFT,
        feedback_delay=("uniform", 600.0),
        seed=6,
    ),
    Scenario(
        "drift 0.85→0.75, feedback minutes late, 20 req/s",
        20.0,
        **DRIFT,
        feedback_delay=("uniform", 600.0),
        seed=7,
    ),
    Scenario(
        "correlated users (ICC 0.1, 18 calls/user), 5 req/s",
        5.0,
        icc=0.1,
        calls_per_user=18.0,
        seed=8,
    ),
    Scenario("errors 1 % → 2 %, 10 req/s", 10.0, error_cand=0.02, equal=False, seed=9),
    Scenario("errors 1 % → 2 %, 5 req/s", 5.0, error_cand=0.02, equal=False, seed=16),
    Scenario(
        "quality 0.80 → 0.72 at 10 % canary, 10 req/s",
        10.0,
        quality_delta=-0.08,
        equal=False,
        seed=10,
    ),
    Scenario("latency +15 %, 10 req/s", 10.0, latency_ratio=1.15, equal=False, seed=11),
    Scenario("improvement 0.80 → 0.85, 10 req/s", 10.0, quality_delta=0.05, equal=False, seed=12),
    Scenario("SRM 45/55 at 50 %, 10 req/s", 10.0, srm_loss=0.1818, equal=False, seed=13),
    Scenario(
        "require_win: improvement 0.80 → 0.85, 10 req/s",
        10.0,
        quality_delta=0.05,
        require_win=True,
        equal=False,
        seed=14,
    ),
    Scenario("require_win: A/A, 10 req/s", 10.0, require_win=True, seed=15),
)


def daemon_profile(name: str = "balanced") -> RolloutProfile:
    """The profile exactly as the daemon builds it from default settings."""
    lookup = profile_lookup(RolloutSettings())
    profile = lookup(name)  # type: ignore[operator]
    assert isinstance(profile, RolloutProfile)
    return profile


@dataclass
class Outcome:
    """How one run ended."""

    status: str
    cause: str
    at_s: float
    requests: int


@dataclass
class _Where:
    """Unique moment rows of a batch with each observation's position, and per step the
    selection, the unique bucket rows and each observation's (row, arm) slot."""

    rows: IntArray
    row_of: IntArray
    groups: list[tuple[int, npt.NDArray[np.bool_], IntArray, IntArray]]


@dataclass
class _Users:
    route: FloatArray  # uniform routing bucket per user
    cluster: IntArray  # cluster bucket per user (the accumulator's CRC bucket)
    offset: FloatArray  # per-user shift of the thumbs-up rate (correlated users)
    lost: npt.NDArray[np.bool_]  # the user's candidate events are lost (SRM scenario)


@dataclass
class _Runs:
    """The simulated state of a chunk of runs (index r)."""

    states: list[RolloutState]
    weight: FloatArray
    prev_weight: FloatArray
    changed_at: FloatArray
    step_started: FloatArray
    requests: IntArray
    moments: FloatArray  # (R · steps · 2 arms, 4 metrics · 3): n, sum, sum_sq
    y: FloatArray  # (3 metrics, R · B, cells): per-bucket sums
    m: FloatArray  # (3 metrics, R · B, cells): per-bucket counts
    cross: FloatArray  # (3 metrics, 3, R, cells, cells): ΣY Yᵀ, ΣY Mᵀ, ΣM Mᵀ per run
    clusters: IntArray  # (3 metrics, R): non-empty buckets
    seen: npt.NDArray[np.bool_]  # (R, users): counted for SRM in the current step
    units: IntArray  # (R, 2): distinct units per arm in the current step
    starts: list[list[float]]  # per run: the start time of every step reached
    outcomes: list[Outcome | None] = field(default_factory=list)


class Simulation:
    """A chunk of runs of one scenario, advanced tick by tick in lockstep."""

    def __init__(self, sc: Scenario, profile: RolloutProfile, runs: int, seed: int) -> None:
        self.sc, self.profile = sc, profile
        self.rng = np.random.default_rng(seed)
        self.n_runs = runs
        self.n_steps = steps = len(profile.steps)
        self.cells = 2 * steps
        horizon = 4 * 900.0 + 2000.0
        self.n_users = max(50, round(sc.rate * horizon / sc.calls_per_user))
        self.users = self._users()
        state0 = RolloutState(
            "r", "p", "v1", "v2", "salt", profile.name, require_win=sc.require_win
        )
        first, _ = step(state0, Start(), 0.0, profile)
        b = DEFAULT_BUCKETS
        self.runs = _Runs(
            states=[first] * runs,
            weight=np.full(runs, first.weight),
            prev_weight=np.zeros(runs),
            changed_at=np.zeros(runs),
            step_started=np.zeros(runs),
            requests=np.zeros(runs, dtype=np.int64),
            moments=np.zeros((runs * steps * 2, 12)),
            y=np.zeros((3, runs * b, self.cells)),
            m=np.zeros((3, runs * b, self.cells)),
            cross=np.zeros((3, 3, runs, self.cells, self.cells)),
            clusters=np.zeros((3, runs), dtype=np.int64),
            seen=np.zeros((runs, self.n_users), dtype=bool),
            units=np.zeros((runs, 2), dtype=np.int64),
            starts=[[0.0] for _ in range(runs)],
            outcomes=[None] * runs,
        )
        # Feedback waiting to arrive, by the tick it arrives in: arrays of
        # (run, step, arm, bucket, score, call index within its tick for ordering).
        self.pending: dict[int, list[tuple[IntArray, IntArray, IntArray, IntArray, FloatArray]]]
        self.pending = {}
        # When set, every simulated call is appended here (tests replay them through the
        # daemon's accumulator): run, time, user, arm, ln latency, error, cost, feedback
        # score and the time the feedback arrives.
        self.record: list[tuple[IntArray, ...]] | None = None

    def _users(self) -> _Users:
        rng, sc = self.rng, self.sc
        shape = (self.n_runs, self.n_users)
        if sc.icc > 0:
            # Beta(pκ, (1−p)κ) per-user rates have intra-class correlation 1 / (κ + 1).
            kappa = 1.0 / sc.icc - 1.0
            p = sc.p_start
            offset = rng.beta(p * kappa, (1 - p) * kappa, size=shape) - p
        else:
            offset = np.zeros(shape)
        return _Users(
            route=rng.random(shape),
            cluster=rng.integers(0, DEFAULT_BUCKETS, size=shape),
            offset=offset,
            lost=rng.random(shape) < sc.srm_loss,
        )

    # -- traffic of one tick ---------------------------------------------------------

    def traffic(self, tick: int, active: IntArray) -> None:
        """Calls of ``[tick·10 s, (tick+1)·10 s)`` for the active runs, and their feedback."""
        rng, sc, runs, users = self.rng, self.sc, self.runs, self.users
        counts = rng.poisson(sc.rate * TICK_S, size=active.size)
        r = np.repeat(active, counts)
        if r.size == 0:
            return
        t = tick * TICK_S + rng.random(r.size) * TICK_S
        u = rng.integers(0, self.n_users, size=r.size)
        fetched = t - rng.random(r.size) * ROUTING_TTL_S
        w = np.where(fetched >= runs.changed_at[r], runs.weight[r], runs.prev_weight[r])
        arm = (users.route[r, u] < w).astype(np.int64)
        keep = ~((arm == 1) & users.lost[r, u])
        r, t, u, arm = r[keep], t[keep], u[keep], arm[keep]
        st = np.array([s.step_index for s in runs.states])[r]
        np.add.at(runs.requests, r, 1)
        bucket = users.cluster[r, u]
        err = rng.random(r.size) < np.where(arm == 1, sc.error_cand, sc.error_base)
        log_lat = rng.normal(0.0, LATENCY_SIGMA, r.size) + arm * math.log(sc.latency_ratio)
        cost = rng.lognormal(math.log(0.002), 0.3, r.size) * np.where(arm == 1, sc.cost_ratio, 1)
        where = self._where(r, st, arm, bucket)
        for metric, values in ((LATENCY, log_lat), (COST, cost)):
            self._add(metric, where, values)
        self._add(ERRORS, where, err.astype(np.float64))
        self._srm_units(r, t, u, arm)
        p = np.clip(sc.p_base(t) + arm * sc.quality_delta + users.offset[r, u], 0.0, 1.0)
        score = (rng.random(r.size) < p).astype(np.float64)
        kind, scale = sc.feedback_delay
        delay = rng.exponential(scale, r.size) if kind == "exp" else rng.random(r.size) * scale
        due = np.floor((t + delay) / TICK_S).astype(np.int64)
        if self.record is not None:
            self.record.append((r, t, u, arm, log_lat, err, cost, score, t + delay))
        for d in np.unique(due):
            sel = due == d
            self.pending.setdefault(int(d), []).append(
                (r[sel], st[sel], arm[sel], bucket[sel], score[sel])
            )

    def feedback(self, tick: int) -> None:
        """Feedback arriving in this tick joins its call's cell (step, arm, bucket)."""
        chunks = self.pending.pop(tick, [])
        if not chunks:
            return
        r, st, arm, bucket, score = (np.concatenate(parts) for parts in zip(*chunks, strict=True))
        ended = np.array([o is not None for o in self.runs.outcomes], dtype=bool)
        live = ~ended[r]
        if live.any():
            where = self._where(r[live], st[live], arm[live], bucket[live])
            self._add(PRIMARY, where, score[live])

    def _where(self, r: IntArray, st: IntArray, arm: IntArray, bucket: IntArray) -> _Where:
        """Where a batch of observations lands: its moment rows and, per step, its bucket
        rows (run · buckets + bucket) and arms."""
        row = (r * self.n_steps + st) * 2 + arm
        groups = []
        for step_ in np.unique(st):
            sel = st == step_
            rows, row_of = np.unique(r[sel] * DEFAULT_BUCKETS + bucket[sel], return_inverse=True)
            groups.append((int(step_), sel, rows, row_of * 2 + arm[sel]))
        return _Where(*np.unique(row, return_inverse=True), groups)

    def _add(self, metric: int, where: _Where, values: FloatArray) -> None:
        rows = where.rows.size
        for j, v in enumerate((np.ones_like(values), values, values * values)):
            self.runs.moments[where.rows, 3 * metric + j] += np.bincount(
                where.row_of, weights=v, minlength=rows
            )
        if metric != ERRORS:
            for step_, sel, bucket_rows, slot in where.groups:
                self._add_clustered(metric, step_, bucket_rows, slot, values[sel])

    def _add_clustered(
        self, metric: int, step_: int, rows: IntArray, slot: IntArray, values: FloatArray
    ) -> None:
        """Add one step's observations to the bucket sums, updating the cross products by
        the touched rows only.

        With Δ the change of a row (non-zero only in the step's two cells ``c``),
        ``new newᵀ − old oldᵀ = Δ newᵀ + old Δᵀ``: the rows ``c`` gain ``Σ Δ_c newᵀ`` and
        the columns ``c`` gain ``Σ old Δ_cᵀ``.
        """
        runs = self.runs
        y, m = runs.y[metric], runs.m[metric]
        hi = 2 * (max(s.step_index for s in runs.states) + 1)
        c = slice(2 * step_, 2 * step_ + 2)
        k = rows.size
        d_y = np.bincount(slot, weights=values, minlength=2 * k).reshape(k, 2)
        d_m = np.bincount(slot, minlength=2 * k).astype(np.float64).reshape(k, 2)
        old_y, old_m = y[rows, :hi], m[rows, :hi]
        new_y, new_m = old_y.copy(), old_m.copy()
        new_y[:, c] += d_y
        new_m[:, c] += d_m
        y[rows, c] = new_y[:, c]
        m[rows, c] = new_m[:, c]
        run = rows // DEFAULT_BUCKETS
        starts = np.flatnonzero(np.r_[True, run[1:] != run[:-1]])
        touched = run[starts]
        pairs = ((d_y, new_y, old_y, d_y), (d_y, new_m, old_y, d_m), (d_m, new_m, old_m, d_m))
        for kind, (d_a, new_b, old_a, d_b) in enumerate(pairs):
            rows_c = np.add.reduceat(d_a[:, :, None] * new_b[:, None, :], starts, axis=0)
            cols_c = np.add.reduceat(old_a[:, :, None] * d_b[:, None, :], starts, axis=0)
            runs.cross[metric, kind, touched, c, :hi] += rows_c
            runs.cross[metric, kind, touched, :hi, c] += cols_c
        born = (old_m.sum(axis=1) == 0) & (new_m.sum(axis=1) > 0)
        runs.clusters[metric, touched] += np.add.reduceat(born.astype(np.int64), starts)

    def _srm_units(self, r: IntArray, t: FloatArray, u: IntArray, arm: IntArray) -> None:
        """Distinct units per arm in the current step, counted after the settle period."""
        runs = self.runs
        settled = t >= runs.step_started[r] + SRM_SETTLE_S
        r, u, arm = r[settled], u[settled], arm[settled]
        first = ~runs.seen[r, u]
        r, u, arm = r[first], u[first], arm[first]
        # A unit twice in one tick is counted once.
        key = r * self.n_users + u
        _, idx = np.unique(key, return_index=True)
        runs.seen[r[idx], u[idx]] = True
        np.add.at(runs.units, (r[idx], arm[idx]), 1)

    # -- the machine -----------------------------------------------------------------

    def observation(
        self, i: int, cross: dict[int, tuple[FloatArray, ...]], pos: int
    ) -> Observation:
        """Run ``i``'s observation, as the accumulator would build it.

        Every step up to the current one is a stratum (a step without data in a metric has
        zero weight, exactly as if it were left out).
        """
        runs = self.runs
        state = runs.states[i]
        k = state.step_index + 1
        base = i * self.n_steps * 2
        flat = runs.moments[base : base + 2 * k].tolist()  # rows (step, arm)
        mo = [[[flat[2 * s + a][3 * x : 3 * x + 3] for x in range(4)] for a in (0, 1)]
              for s in range(k)]  # fmt: skip
        steps = tuple(range(k))
        samples = {}
        for metric in CLUSTERED:
            yy, ym, mm, clusters = cross[metric]
            samples[metric] = ClusteredSample(
                steps=steps,
                moments=tuple(
                    (_moments(mo[s][0][metric]), _moments(mo[s][1][metric])) for s in steps
                ),
                yy=yy[pos, : 2 * k, : 2 * k],
                ym=ym[pos, : 2 * k, : 2 * k],
                mm=mm[pos, : 2 * k, : 2 * k],
                clusters=int(clusters[pos]),
            )
        errors = tuple(
            Stratum(_moments(mo[s][0][ERRORS]), _moments(mo[s][1][ERRORS]), step=s) for s in steps
        )
        units = runs.units[i]
        return Observation(
            primary=samples[PRIMARY],
            log_latency=samples[LATENCY],
            cost=samples[COST],
            errors=errors,
            units=ArmCounts(int(units[0]), int(units[1])),
        )

    def cross_products(self, active: IntArray) -> dict[int, tuple[FloatArray, ...]]:
        """Per clustered metric: ΣY Yᵀ, ΣY Mᵀ, ΣM Mᵀ and the non-empty clusters, per run."""
        runs = self.runs
        cells = 2 * (max(runs.states[i].step_index for i in active) + 1)
        return {
            metric: (
                *(runs.cross[metric, kind][active][:, :cells, :cells] for kind in range(3)),
                runs.clusters[metric][active],
            )
            for metric in CLUSTERED
        }

    def decide(self, tick: int, active: IntArray) -> None:
        """One controller tick for every active run."""
        now = (tick + 1) * TICK_S
        runs = self.runs
        cross = self.cross_products(active)
        for pos, i in enumerate(active):
            obs = self.observation(int(i), cross, pos)
            old = runs.states[i]
            new, actions = step(old, Tick(obs), now, self.profile)
            runs.states[i] = new
            for action in actions:
                if isinstance(action, SetWeight) and action.weight != runs.weight[i]:
                    runs.prev_weight[i], runs.weight[i] = runs.weight[i], action.weight
                    runs.changed_at[i] = now
            if new.step_index != old.step_index:
                runs.step_started[i] = now
                runs.starts[i].append(now)
                runs.seen[i] = False
                runs.units[i] = 0
            if new.status not in (Status.RUNNING, Status.PAUSED):
                reason = actions[-1].reason if hasattr(actions[-1], "reason") else ""
                runs.outcomes[i] = Outcome(
                    new.status.value, _cause(new.status, reason), now, int(runs.requests[i])
                )

    def run(self) -> list[Outcome]:
        """Simulate until every run has ended or the time cap."""
        ticks = int(MAX_TIME_S / TICK_S)
        for tick in range(ticks):
            active = np.array(
                [i for i, o in enumerate(self.runs.outcomes) if o is None], dtype=np.int64
            )
            if active.size == 0:
                break
            self.traffic(tick, active)
            self.feedback(tick)
            self.decide(tick, active)
        return [
            o if o is not None else Outcome("running", "censored", MAX_TIME_S, int(n))
            for o, n in zip(self.runs.outcomes, self.runs.requests, strict=True)
        ]


def _moments(row: list[float]) -> Moments:
    return Moments(int(row[0]), row[1], row[2])


def _cause(status: Status, reason: str) -> str:
    if status is not Status.ROLLED_BACK:
        return status.value
    for needle, cause in (
        ("sample ratio", "srm"),
        ("latency guardrail", "latency"),
        ("error-rate guardrail", "errors"),
        ("cost guardrail", "cost"),
        ("starved", "starvation"),
        ("significantly worse", "primary"),
    ):
        if needle in reason:
            return cause
    return "other"


CHUNK = 250


def simulate(sc: Scenario, runs: int) -> list[Outcome]:
    """Every run of one scenario (in chunks, to bound memory)."""
    profile = daemon_profile()
    out: list[Outcome] = []
    for c, start in enumerate(range(0, runs, CHUNK)):
        n = min(CHUNK, runs - start)
        out += Simulation(sc, profile, n, seed=sc.seed * 1000 + c).run()
    return out


# -- the tables ------------------------------------------------------------------------------

CAUSES = ("primary", "latency", "errors", "cost", "srm", "starvation")


@dataclass
class Summary:
    """One scenario's figures."""

    scenario: Scenario
    outcomes: list[Outcome]
    seconds: float

    def share(self, pred: Callable[[Outcome], bool]) -> float:
        return sum(1 for o in self.outcomes if pred(o)) / len(self.outcomes)

    @property
    def rolled_back(self) -> float:
        return self.share(lambda o: o.status == "rolled_back")

    def cause(self, cause: str) -> float:
        return self.share(lambda o: o.status == "rolled_back" and o.cause == cause)

    def rolled_back_within(self, requests: int) -> float:
        return self.share(lambda o: o.status == "rolled_back" and o.requests <= requests)

    def median_requests_to_rollback(self) -> float:
        got = [o.requests for o in self.outcomes if o.status == "rolled_back"]
        return float(np.median(got)) if got else math.nan


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def print_tables(summaries: Sequence[Summary], runs: int) -> None:
    """The scenario table (outcomes and rollback causes) and the targets table."""
    print(f"\n## Whole machine, `balanced` profile as the daemon builds it ({runs} runs each)\n")
    head = ["scenario", "rolled back", *CAUSES, "promoted", "no improvement", "still running"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for s in summaries:
        cells = [
            s.scenario.name,
            _pct(s.rolled_back),
            *(_pct(s.cause(c)) for c in CAUSES),
            _pct(s.share(lambda o: o.status == "promoted")),
            _pct(s.share(lambda o: o.status == "no_improvement")),
            _pct(s.share(lambda o: o.status == "running")),
        ]
        print("| " + " | ".join(cells) + " |")
    print("\n## Targets (issue 10)\n")
    print("| scenario | target | measured | met |")
    print("| --- | --- | --- | --- |")
    for name, target, measured, ok in targets(summaries):
        print(f"| {name} | {target} | {measured} | {'yes' if ok else 'NO'} |")


def targets(summaries: Sequence[Summary]) -> list[tuple[str, str, str, bool]]:
    """(scenario, target, measured, met) for every target of the issue."""
    by = {s.scenario.name: s for s in summaries}
    rows: list[tuple[str, str, str, bool]] = []
    for s in summaries:
        if s.scenario.equal and not s.scenario.require_win and s.scenario.quality_delta == 0:
            rows.append((s.scenario.name, "wrong rollbacks ≤ 5 %", _pct(s.rolled_back),
                         s.rolled_back <= 0.05))  # fmt: skip
    q = by.get("quality 0.80 → 0.72 at 10 % canary, 10 req/s")
    if q is not None:
        within, med = q.rolled_back_within(6000), q.median_requests_to_rollback()
        met = within >= 0.95 and med <= 3000
        rows.append((q.scenario.name, "≥ 95 % within 6,000 requests, median ≤ 3,000",
                     f"{_pct(within)}, median {med:,.0f}", met))  # fmt: skip
    for name, floor in (("latency +15 %, 10 req/s", 0.95), ("errors 1 % → 2 %, 10 req/s", 0.90)):
        s = by.get(name)
        if s is not None:
            rows.append((name, f"rolled back ≥ {floor:.0%}", _pct(s.rolled_back),
                         s.rolled_back >= floor))  # fmt: skip
    imp = by.get("improvement 0.80 → 0.85, 10 req/s")
    if imp is not None:
        rows.append((imp.scenario.name, "wrongly rolled back ≤ 5 %", _pct(imp.rolled_back),
                     imp.rolled_back <= 0.05))  # fmt: skip
    correct = [s for s in summaries if s.scenario.srm_loss == 0]
    n = sum(len(s.outcomes) for s in correct)
    srm = sum(1 for s in correct for o in s.outcomes if o.cause == "srm") / max(n, 1)
    rows.append((f"correct routing (all {len(correct)} scenarios, {n} runs)",
                 "false sample-ratio alarms ≤ 0.2 %", _pct(srm), srm <= 0.002))  # fmt: skip
    return rows


def _one(args: tuple[Scenario, int]) -> Summary:
    sc, runs = args
    started = time.perf_counter()
    outcomes = simulate(sc, runs)
    return Summary(sc, outcomes, time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the scenarios and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=1000, help="runs per scenario")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--only", action="append", help="scenario names containing this text")
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if not args.only or any(text in s.name for text in args.only)]
    started = time.perf_counter()
    work = [(s, args.runs) for s in chosen]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            summaries = list(pool.map(_one, work))
    else:
        summaries = [_one(w) for w in work]
    print_tables(summaries, args.runs)
    profile = daemon_profile()
    print(f"\nprofile budget: {profile.budget()}")
    print(f"profile margins: {profile.margins()}")
    print(f"\n{time.perf_counter() - started:.0f} s in total")


if __name__ == "__main__":
    main()
