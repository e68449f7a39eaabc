"""Ingestion throughput: end-to-end events/s beside the raw aiokafka consumption rate.

    python bench/ingest.py [--events 200000] [--runs 3] [--partitions 3]
                           [--storage sqlite|postgresql] [--postgres-url URL]

Each run produces N realistic MetricEvents (plus 10 % feedback) to fresh topics on a
Tansu broker on this machine, then measures (a) a bare aiokafka consumer reading them
(no decoding, no storage; the median of three reads, two before and one after (b))
and (b) the daemon, from partition assignment until every event is in SQLite. Prints
the median over runs of both and of their ratio (b)/(a), which factors out how busy the
machine is; the CPU time per event of both (all threads of this process); and the
machine's noise: how far the raw rate moved between runs, and the load average before
and after each run.

With ``--storage postgresql`` each run also ingests the same events into PostgreSQL (a
throwaway cluster started with ``initdb``/``pg_ctl``, durability on as in production, or
the server at ``--postgres-url``; a fresh schema per run) and prints that rate beside the
SQLite path's and the raw one, with the ratio PostgreSQL / SQLite (target >= 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry

from promptd.daemon.app import Daemon
from promptd.daemon.broker import EmbeddedBroker
from promptd.daemon.logs import configure_logging
from promptd.daemon.settings import Settings
from promptd.daemon.wiring import install_components
from promptd.events import new_event_id


def make_events(n: int, prompts: int = 50) -> list[tuple[str, bytes, bytes]]:
    """(topic kind, key, value): 90 % metrics, 10 % feedback, like a busy app."""
    rng = random.Random(7)
    now = time.time()
    out: list[tuple[str, bytes, bytes]] = []
    for i in range(n):
        prompt = f"prompt-{i % prompts}"
        request_id = uuid.uuid4().hex
        if i % 10 == 9:
            body: dict[str, Any] = {
                "event_id": new_event_id(),
                "type": "feedback",
                "ts": now - rng.random() * 60,
                "prompt": prompt,
                "variant": "v1",
                "request_id": request_id,
                "score": rng.random(),
                "kind": "thumbs",
            }
            out.append(("feedback", prompt.encode(), json.dumps(body).encode()))
        else:
            body = {
                "event_id": new_event_id(),
                "type": "metric",
                "ts": now - rng.random() * 60,
                "prompt": prompt,
                "variant": rng.choice(["v1", "v2"]),
                "model": "gpt-4o-mini",
                "request_id": request_id,
                "unit_id": f"user-{rng.randrange(10_000)}",
                "latency_ms": rng.lognormvariate(6, 0.5),
                "success": rng.random() > 0.02,
                "quality": rng.random(),
                "tokens_in": rng.randrange(50, 2000),
                "tokens_out": rng.randrange(10, 500),
                "cost_usd": rng.random() / 100,
            }
            out.append(("metric", prompt.encode(), json.dumps(body).encode()))
    return out


async def produce(
    bootstrap: str, topics: dict[str, str], events: list[tuple[str, bytes, bytes]]
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1_048_576
    )
    await producer.start()
    try:
        pending = []
        for kind, key, value in events:
            pending.append(await producer.send(topics[kind], value, key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


class Rate(NamedTuple):
    """A throughput, and the CPU time this process spent per item meanwhile (all threads;
    less sensitive to other load on the machine than the rate)."""

    per_s: float
    cpu_us: float


async def raw_consume(bootstrap: str, topics: list[str], n: int) -> Rate:
    """Records/s of a bare consumer (no group), from first fetch to the last record."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        seen = 0
        start = cpu = None
        while seen < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            if start is None and batch:
                start, cpu = time.perf_counter(), time.process_time()
            seen += sum(len(v) for v in batch.values())
        assert start is not None
        assert cpu is not None
        return Rate(n / (time.perf_counter() - start), (time.process_time() - cpu) / n * 1e6)
    finally:
        await consumer.stop()


async def daemon_ingest(settings: Settings, n: int, configure: Any = None) -> Rate:
    """Events/s stored by the daemon, from partition assignment to the last event stored."""
    registry = CollectorRegistry()
    daemon = Daemon(settings, registry=registry)
    install_components(daemon)
    if configure is not None:
        configure(daemon)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        while not (daemon.ingestor and daemon.ingestor.state.assigned):
            if task.done():
                await task
            await asyncio.sleep(0.001)
        start, cpu = time.perf_counter(), time.process_time()
        while True:
            stored = sum(
                registry.get_sample_value("promptd_events_stored_total", {"type": t}) or 0
                for t in ("metric", "feedback")
            )
            if stored >= n:
                elapsed = time.perf_counter() - start
                return Rate(n / elapsed, (time.process_time() - cpu) / n * 1e6)
            await asyncio.sleep(0.002)
    finally:
        stop.set()
        await task


def settings_for(
    bootstrap: str, data_dir: Path, tag: str, partitions: int, url: str | None = None
) -> Settings:
    return Settings(
        kafka={
            "bootstrap_servers": bootstrap,
            "group_id": f"bench-{tag}",
            "metrics_topic": f"bench-m-{tag}",
            "feedback_topic": f"bench-f-{tag}",
            "dlq_topic": f"bench-dlq-{tag}",
            "alerts_topic": f"bench-alerts-{tag}",
            "routing_topic": f"bench-routing-{tag}",
            "optimization_topic": f"bench-opt-{tag}",
            "topic_partitions": partitions,
            "session_timeout_ms": 1000,
            "heartbeat_interval_ms": 300,
        },
        storage={"data_dir": data_dir / tag, "retention_interval_s": 86_400, "url": url},
        # Ingestion alone: bench/monitor.py measures the cost of windows and rules.
        monitoring={"enabled": False},
        http={"port": 0},
    )


async def one_run(
    broker: EmbeddedBroker,
    events: list[tuple[str, bytes, bytes]],
    partitions: int,
    tmp: Path,
    postgres_url: str | None = None,
) -> tuple[Rate, Rate, Rate | None]:
    """(SQLite end-to-end, raw, PostgreSQL end-to-end or None), on the same topics."""
    from promptd.daemon.kafka import ensure_topics

    tag = uuid.uuid4().hex[:8]
    settings = settings_for(broker.bootstrap_servers, tmp, tag, partitions)
    await ensure_topics(settings.kafka, broker.bootstrap_servers)
    topics = {"metric": settings.kafka.metrics_topic, "feedback": settings.kafka.feedback_topic}
    await produce(broker.bootstrap_servers, topics, events)
    names = list(topics.values())
    # The reference is short (under a second) and so the noisiest figure: read the topics
    # twice before the daemon and once after it, and take the median.
    raws = [await raw_consume(broker.bootstrap_servers, names, len(events)) for _ in range(2)]
    e2e = await daemon_ingest(settings, len(events))
    pg = None
    if postgres_url is not None:
        # The same topics from the start: a group of its own, a store of its own.
        data = settings.model_dump()
        data["kafka"]["group_id"] = f"bench-pg-{tag}"
        data["storage"]["url"] = postgres_url
        data["storage"]["data_dir"] = tmp / f"pg-{tag}"
        pg = await daemon_ingest(Settings(**data), len(events))
    raws.append(await raw_consume(broker.bootstrap_servers, names, len(events)))
    raws.sort()
    return e2e, raws[1], pg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--storage", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres-url", help="an existing server (default: a throwaway one)")
    args = parser.parse_args()
    configure_logging("error", "json")
    events = make_events(args.events)
    runs: list[tuple[Rate, Rate, Rate | None]] = []
    load = [os.getloadavg()[0]]
    with (
        EmbeddedBroker() as broker,
        tempfile.TemporaryDirectory() as tmp,
        postgres(args.storage, args.postgres_url) as stores,
    ):
        for run in range(args.runs):
            url = next(stores) if stores is not None else None
            e2e, raw, pg = asyncio.run(one_run(broker, events, args.partitions, Path(tmp), url))
            runs.append((e2e, raw, pg))
            load.append(os.getloadavg()[0])
            line = (
                f"run {run + 1}: end-to-end {e2e.per_s:,.0f} ev/s ({e2e.cpu_us:.1f} CPU us/ev), "
                f"raw consume {raw.per_s:,.0f} rec/s ({raw.cpu_us:.1f} CPU us/rec)"
            )
            if pg is not None:
                line += f", PostgreSQL {pg.per_s:,.0f} ev/s ({pg.cpu_us:.1f} CPU us/ev)"
            print(line)
    report(runs)
    print(
        f"\n{args.events:,} events per run, {args.runs} runs, "
        f"{args.partitions} partitions per topic"
    )
    print(noise([raw.per_s for _, raw, _ in runs], load))


def report(runs: list[tuple[Rate, Rate, Rate | None]]) -> None:
    """The table of medians, minima and maxima over the runs."""
    e2e_runs, raw_runs = [r[0] for r in runs], [r[1] for r in runs]
    e2e_rates, raw_rates = [r.per_s for r in e2e_runs], [r.per_s for r in raw_runs]
    ratios = [e / r for e, r in zip(e2e_rates, raw_rates, strict=True)]
    rows: list[tuple[str, list[float], str]] = [
        ("daemon end-to-end, SQLite (events/s)", e2e_rates, "{:>12,.0f}"),
        ("raw aiokafka consume (records/s)", raw_rates, "{:>12,.0f}"),
        ("ratio end-to-end / raw, target >= 0.30", ratios, "{:>12.3f}"),
        ("daemon CPU per event (us, all threads)", [r.cpu_us for r in e2e_runs], "{:>12.2f}"),
        ("raw consume CPU per record (us)", [r.cpu_us for r in raw_runs], "{:>12.2f}"),
    ]
    pg_runs = [r[2] for r in runs if r[2] is not None]
    if pg_runs:
        pg_rates = [r.per_s for r in pg_runs]
        rows[1:1] = [("daemon end-to-end, PostgreSQL (events/s)", pg_rates, "{:>12,.0f}")]
        rows.append(
            (
                "ratio PostgreSQL / SQLite, target >= 0.5",
                [p / e for p, e in zip(pg_rates, e2e_rates, strict=True)],
                "{:>12.3f}",
            )
        )
        rows.append(
            (
                "PostgreSQL CPU per event (us, this process)",
                [r.cpu_us for r in pg_runs],
                "{:>12.2f}",
            )
        )
    print()
    print(f"{'measure':<44}{'median':>12}{'min':>12}{'max':>12}")
    for name, values, fmt in rows:
        row = "".join(fmt.format(v) for v in (statistics.median(values), min(values), max(values)))
        print(f"{name:<44}{row}")


@contextlib.contextmanager
def postgres(storage: str, url: str | None) -> Iterator[Iterator[str] | None]:
    """Fresh PostgreSQL stores, one per run (``None`` for SQLite alone): schemas on the
    server at ``url``, or on a throwaway cluster (tests/pg_cluster.py) with production
    durability (fsync and synchronous commit on)."""
    if storage != "postgresql":
        yield None
        return
    if url is not None:
        yield (f"{url}{'&' if '?' in url else '?'}search_path={schema}" for schema in _schemas(url))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.pg_cluster import PostgresCluster, find_binaries

    binaries = find_binaries()
    if binaries is None:
        raise SystemExit("--storage postgresql: no PostgreSQL binaries (initdb, pg_ctl) found")
    cluster = PostgresCluster(binaries, durable=True).start()
    try:
        yield iter(cluster.create_store, None)
    finally:
        cluster.stop()


def _schemas(url: str) -> Iterator[str]:
    while True:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        asyncio.run(_create_schema(url, name))
        yield name


async def _create_schema(url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
    finally:
        await conn.close()


def noise(reference: list[float], load: list[float]) -> str:
    """How noisy the machine was: the spread of a reference rate and the load average."""
    med = statistics.median(reference)
    spread = (max(reference) - min(reference)) / med if med else 0.0
    loads = ", ".join(f"{x:.2f}" for x in load)
    return (
        f"machine noise: the raw rate spread over {spread:.0%} of its median; 1-minute load "
        f"average before and after each run (2 cores): {loads}"
    )


if __name__ == "__main__":
    main()
