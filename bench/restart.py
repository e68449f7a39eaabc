"""Restart time: from start to ready with 1M events in the last hour, with and without a
snapshot of the monitor's windows.

    python bench/restart.py [--events 1000000] [--runs 3] [--tail-seconds 60]
                            [--storage sqlite|postgresql] [--postgres-url URL]

Builds one SQLite store holding ``--events`` events spread over the last hour (90 %
metrics, 10 % feedback, 50 prompts x 2 variants; half of the traffic on ``prompt-0``,
whose candidate ``v2`` is in a live rollout that started an hour ago), the snapshots of
the windows and of the rollout taken as a running daemon takes them, and the events of the
``--tail-seconds`` after those snapshots (what a crash leaves to replay with the default
60 s snapshot interval). Each run then starts a real daemon (embedded broker, monitoring
with its default rule, the rollout controller) on a fresh copy of that store twice,
interleaved:

* **replay** (``snapshot_interval_s = 0``): the windows are rebuilt from every stored event
  of the last hour and the rollout from every event since it started, as every start did
  before snapshots;
* **snapshot**: both are loaded from their snapshots and only the tail is replayed.

It times ``Daemon.run`` from its call to ``started`` (storage open, components built) and to
ready (``/readyz`` would answer 200: partitions assigned, Kafka reachable). Prints the
medians, each run's ratio snapshot / replay, and the load average.

With ``--storage postgresql`` the store is built once in PostgreSQL (a throwaway durable
cluster, or a schema on ``--postgres-url``) and every start opens it there: the daemon
takes the free lease, rebuilds from that store and releases the lease at its stop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).parent))
import ingest

from promptd.daemon.app import Daemon
from promptd.daemon.broker import EmbeddedBroker
from promptd.daemon.kafka import ensure_topics
from promptd.daemon.logs import configure_logging
from promptd.daemon.rollout_profiles import profile_lookup
from promptd.daemon.settings import RolloutSettings, Settings
from promptd.daemon.wiring import install_components
from promptd.monitoring.monitor import rebuild_windows
from promptd.monitoring.snapshot import take
from promptd.monitoring.windows import WindowStore
from promptd.replacement.controller import RolloutController
from promptd.replacement.metrics import RolloutMetrics
from promptd.replacement.registry import NewVersion, Registry
from promptd.storage.database import Database
from promptd.storage.repository import EventRepository
from promptd.storage.rows import FeedbackView, MetricView
from promptd.storage.snapshots import SnapshotStore, last_ids

BATCH = 5_000
ROLLOUT_PROMPT = "prompt-0"


def rows(n: int, start: float, span: float, seed: int) -> list[MetricView | FeedbackView]:
    """``n`` events evenly over ``[start, start + span)``."""
    rng = random.Random(seed)
    out: list[MetricView | FeedbackView] = []
    for i in range(n):
        ts = start + span * i / n
        prompt = ROLLOUT_PROMPT if i % 2 == 0 else f"prompt-{1 + i % 49}"
        variant = f"v{1 + (i // 2) % 2}"
        eid = f"{seed}-{i}"
        if i % 10 == 9:
            out.append(
                FeedbackView(
                    eid, ts, prompt, variant, None, eid, rng.random(), "q", None, None, None
                )
            )
            continue
        out.append(
            MetricView(
                eid,
                ts,
                prompt,
                variant,
                "gpt-4o-mini",
                eid,
                f"user-{rng.randrange(10_000)}",
                rng.lognormvariate(6, 0.5),
                rng.random() > 0.02,
                None,
                rng.random(),
                rng.randrange(50, 2000),
                rng.randrange(10, 500),
                rng.random() / 100,
                None,
                None,
                None,
                None,
                None,
            )
        )
    return out


async def store(db: Database, events: list[MetricView | FeedbackView]) -> None:
    repo = EventRepository(db)
    for i in range(0, len(events), BATCH):
        part = events[i : i + BATCH]
        await repo.store_batch(
            [e for e in part if isinstance(e, MetricView)],
            [e for e in part if isinstance(e, FeedbackView)],
            {},
        )


def controller(db: Database) -> RolloutController:
    registry = Registry(db, "balanced")
    profiles = profile_lookup(RolloutSettings())
    metrics = RolloutMetrics(CollectorRegistry())
    return RolloutController(db, registry, profiles, metrics, snapshot_interval_s=60.0)


async def start_rollout(db: Database, since: float) -> None:
    """A live rollout of ``v2`` on :data:`ROLLOUT_PROMPT` whose first step began at ``since``."""
    rollouts = controller(db)
    for template in ("Summarize {text}.", "Summarize {text} in one line."):
        await rollouts.registry.register(ROLLOUT_PROMPT, NewVersion(template=template))
    row = await rollouts.start_rollout(ROLLOUT_PROMPT, "v2", profile="conservative")
    async with db.transaction() as conn:
        await conn.execute(
            "UPDATE rollouts SET step_starts = ? WHERE id = ?", (json.dumps([since]), row.id)
        )


async def build(path: Path | str, n: int, tail_s: float) -> dict[str, float]:
    """The store: events of the last hour up to ``tail_s`` ago, the snapshots a daemon
    would have saved then, and the events of the last ``tail_s`` seconds."""
    db = await Database.open(path)
    now = time.time()
    tail_n = int(n * tail_s / 3600)
    started = time.perf_counter()
    await start_rollout(db, now - 3600)
    await store(db, rows(n - tail_n, now - 3600, 3600 - tail_s, seed=1))
    rollouts = controller(db)
    await rollouts.resume()
    assert await rollouts.snapshot_once() == 1
    windows = WindowStore()
    await rebuild_windows(windows, db, now - tail_s, horizon_s=3600)
    snap = take(windows, await last_ids(db), now - tail_s)
    await SnapshotStore(db).save(snap)
    await store(db, rows(tail_n, now - tail_s, tail_s, seed=2))
    await db.close()
    return {
        "build_s": time.perf_counter() - started,
        "snapshot_mb": len(snap.data) / 1e6,
        "tail_events": tail_n,
    }


def settings_for(
    bootstrap: str, data_dir: Path, snapshots: bool, url: str | None = None
) -> Settings:
    tag = uuid.uuid4().hex[:8]
    base = ingest.settings_for(bootstrap, data_dir.parent, data_dir.name, 3, url=url)
    data = base.model_dump()
    data["kafka"]["group_id"] = f"restart-{tag}"
    data["monitoring"] = {"snapshot_interval_s": 60.0 if snapshots else 0.0}
    data["rollout"] = {"snapshot_interval_s": 60.0 if snapshots else 0.0}
    return Settings(**data)


async def start(settings: Settings) -> tuple[float, float]:
    """Seconds from ``Daemon.run`` to started and to ready; then a clean stop."""
    daemon = Daemon(settings, registry=CollectorRegistry())
    install_components(daemon)
    stop = asyncio.Event()
    t0 = time.perf_counter()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.started.wait(), 120)
        started = time.perf_counter() - t0
        while not (daemon.readiness()[0] and daemon.ingestor and daemon.ingestor.state.assigned):
            if task.done():
                await task
            await asyncio.sleep(0.005)
        return started, time.perf_counter() - t0
    finally:
        stop.set()
        await task


async def one_run(
    broker: EmbeddedBroker, base: Path | str, tmp: Path, mode: str
) -> tuple[float, float]:
    data_dir = tmp / f"{mode}-{uuid.uuid4().hex[:6]}"
    data_dir.mkdir()
    url = base if isinstance(base, str) else None
    settings = settings_for(broker.bootstrap_servers, data_dir, mode == "snapshot", url)
    if isinstance(base, Path):  # a fresh copy of the SQLite store
        shutil.copy(base, settings.storage.database_path)
    await ensure_topics(settings.kafka, broker.bootstrap_servers)
    try:
        return await start(settings)
    finally:
        shutil.rmtree(data_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tail-seconds", type=float, default=60.0)
    parser.add_argument("--storage", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres-url", help="an existing server (default: a throwaway one)")
    args = parser.parse_args()
    configure_logging("error", "json")
    load = [os.getloadavg()]
    results: dict[str, list[tuple[float, float]]] = {"replay": [], "snapshot": []}
    with (
        EmbeddedBroker() as broker,
        tempfile.TemporaryDirectory() as tmp_name,
        ingest.postgres(args.storage, args.postgres_url) as stores,
    ):
        tmp = Path(tmp_name)
        base: Path | str = next(stores) if stores is not None else tmp / "base.db"
        info = asyncio.run(build(base, args.events, args.tail_seconds))
        print(f"storage: {args.storage}")
        print(
            f"store: {args.events:,} events in the last hour, "
            f"snapshot {info['snapshot_mb']:.1f} MB, tail {info['tail_events']:,.0f} events "
            f"(built in {info['build_s']:.0f} s)"
        )
        for run in range(args.runs):
            for mode in ("replay", "snapshot") if run % 2 == 0 else ("snapshot", "replay"):
                started, ready = asyncio.run(one_run(broker, base, tmp, mode))
                results[mode].append((started, ready))
                print(f"run {run + 1} {mode:>8}: started {started:6.2f} s, ready {ready:6.2f} s")
            load.append(os.getloadavg())
    report(results, load)


def report(
    results: dict[str, list[tuple[float, float]]], load: list[tuple[float, float, float]]
) -> None:
    print()
    print(f"{'measure':<44}{'median':>9}{'min':>9}{'max':>9}")
    for mode in ("replay", "snapshot"):
        for i, what in enumerate(("started", "ready")):
            values = [r[i] for r in results[mode]]
            print(
                f"{mode + ': start to ' + what + ' (s)':<44}"
                f"{statistics.median(values):>9.2f}{min(values):>9.2f}{max(values):>9.2f}"
            )
    for i, what in enumerate(("started", "ready")):
        ratios = [s[i] / r[i] for s, r in zip(results["snapshot"], results["replay"], strict=True)]
        print(
            f"{'ratio snapshot / replay, ' + what:<44}"
            f"{statistics.median(ratios):>9.3f}{min(ratios):>9.3f}{max(ratios):>9.3f}"
        )
    loads = ", ".join(f"{one:.2f}" for one, _, _ in load)
    print(f"\n1-minute load average before and after each run (2 cores): {loads}")


if __name__ == "__main__":
    main()
