"""Ingestion throughput: end-to-end events/s beside the raw aiokafka consumption rate,
and the same for OpenTelemetry spans read from the OTLP topic.

    python bench/ingest.py [--events 200000] [--runs 3] [--partitions 3]
                           [--spans-per-record 100]
                           [--storage sqlite|postgresql] [--postgres-url URL]
    python bench/ingest.py --evaluation 0.01 [--outputs]

Each run produces N realistic MetricEvents (plus 10 % feedback) to fresh topics on a
Tansu broker on this machine, then measures (a) a bare aiokafka consumer reading them
(no decoding, no storage; the median of three reads, two before and one after (b))
and (b) the daemon, from partition assignment until every event is in SQLite. In the
same run, (c) the daemon stores the same number of calls sent as OTLP spans instead:
GenAI chat spans (10 % with an evaluation event, which is feedback) framed as the
Collector's Kafka exporter writes them (``otlp_proto``, one ExportTraceServiceRequest of
``--spans-per-record`` spans per record), from assignment until every call and feedback
event is in SQLite. Prints the median over runs of all three and of the ratio (b)/(a),
which factors out how busy the machine is; the CPU time per event (all threads of this
process); and the machine's noise: how far the raw rate moved between runs, and the
load average before and after each run.

With ``--storage postgresql`` each run also stores the events of (b) into PostgreSQL (a
throwaway cluster started with ``initdb``/``pg_ctl``, durability on as in production, or
the server at ``--postgres-url``; a fresh schema per run) and prints that rate beside the
SQLite path's and the raw one, with the ratio PostgreSQL / SQLite (target >= 0.5).

With ``--evaluation RATE`` each run stores the events twice instead, without and with an
evaluator on every prompt (a length check sampling RATE of the calls), and reports what
evaluation costs the ingest path: the CPU per event and the rate with evaluation against
without, both measured in the same run, alternating which goes first, and the batch
listener's CPU per event alone. The events capture no output by default, so the sampled
calls are counted (``no_output``) and nothing is evaluated: the figure is the sampling on
the hot path alone. ``--outputs`` gives every call a captured output, so the sampled calls
are also checked, stored and published as feedback (and ingested again, which the run
waits for).
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


def make_events(n: int, prompts: int = 50, outputs: bool = False) -> list[tuple[str, bytes, bytes]]:
    """(topic kind, key, value): 90 % metrics, 10 % feedback, like a busy app; with
    ``outputs`` every call captures a short output."""
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
            if outputs:
                body["output"] = f"answer {i}"
            out.append(("metric", prompt.encode(), json.dumps(body).encode()))
    return out


def make_span_records(n: int, per_record: int, prompts: int = 50) -> tuple[list[bytes], int]:
    """OTLP records of ``n`` GenAI chat spans, and how many events they hold (calls plus
    feedback from the evaluation events on every tenth span)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    def kv(key: str, value: str | int | float) -> KeyValue:
        if isinstance(value, str):
            return KeyValue(key=key, value=AnyValue(string_value=value))
        if isinstance(value, int):
            return KeyValue(key=key, value=AnyValue(int_value=value))
        return KeyValue(key=key, value=AnyValue(double_value=value))

    rng = random.Random(11)
    now_ns = time.time_ns()
    records, events = [], 0
    for first in range(0, n, per_record):
        request = ExportTraceServiceRequest()
        resource = request.resource_spans.add()
        resource.resource.attributes.append(kv("service.name", "support-bot"))
        scope = resource.scope_spans.add()
        scope.scope.name = "opentelemetry.instrumentation.openai_v2"
        for i in range(first, min(first + per_record, n)):
            span = scope.spans.add()
            span.trace_id, span.span_id = os.urandom(16), os.urandom(8)
            span.name, span.kind = "chat gpt-4o-mini", 3  # SPAN_KIND_CLIENT
            span.start_time_unix_nano = now_ns - int(rng.random() * 60e9)
            span.end_time_unix_nano = span.start_time_unix_nano + int(
                rng.lognormvariate(6, 0.5) * 1e6
            )
            span.attributes.extend(
                [
                    kv("gen_ai.operation.name", "chat"),
                    kv("gen_ai.provider.name", "openai"),
                    kv("gen_ai.request.model", "gpt-4o-mini"),
                    kv("gen_ai.response.model", "gpt-4o-mini-2024-07-18"),
                    kv("gen_ai.prompt.name", f"prompt-{i % prompts}"),
                    kv("promptd.variant", rng.choice(["v1", "v2"])),
                    kv("promptd.unit_id", f"user-{rng.randrange(10_000)}"),
                    kv("gen_ai.usage.input_tokens", rng.randrange(50, 2000)),
                    kv("gen_ai.usage.output_tokens", rng.randrange(10, 500)),
                    kv("gen_ai.response.finish_reasons", "stop"),
                ]
            )
            events += 1
            if i % 10 == 9:
                event = span.events.add()
                event.name = "gen_ai.evaluation.result"
                event.time_unix_nano = span.end_time_unix_nano
                event.attributes.extend(
                    [
                        kv("gen_ai.evaluation.name", "thumbs"),
                        kv("gen_ai.evaluation.score.value", rng.random()),
                    ]
                )
                events += 1
        records.append(request.SerializeToString())
    return records, events


async def produce_values(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1_048_576
    )
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(topic, value) for value in values])
    finally:
        await producer.stop()


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
    """Events/s stored by the daemon, from partition assignment to the ``n``-th event
    stored (the events produced, plus any evaluation results they lead to)."""
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


def evaluation_settings(rate: float) -> dict[str, Any]:
    """A cheap code check on every prompt, sampling ``rate`` of the calls."""
    check = {"name": "short", "type": "length", "max_chars": 200, "sample_rate": rate}
    return {"evaluators": [check], "queue_size": 100_000}


def expected_evaluations(events: list[tuple[str, bytes, bytes]], rate: float) -> int:
    """Results the check will publish: sampled calls with a captured output."""
    from promptd.evaluation.sampling import is_sampled

    count = 0
    for kind, _, value in events:
        if kind == "metric":
            body = json.loads(value)
            count += "output" in body and is_sampled("short", rate, body["request_id"])
    return count


def settings_for(
    bootstrap: str,
    data_dir: Path,
    tag: str,
    partitions: int,
    evaluation: float | None = None,
    url: str | None = None,
) -> Settings:
    extra = {"evaluation": evaluation_settings(evaluation)} if evaluation else {}
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
            "otlp_topic": f"bench-otlp-{tag}",
            "topic_partitions": partitions,
            "session_timeout_ms": 1000,
            "heartbeat_interval_ms": 300,
        },
        storage={"data_dir": data_dir / tag, "retention_interval_s": 86_400, "url": url},
        # Ingestion alone: bench/monitor.py measures the cost of windows and rules.
        monitoring={"enabled": False},
        http={"port": 0},
        **extra,
    )


async def one_run(
    broker: EmbeddedBroker,
    events: list[tuple[str, bytes, bytes]],
    spans: tuple[list[bytes], int],
    partitions: int,
    tmp: Path,
    postgres_url: str | None = None,
) -> tuple[Rate, Rate, Rate, Rate | None]:
    """SQLite end-to-end, raw, OTLP, and PostgreSQL end-to-end (``None`` without a URL)."""
    from promptd.daemon.kafka import ensure_topics

    tag = uuid.uuid4().hex[:8]
    settings = settings_for(broker.bootstrap_servers, tmp, tag, partitions)
    names = await _produce_topics(broker, settings, events)
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
    # The same number of calls as OTLP spans, on fresh topics and a fresh store.
    tag = uuid.uuid4().hex[:8]
    otlp_settings = settings_for(broker.bootstrap_servers, tmp, tag, partitions)
    await ensure_topics(otlp_settings.kafka, broker.bootstrap_servers)
    records, n_events = spans
    assert otlp_settings.kafka.otlp_topic is not None
    await produce_values(broker.bootstrap_servers, otlp_settings.kafka.otlp_topic, records)
    otlp = await daemon_ingest(otlp_settings, n_events)
    return e2e, raws[1], otlp, pg


async def _produce_topics(
    broker: EmbeddedBroker, settings: Settings, events: list[tuple[str, bytes, bytes]]
) -> list[str]:
    from promptd.daemon.kafka import ensure_topics

    await ensure_topics(settings.kafka, broker.bootstrap_servers)
    topics = {"metric": settings.kafka.metrics_topic, "feedback": settings.kafka.feedback_topic}
    await produce(broker.bootstrap_servers, topics, events)
    return list(topics.values())


async def evaluation_run(
    broker: EmbeddedBroker,
    events: list[tuple[str, bytes, bytes]],
    partitions: int,
    tmp: Path,
    rate: float,
    evaluation_first: bool,
) -> tuple[Rate, Rate]:
    """The same events stored without and with evaluation at ``rate``, one after the
    other (each on its own topics and database); returns (without, with)."""
    results: dict[bool, Rate] = {}
    for on in (evaluation_first, not evaluation_first):
        tag = uuid.uuid4().hex[:8]
        settings = settings_for(
            broker.bootstrap_servers, tmp, tag, partitions, rate if on else None
        )
        await _produce_topics(broker, settings, events)
        extra = expected_evaluations(events, rate) if on else 0
        results[on] = await daemon_ingest(settings, len(events) + extra)
    return results[False], results[True]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--spans-per-record", type=int, default=100)
    parser.add_argument(
        "--evaluation", type=float, metavar="RATE", help="measure sampling at this rate"
    )
    parser.add_argument("--outputs", action="store_true", help="calls capture an output")
    parser.add_argument("--storage", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres-url", help="an existing server (default: a throwaway one)")
    args = parser.parse_args()
    configure_logging("error", "json")
    if args.evaluation:
        evaluation_main(args)
        return
    events = make_events(args.events)
    calls = sum(1 for kind, _, _ in events if kind == "metric")
    spans = make_span_records(calls, args.spans_per_record)
    e2e_runs, raw_runs, otlp_runs, pg_runs = [], [], [], []
    load = [os.getloadavg()[0]]
    with (
        EmbeddedBroker() as broker,
        tempfile.TemporaryDirectory() as tmp,
        postgres(args.storage, args.postgres_url) as stores,
    ):
        for run in range(args.runs):
            url = next(stores) if stores is not None else None
            e2e, raw, otlp, pg = asyncio.run(
                one_run(broker, events, spans, args.partitions, Path(tmp), url)
            )
            e2e_runs.append(e2e)
            raw_runs.append(raw)
            otlp_runs.append(otlp)
            pg_runs.extend([pg] if pg is not None else [])
            load.append(os.getloadavg()[0])
            line = (
                f"run {run + 1}: end-to-end {e2e.per_s:,.0f} ev/s ({e2e.cpu_us:.1f} CPU us/ev), "
                f"raw consume {raw.per_s:,.0f} rec/s ({raw.cpu_us:.1f} CPU us/rec), "
                f"OTLP spans {otlp.per_s:,.0f} ev/s ({otlp.cpu_us:.1f} CPU us/ev)"
            )
            if pg is not None:
                line += f", PostgreSQL {pg.per_s:,.0f} ev/s ({pg.cpu_us:.1f} CPU us/ev)"
            print(line)
    e2e_rates, raw_rates = [r.per_s for r in e2e_runs], [r.per_s for r in raw_runs]
    ratios = [e / r for e, r in zip(e2e_rates, raw_rates, strict=True)]
    rows: list[tuple[str, list[float], str]] = [
        ("daemon end-to-end, SQLite (events/s)", e2e_rates, "{:>12,.0f}"),
        ("raw aiokafka consume (records/s)", raw_rates, "{:>12,.0f}"),
        ("ratio end-to-end / raw, target >= 0.30", ratios, "{:>12.3f}"),
        ("daemon CPU per event (us, all threads)", [r.cpu_us for r in e2e_runs], "{:>12.2f}"),
        ("raw consume CPU per record (us)", [r.cpu_us for r in raw_runs], "{:>12.2f}"),
        ("daemon on OTLP spans (events/s)", [r.per_s for r in otlp_runs], "{:>12,.0f}"),
        ("daemon CPU per OTLP event (us)", [r.cpu_us for r in otlp_runs], "{:>12.2f}"),
    ]
    if pg_runs:
        pg_rates = [r.per_s for r in pg_runs]
        pg_ratios = [p / e for p, e in zip(pg_rates, e2e_rates, strict=True)]
        rows[1:1] = [("daemon end-to-end, PostgreSQL (events/s)", pg_rates, "{:>12,.0f}")]
        rows.append(("ratio PostgreSQL / SQLite, target >= 0.5", pg_ratios, "{:>12.3f}"))
        pg_cpu = [r.cpu_us for r in pg_runs]
        rows.append(("PostgreSQL: daemon CPU per event (us)", pg_cpu, "{:>12.2f}"))
    print()
    print(f"{'measure':<44}{'median':>12}{'min':>12}{'max':>12}")
    for name, values, fmt in rows:
        row = "".join(fmt.format(v) for v in (statistics.median(values), min(values), max(values)))
        print(f"{name:<44}{row}")
    print(
        f"\n{args.events:,} events per run, {args.runs} runs, "
        f"{args.partitions} partitions per topic; OTLP: {calls:,} spans "
        f"({spans[1]:,} events) in {len(spans[0]):,} records of {args.spans_per_record} spans"
    )
    print(noise(raw_rates, load))


async def listener_cost(
    events: list[tuple[str, bytes, bytes]], rate: float, tmp: Path, repeats: int = 5
) -> float:
    """CPU microseconds per event of the evaluation engine's batch listener alone, on the
    events as ingestion hands them over (batches of 5,000 decoded rows); best of
    ``repeats`` passes (the least disturbed by other load)."""
    from promptd.daemon.decode import RowDecoder
    from promptd.evaluation.component import build_engine
    from promptd.storage.database import Database
    from promptd.storage.repository import BatchOutcome

    settings = settings_for("127.0.0.1:9", tmp, "listener", 1, rate)
    daemon = Daemon(settings, registry=CollectorRegistry())
    daemon.db = await Database.open(tmp / "listener.db")
    try:
        engine = build_engine(daemon, settings.evaluation)
        await engine.start()
        decoder = RowDecoder()
        outcomes = []
        for start in range(0, len(events), 5000):
            metrics: list[Any] = []
            feedback: list[Any] = []
            for _, _, value in events[start : start + 5000]:
                decoder.decode_into(value, metrics, feedback)
            last = start + len(metrics)
            outcomes.append(
                BatchOutcome(len(metrics), len(feedback), 0, tuple(metrics), tuple(feedback), last)
            )
        best = float("inf")
        for _ in range(repeats):
            engine.cursor = type(engine.cursor)(0)
            while not engine.queue.empty():
                engine.queue.get_nowait()
            cpu = time.process_time()
            for outcome in outcomes:
                await engine.on_batch(outcome)
            best = min(best, time.process_time() - cpu)
        return best / len(events) * 1e6
    finally:
        await daemon.db.close()


def evaluation_main(args: argparse.Namespace) -> None:
    """``--evaluation``: ingestion with and without sampling, in the same run."""
    events = make_events(args.events, outputs=args.outputs)
    pairs: list[tuple[Rate, Rate]] = []
    load = [os.getloadavg()[0]]
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            off, on = asyncio.run(
                evaluation_run(
                    broker, events, args.partitions, Path(tmp), args.evaluation, run % 2 == 0
                )
            )
            pairs.append((off, on))
            load.append(os.getloadavg()[0])
            print(
                f"run {run + 1}: without {off.per_s:,.0f} ev/s ({off.cpu_us:.2f} CPU us/ev), "
                f"with evaluation {on.per_s:,.0f} ev/s ({on.cpu_us:.2f} CPU us/ev)"
            )
        listener = asyncio.run(listener_cost(events, args.evaluation, Path(tmp)))
    cpu = [on.cpu_us / off.cpu_us - 1 for off, on in pairs]
    rate = [1 - on.per_s / off.per_s for off, on in pairs]
    print()
    print(f"{'measure':<52}{'median':>10}{'min':>10}{'max':>10}")
    for name, values in (
        ("CPU per event, with evaluation vs without (+%)", cpu),
        ("events/s lost with evaluation (%)", rate),
    ):
        cells = "".join(
            f"{v * 100:>10.1f}" for v in (statistics.median(values), min(values), max(values))
        )
        print(f"{name:<52}{cells}")
    base = statistics.median(off.cpu_us for off, _ in pairs)
    print(
        f"{'the listener alone, CPU us per event (best of 5)':<52}{listener:>10.3f}"
        f"\n{'  ... as a share of CPU per event without (%)':<52}{listener / base * 100:>10.1f}"
    )
    captured = (
        "with a captured output (checked, stored, published)"
        if args.outputs
        else ("without captured outputs (sampling only)")
    )
    print(
        f"\n{args.events:,} events per run and configuration, {args.runs} runs, sample rate "
        f"{args.evaluation:g}, calls {captured}; target: CPU per event +5 % at most"
    )
    loads = ", ".join(f"{x:.2f}" for x in load)
    print(f"1-minute load average before and after each run (2 cores): {loads}")


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
