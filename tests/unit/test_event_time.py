"""Event time, property-tested: live windows equal the windows rebuilt from storage,
whatever the interleaving of partitions, the delays, clocks and restarts, and whichever
feedback (people's, evaluators', both) each prompt's monitor counts.

Each example simulates a broker (one log per partition), producers that stamp events
late, early or in order, and the daemon's ingestion path: real decoding
(:func:`~promptd.daemon.ingest.decode_batch`), the partition clock, batches written to a
real SQLite file, the live monitor as batch listener, snapshots, crashes (in-memory
state lost, consumption resumed from the stored offsets) and clean restarts (restore
from the snapshot). At the end the live windows are compared with a full rebuild from
storage and with a restore from the last snapshot.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from promptd.daemon.decode import RowDecoder
from promptd.daemon.ingest import decode_batch
from promptd.evaluation.config import EvaluationSettings
from promptd.events import FeedbackEvent, MetricEvent
from promptd.monitoring.config import MonitoringSettings
from promptd.monitoring.eventtime import ADMIT_ALL, Admission, PartitionClock
from promptd.monitoring.export import MonitorExport
from promptd.monitoring.monitor import Monitor, rebuild_windows
from promptd.monitoring.signals import MonitorSignals
from promptd.monitoring.snapshot import restore
from promptd.monitoring.triggers import TriggerQueue
from promptd.monitoring.windows import WindowStore
from promptd.storage.alerts import AlertStore
from promptd.storage.database import Database
from promptd.storage.repository import BatchTime, EventRepository
from promptd.storage.snapshots import SnapshotStore, last_ids

T0 = 1_700_000_000.0
LATENESS = 5.0
MAX_FUTURE = 20.0
# Small tiers so that an example of a few hundred simulated seconds folds and drops.
TIERS = [
    {"bucket_seconds": 1, "retention_seconds": 10},
    {"bucket_seconds": 5, "retention_seconds": 60},
    {"bucket_seconds": 30, "retention_seconds": 300},
]
# Raw replay covers every tier but the baseline, which is rebuilt from SQL aggregates.
HORIZON = 60.0
# Two metric partitions and one feedback partition.
PARTITIONS = (("m", 0), ("m", 1), ("f", 0))

# Who scored a piece of feedback: people (no source), the evaluator some prompt's monitor
# reads, or one no prompt reads.
SOURCES = (None, "eval:judge", "eval:other")
#: The monitor signals of a run that chooses them: prompt p reads the judge only, q both.
CHOSEN = MonitorSignals(
    EvaluationSettings.model_validate(
        {
            "evaluators": [
                {"name": name, "type": "regex", "pattern": "x"} for name in ("judge", "other")
            ],
            "signals": [
                {"prompts": ["p"], "monitor": ["eval:judge"]},
                {"prompts": ["q"], "monitor": ["human", "eval:judge"]},
            ],
        }
    )
)

# How a producer stamps an event (see Sim.event).
TIMINGS = ("in_order", "late_small", "late_large", "ahead", "far_ahead", "old")


def _settings() -> MonitoringSettings:
    return MonitoringSettings(
        tiers=TIERS,
        lateness_s=LATENESS,
        max_future_s=MAX_FUTURE,
        rebuild_horizon_s=HORIZON,
        export_windows_s=(10.0,),
    )


@dataclass
class Sim:
    """The broker, the producers' clock and the daemon's in-memory state."""

    rng: random.Random
    db: Database
    now: float = T0
    logs: dict[tuple[str, int], list[bytes]] = field(default_factory=dict)
    # What the consumer has been told of each log's end (a fetch answer), per partition.
    highwater: dict[tuple[str, int], int] = field(default_factory=dict)
    # Where the consumer reads next (stored offsets after a restart).
    position: dict[tuple[str, int], int] = field(default_factory=dict)
    stored: dict[tuple[str, int], int] = field(default_factory=dict)
    clock: PartitionClock = field(default_factory=PartitionClock)
    monitor: Monitor | None = None
    #: Which feedback each prompt's windows count (people's only by default).
    signals: MonitorSignals = field(default_factory=MonitorSignals)
    serial: int = 0
    last_ts: dict[tuple[str, int], float] = field(default_factory=dict)
    stamp: float = T0

    def event(self, key: tuple[str, int], timing: str) -> bytes:
        """One event for partition ``key``, stamped according to ``timing``."""
        rng = self.rng
        self.serial += 1
        offsets = {
            "in_order": 0.0,
            "late_small": -rng.uniform(0, LATENESS * 0.9),
            "late_large": -rng.uniform(LATENESS * 1.1, LATENESS * 8),
            "ahead": rng.uniform(0.1, MAX_FUTURE * 0.9),
            "far_ahead": MAX_FUTURE * 50,
            "old": -rng.uniform(200, 2000),
        }
        ts = self.now + offsets[timing]
        if timing == "in_order":
            ts = max(ts, self.last_ts.get(key, ts))
        self.last_ts[key] = max(ts, self.last_ts.get(key, -math.inf))
        prompt, variant = rng.choice(("p", "q")), rng.choice(("v1", "v2"))
        body: dict[str, Any] = {
            "event_id": f"e{self.serial}",
            "ts": ts,
            "prompt": prompt,
            "variant": variant,
            "request_id": f"r{self.serial}",
        }
        if key[0] == "f":
            body |= {"type": "feedback", "score": rng.random(), "source": rng.choice(SOURCES)}
        else:
            body |= {
                "type": "metric",
                "model": rng.choice(("a", "b")),
                "latency_ms": rng.lognormvariate(4, 1),
                "success": rng.random() < 0.9,
                "quality": rng.random() if rng.random() < 0.5 else None,
            }
        return json.dumps(body).encode()

    def monitor_with(self, store: WindowStore) -> Monitor:
        """A monitor over ``store``, like the daemon's (snapshots in the same file)."""
        return Monitor(
            _settings(),
            [],
            store,
            AlertStore(self.db),
            MonitorExport(CollectorRegistry()),
            TriggerQueue(),
            clock=lambda: self.now,
            snapshots=SnapshotStore(self.db),
            signals=self.signals,
        )

    async def start(self, from_snapshot: bool) -> None:
        """What the daemon does at start: windows from the snapshot (or rebuilt), the
        partition clock and the positions from storage."""
        config = _settings().window_config()
        restored = await restore(config, self.db, self.now, self.signals) if from_snapshot else None
        if restored is None:
            store = WindowStore(config)
            await rebuild_windows(store, self.db, self.now, HORIZON, self.signals)
            covered = await last_ids(self.db)
        else:
            store, covered = restored
        self.monitor = self.monitor_with(store)
        self.monitor.covered = covered
        repo = EventRepository(self.db)
        self.stored = await repo.load_offsets(PARTITIONS)
        self.position = {key: self.stored.get(key, 0) for key in PARTITIONS}
        self.clock = PartitionClock()
        self.clock.load(await repo.load_watermarks(PARTITIONS))
        self.highwater = {}

    def unread(self) -> list[tuple[str, int]]:
        """Partitions the consumer knows to have records not stored yet (as
        ``Ingestor._has_unread`` decides from the last fetch answer)."""
        out = []
        for key in PARTITIONS:
            hw = self.highwater.get(key)
            stored = self.stored.get(key, self.position.get(key))
            if hw is None or stored is None or hw > stored:
                out.append(key)
        return out

    async def consume(self, partitions: list[int], limit: int) -> None:
        """One fetch of up to ``limit`` records from each of ``partitions``, stored as
        ingestion stores it and handed to the monitor."""
        records: dict[TopicPartition, list[Any]] = {}
        for key in PARTITIONS:
            # A fetch answers the high-water mark of every assigned partition, though
            # not every answer reaches the consumer before the batch is stored.
            if key not in self.highwater or self.rng.random() < 0.8:
                self.highwater[key] = len(self.logs.get(key, []))
        for i in partitions:
            key = PARTITIONS[i]
            log = self.logs.get(key, [])
            start = self.position.get(key, 0)
            taken = log[start : start + limit]
            if taken:
                tp = TopicPartition(*key)
                records[tp] = [
                    SimpleNamespace(value=v, offset=start + n) for n, v in enumerate(taken)
                ]
                self.position[key] = start + len(taken)
        if not records:
            return
        batch = decode_batch(records, RowDecoder(256 * 1024))
        assert not batch.dead
        self.stamp = max(self.now, math.nextafter(self.stamp, math.inf))
        clock = self.clock.batch_time(batch.offsets, self.unread(), batch.newest, self.stamp)
        outcome = await EventRepository(self.db).store_batch(
            batch.metrics, batch.feedback, batch.offsets, clock=clock
        )
        self.clock.apply(clock.partition_watermarks or {})
        self.stored.update(batch.offsets)
        assert self.monitor is not None
        await self.monitor.on_batch(outcome)


async def _run(
    seed: int, ops: list[tuple[Any, ...]], signals: MonitorSignals | None = None
) -> tuple[Sim, WindowStore, WindowStore]:
    with tempfile.TemporaryDirectory() as tmp:
        db = await Database.open(Path(tmp) / "t.db")
        try:
            sim = Sim(random.Random(seed), db, signals=signals or MonitorSignals())
            await sim.start(from_snapshot=False)
            for op in ops:
                await _step(sim, op)
            # Drain every log, so that storage holds everything that was produced.
            for _ in range(100):
                if all(sim.position.get(k, 0) >= len(sim.logs.get(k, [])) for k in PARTITIONS):
                    break
                await sim.consume([0, 1, 2], 1000)
            assert sim.monitor is not None
            live = sim.monitor.store
            live.expire(sim.now)
            rebuilt = WindowStore(live.config)
            await rebuild_windows(rebuilt, db, sim.now, HORIZON, sim.signals)
            await sim.monitor.snapshot_once(force=True)
            restored = await restore(live.config, db, sim.now, sim.signals)
            assert restored is not None
            assert _windows(restored[0], sim.now) == _windows(live, sim.now)
            return sim, live, rebuilt
        finally:
            await db.close()


async def _step(sim: Sim, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "produce":
        _, i, count, timing = op
        key = PARTITIONS[i]
        sim.logs.setdefault(key, []).extend(sim.event(key, timing) for _ in range(count))
    elif kind == "resend":
        # An at-least-once producer sends an event again: stored once, windowed once.
        _, i = op
        log = sim.logs.get(PARTITIONS[i])
        if log:
            log.append(sim.rng.choice(log))
    elif kind == "tick":
        sim.now += op[1]
    elif kind == "consume":
        await sim.consume(op[1], op[2])
    elif kind == "snapshot":
        assert sim.monitor is not None
        await sim.monitor.snapshot_once()
    elif kind == "crash":
        # In-memory state is lost; what was fetched and not stored is read again.
        await sim.start(from_snapshot=op[1])
    elif kind == "stop":
        assert sim.monitor is not None
        await sim.monitor.snapshot_once(force=True)
        await sim.start(from_snapshot=True)


def _windows(
    store: WindowStore, now: float, quantiles_up_to: float = math.inf
) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """Every window of every series: counts exactly, means to 9 significant digits, the
    latency p95 of windows up to ``quantiles_up_to`` (a full rebuild restores the
    baseline from SQL aggregates, without latency histograms)."""
    out: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for level in ("model", "variant", "prompt"):
        for key in store.series(level):  # type: ignore[arg-type]
            for seconds in (*store.config.windows, 3.0, 45.0):
                s = store.stats(key.prompt, key.variant, key.model, window_seconds=seconds, now=now)
                counts = (s.request_count, s.success_count, s.feedback_count, s.quality_count)
                p95 = s.latency_p95 if seconds <= quantiles_up_to else None
                means = tuple(
                    None if v is None else float(f"{v:.9g}")
                    for v in (s.latency_mean, s.feedback_mean, s.quality_mean, p95)
                )
                out[(key, seconds)] = counts + means
    return out


#: Operation kinds and how often each is drawn.
MIXED: dict[str, int] = {
    "produce": 8,
    "resend": 1,
    "tick": 6,  # mostly short, so that late events stay inside the windows
    "outage": 1,  # a long tick: minutes of backlog
    "consume": 2,  # a few records of a few partitions
    "catch_up": 3,  # everything of one partition
    "drain": 3,  # everything of every partition (all idle afterwards)
    "snapshot": 1,
    "crash": 1,
    "stop": 1,
}
#: In time order, no long outage: at most 80 ticks of 3.5 s, far longer than the
#: lateness, yet nothing outlives the baseline (300 s, which would count it as late)
#: before it is read.
IN_ORDER = {**MIXED, "resend": 0, "outage": 0}


def _ops(
    rnd: random.Random, mix: dict[str, int], timings: tuple[str, ...], tick_s: float = 6.0
) -> list[Any]:
    """A run of 10 to 80 operations drawn with the weights of ``mix``."""
    # One entry per unit of weight, picked with randrange: Hypothesis' random shrinks
    # towards the first entries (``choices`` with weights is not honoured by it).
    kinds = [kind for kind, weight in mix.items() for _ in range(weight)]
    parts = range(len(PARTITIONS))
    ops: list[Any] = []
    for kind in (kinds[rnd.randrange(len(kinds))] for _ in range(rnd.randint(10, 80))):
        if kind == "produce":
            ops.append((kind, rnd.choice(parts), rnd.randint(1, 12), rnd.choice(timings)))
        elif kind == "resend":
            ops.append((kind, rnd.choice(parts)))
        elif kind in ("tick", "outage"):
            ops.append(("tick", rnd.uniform(0, tick_s if kind == "tick" else 120.0)))
        elif kind == "consume":
            ops.append((kind, rnd.sample(parts, rnd.randint(1, 3)), rnd.randint(1, 20)))
        elif kind == "catch_up":
            ops.append(("consume", [rnd.choice(parts)], 1000))
        elif kind == "drain":
            ops.append(("consume", list(parts), 1000))
        elif kind == "crash":
            ops.append((kind, rnd.random() < 0.5))
        else:
            ops.append((kind,))
    return ops


_PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@_PROPERTY
@given(rnd=st.randoms(use_true_random=False))
def test_live_windows_equal_the_rebuild_from_storage(rnd: random.Random) -> None:
    """Whatever the interleaving of partitions, the delays (within and beyond lateness),
    clocks running ahead, duplicates, snapshots, crashes and clean restarts, and whether
    the prompts' monitors count people's feedback (the default) or the signals of
    :data:`CHOSEN`: the live windows answer every query exactly like a full rebuild from
    storage (and like a restore from the last snapshot, see :func:`_run`)."""
    ops = _ops(rnd, MIXED, TIMINGS)
    seed = rnd.randrange(2**32)
    chosen = rnd.random() < 0.5
    note(f"seed={seed} chosen={chosen} ops={ops}")
    sim, live, rebuilt = asyncio.run(_run(seed, ops, CHOSEN if chosen else None))
    event(f"signals: {'chosen' if chosen else 'people'}")
    event(f"late events: {'some' if live.late_events else 'none'}")
    event(f"future events: {'some' if live.future_events else 'none'}")
    assert _windows(rebuilt, sim.now, HORIZON) == _windows(live, sim.now, HORIZON)


@_PROPERTY
@given(rnd=st.randoms(use_true_random=False))
def test_partitions_read_in_order_lose_nothing_whatever_the_outage(rnd: random.Random) -> None:
    """When each partition is in time order, no event is ever late: catch-up after any
    outage (ticks with nothing consumed), in any partition order, fills the windows with
    every event stored (the feedback each prompt counts)."""
    ops = _ops(rnd, IN_ORDER, ("in_order",), tick_s=3.5)
    seed = rnd.randrange(2**32)
    chosen = rnd.random() < 0.5
    note(f"seed={seed} chosen={chosen} ops={ops}")
    sim, live, _ = asyncio.run(_run(seed, ops, CHOSEN if chosen else None))
    assert live.late_events == 0
    everything = WindowStore(live.config)
    everything.admit(ADMIT_ALL)
    everything.add_batch(_all_events(sim))
    everything.expire(sim.now)
    assert _windows(everything, sim.now) == _windows(live, sim.now)


def _all_events(sim: Sim) -> list[Any]:
    """Every call produced, and the feedback its prompt's monitor counts."""
    seen: dict[str, Any] = {}
    for log in sim.logs.values():
        for raw in log:
            body = json.loads(raw)
            if body["type"] == "metric":
                seen[body["event_id"]] = MetricEvent.model_validate(body)
            elif sim.signals.counts(body["prompt"], body["source"]):
                seen[body["event_id"]] = FeedbackEvent.model_validate(body)
    return list(seen.values())


def test_admission_rule_table() -> None:
    """The rule in one table: clamped when a little ahead, rejected when far ahead or
    older than watermark - lateness, at its own time otherwise."""
    rule = Admission.of(100.0, 90.0, 5.0, 20.0)
    cases = {
        85.0: 85.0,
        84.999: None,
        99.0: 99.0,
        100.0: 100.0,
        110.0: 100.0,
        120.0: 100.0,
        120.001: None,
    }
    assert {ts: rule.time_of(ts) for ts in cases} == cases
    assert Admission.of(100.0, None, 5.0, 20.0).time_of(-1e12) == -1e12


def test_window_watermark_ignores_idle_partitions_and_holds_for_unread_ones() -> None:
    """The minimum runs over the batch's partitions and those with records left; a
    partition never read holds event time at "none"."""
    clock = PartitionClock()
    a, b, c = ("m", 0), ("m", 1), ("f", 0)
    clock.apply({a: 100.0, b: 50.0})
    assert clock.batch_time([a], [], {a: 120.0}, 130.0).watermark == 100.0
    assert clock.batch_time([a], [b], {a: 120.0}, 130.0).watermark == 50.0
    assert clock.batch_time([a], [c], {a: 120.0}, 130.0).watermark is None
    # A newest ts ahead of the storage time moves the partition only to that time.
    assert clock.batch_time([a], [], {a: 500.0}, 130.0).partition_watermarks == {a: 130.0}
    # An older batch never moves a partition back.
    assert clock.batch_time([a], [], {a: 10.0}, 130.0).partition_watermarks == {a: 100.0}


def call(n: int, ts: float) -> MetricEvent:
    """Call number ``n`` of prompt ``p``, stamped ``ts``."""
    return MetricEvent(
        event_id=f"c{n}",
        ts=ts,
        prompt="p",
        variant="v",
        model="m",
        request_id=f"r{n}",
        latency_ms=10.0,
        success=True,
    )


async def test_sql_aggregates_admit_what_the_replay_admits(store_target: Path | str) -> None:
    """History older than the replay horizon is rebuilt from SQL aggregates under the
    same rule as the raw replay: a call stamped a little ahead counts in the bucket of
    its storage time, one stamped too far ahead or too late does not count (on both
    storage backends)."""
    base = 1_700_000_010.0  # a multiple of the 30 s baseline buckets
    db = await Database.open(store_target)
    try:
        repo = EventRepository(db)

        # Stored at base+29.5: one 15 s ahead (counts at base+29.5), one 25 s ahead (no).
        await repo.store_batch(
            [call(1, base + 44.5), call(2, base + 54.5)], [], {}, clock=BatchTime(base + 29.5)
        )
        # Stored at base+40 under watermark base+40: base+30 is late, base+36 is not.
        await repo.store_batch(
            [call(3, base + 30), call(4, base + 36)], [], {}, clock=BatchTime(base + 40, base + 40)
        )
        now = base + 305  # the 5 min window starts at base+30: the clamped call is out
        counts = []
        for horizon in (0.0, 300.0):  # all from aggregates, all replayed
            store = WindowStore(_settings().window_config())
            await rebuild_windows(store, db, now, horizon)
            counts.append(store.stats("p", window_seconds=300, now=now).request_count)
            counts.append(store.stats("p", window_seconds=300, now=base + 250).request_count)
        assert counts == [1, 2, 1, 2]
    finally:
        await db.close()


async def test_retention_keeps_the_watermarks_of_the_batches_it_keeps(
    store_target: Path | str,
) -> None:
    """Purging old events also purges the watermarks of batches no kept row belongs to,
    and keeps every one a kept row needs (on both storage backends)."""
    db = await Database.open(store_target)
    try:
        repo = EventRepository(db)
        base = 1_700_000_000.0
        for n in range(4):
            at = base + 1000 * n
            await repo.store_batch([call(n, at - 1)], [], {}, clock=BatchTime(at, at - 10))
        await repo.purge_older_than(base + 1500)
        async with db.reader.execute("SELECT ingested_at FROM batch_watermarks") as cur:
            kept = sorted(row[0] for row in await cur.fetchall())
        async with db.reader.execute("SELECT DISTINCT ingested_at FROM metric_events") as cur:
            rows = sorted(row[0] for row in await cur.fetchall())
        assert kept == rows == [base + 2000, base + 3000]
    finally:
        await db.close()
