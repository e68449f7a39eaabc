"""Monitoring benchmark: throughput cost of the monitor, detection latency, memory.

    python bench/monitor.py [--events 200000] [--runs 3] [--trials 40] [--memory-events 10000000]

1. **Throughput**: end-to-end events/s of the daemon (Kafka -> SQLite) with monitoring off
   and with windows + 20 alert rules on, runs interleaved in the same process on the same
   broker, same events (reuses ``bench/ingest.py``).
2. **Detection latency**: a running daemon with a ``for: 0`` rule; each trial publishes one
   event that makes the rule true for a fresh prompt and times until the alert record is read
   from the alerts topic (evaluation interval 0.25 s).
3. **Memory**: resident memory while 10 million events over 1,000 prompt/variant series are
   fed *in-process* straight into a ``WindowStore`` (no Kafka, no SQLite: those would take
   hours on this machine, and memory of the windows is what is measured), event times
   spread over 72 simulated hours, so the 24 h baseline is full after a third of the events
   and then turns over: RSS at the later checkpoints shows whether memory stays flat.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).parent))
import ingest

from promptd.daemon.broker import EmbeddedBroker
from promptd.daemon.kafka import ensure_topics
from promptd.daemon.logs import configure_logging
from promptd.daemon.settings import Settings
from promptd.events import new_event_id
from promptd.monitoring.windows import WindowStore


def twenty_rules() -> list[dict[str, Any]]:
    """20 realistic rules over several metrics, windows and levels (none fires on the
    benchmark's traffic, so the cost measured is evaluation, not notification)."""
    rules: list[dict[str, Any]] = []
    specs = [
        ("latency_p95", "greater_than", 60_000),
        ("latency_p99", "greater_than", 120_000),
        ("latency_mean", "greater_than", 60_000),
        ("success_rate", "less_than", 0.5),
        ("error_rate", "greater_than", 0.5),
        ("feedback_mean", "less_than", 0.01),
        ("cost_per_request", "greater_than", 10.0),
        ("quality_mean", "less_than", 0.01),
    ]
    for i in range(20):
        metric, comparison, threshold = specs[i % len(specs)]
        rules.append(
            {
                "name": f"rule_{i:02d}",
                "metric": metric,
                "comparison": comparison,
                "threshold": threshold,
                "window": ("1m", "5m", "1h")[i % 3],
                "min_samples": 10,
                "for": "1m",
                "group_by": ("prompt", "variant")[i % 2],
            }
        )
    return rules


def with_monitoring(settings: Settings, **monitoring: Any) -> Settings:
    """A copy of ``settings`` with a ``[monitoring]`` section."""
    data = settings.model_dump()
    data["monitoring"] = monitoring
    return Settings(**data)


async def throughput_run(
    broker: EmbeddedBroker, events: list[tuple[str, bytes, bytes]], tmp: Path
) -> dict[str, float]:
    """One round: the same events ingested without and with the monitor."""
    out = {}
    for mode in ("off", "on"):
        tag = uuid.uuid4().hex[:8]
        base = ingest.settings_for(broker.bootstrap_servers, tmp, tag, 3)
        if mode == "off":
            settings = with_monitoring(base, enabled=False)
        else:
            settings = with_monitoring(base, rules=twenty_rules(), evaluation_interval_s=1.0)
        await ensure_topics(settings.kafka, broker.bootstrap_servers)
        topics = {"metric": settings.kafka.metrics_topic, "feedback": settings.kafka.feedback_topic}
        await ingest.produce(broker.bootstrap_servers, topics, events)
        out[mode] = (await ingest.daemon_ingest(settings, len(events))).per_s
    return out


async def detection(broker: EmbeddedBroker, tmp: Path, trials: int) -> list[float]:
    """Seconds from publishing the triggering event to reading its alert from Kafka."""
    from promptd.daemon.app import Daemon
    from promptd.daemon.wiring import install_components

    tag = uuid.uuid4().hex[:8]
    rule = {
        "name": "latency_detect",
        "metric": "latency_p95",
        "comparison": "greater_than",
        "threshold": 1000,
        "window": "1m",
        "min_samples": 1,
        "for": 0,
    }
    settings = with_monitoring(
        ingest.settings_for(broker.bootstrap_servers, tmp, tag, 1),
        rules=[rule],
        evaluation_interval_s=0.25,
        default_degradation_rule=False,
    )
    daemon = Daemon(settings)
    install_components(daemon)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
    consumer = AIOKafkaConsumer(
        settings.kafka.alerts_topic,
        bootstrap_servers=broker.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    latencies: list[float] = []
    try:
        while not (daemon.ingestor and daemon.ingestor.state.assigned):
            if task.done():
                await task
            await asyncio.sleep(0.01)
        await producer.start()
        await consumer.start()
        for trial in range(trials):
            prompt = f"detect-{trial}"
            body = {
                "event_id": new_event_id(),
                "type": "metric",
                "ts": time.time(),
                "prompt": prompt,
                "variant": "v1",
                "model": "m",
                "request_id": uuid.uuid4().hex,
                "latency_ms": 5000.0,
                "success": True,
            }
            start = time.perf_counter()
            await producer.send_and_wait(
                settings.kafka.metrics_topic, json.dumps(body).encode(), key=prompt.encode()
            )
            found = False
            while not found:
                batch = await consumer.getmany(timeout_ms=50)
                for records in batch.values():
                    for record in records:
                        alert = json.loads(record.value)
                        if alert["labels"].get("prompt") == prompt:
                            found = True
                if time.perf_counter() - start > 10:
                    raise RuntimeError(f"no alert for {prompt} within 10 s")
            latencies.append(time.perf_counter() - start)
            # Trials start at random phases of the evaluation interval.
            await asyncio.sleep(random.uniform(0.05, 0.3))
    finally:
        await consumer.stop()
        await producer.stop()
        stop.set()
        await task
    return latencies


def rss_mb() -> float:
    """Resident set size of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory(
    total: int, series: int = 1000, checkpoints: int = 10, span_hours: float = 72.0
) -> list[tuple[int, float, int]]:
    """(events fed, RSS MB, live buckets) at checkpoints while feeding ``total`` events."""
    store = WindowStore()
    rng = random.Random(3)
    span = span_hours * 3600.0
    t0 = 1_800_000_000.0
    step = span / total
    keys = [(f"prompt-{i // 2}", f"v{i % 2}") for i in range(series)]
    lat = [rng.lognormvariate(6, 0.5) for _ in range(4096)]
    out = []
    every = total // checkpoints
    record, record_fb = store.record_metric, store.record_feedback
    next_expire = t0
    for i in range(total):
        ts = t0 + i * step
        prompt, variant = keys[i % series]
        if i % 10 == 9:
            record_fb(ts, prompt, variant, 0.7)
        else:
            record(ts, prompt, variant, "m", lat[i & 4095], i % 50 != 0, 0.8, 100, 50, 0.001)
        if ts >= next_expire:
            store.expire(ts)  # what the evaluation tick does in the daemon
            next_expire = ts + 5.0
        if (i + 1) % every == 0:
            gc.collect()
            out.append((i + 1, rss_mb(), store.bucket_count()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--memory-events", type=int, default=10_000_000)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["throughput", "latency", "memory"]
    )
    args = parser.parse_args()
    configure_logging("error", "json")
    rows: list[tuple[str, str, str]] = []
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        if "throughput" not in args.skip:
            events = ingest.make_events(args.events)
            off, on = [], []
            load = [os.getloadavg()[0]]
            for run in range(args.runs):
                result = asyncio.run(throughput_run(broker, events, Path(tmp)))
                off.append(result["off"])
                on.append(result["on"])
                load.append(os.getloadavg()[0])
                print(
                    f"run {run + 1}: monitor off {result['off']:,.0f} ev/s, "
                    f"on {result['on']:,.0f} ev/s"
                )
            ratios = [b / a for a, b in zip(off, on, strict=True)]
            rows.append(
                (
                    "ingestion only (events/s)",
                    f"{statistics.median(off):,.0f}",
                    f"{min(off):,.0f}-{max(off):,.0f}",
                )
            )
            rows.append(
                (
                    "with windows + 20 rules (events/s)",
                    f"{statistics.median(on):,.0f}",
                    f"{min(on):,.0f}-{max(on):,.0f}",
                )
            )
            rows.append(
                (
                    "slowdown (1 - on/off), target <= 20 %",
                    f"{1 - statistics.median(ratios):.1%}",
                    f"{1 - max(ratios):.1%}..{1 - min(ratios):.1%}",
                )
            )
        if "latency" not in args.skip:
            lat = sorted(asyncio.run(detection(broker, Path(tmp), args.trials)))
            p50 = lat[len(lat) // 2]
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            rows.append(("detection latency p50 (s)", f"{p50:.3f}", f"n={len(lat)}"))
            rows.append(
                ("detection latency p99 (s), target < 1", f"{p99:.3f}", f"max {lat[-1]:.3f}")
            )
    if "memory" not in args.skip:
        start = time.perf_counter()
        points = memory(args.memory_events)
        took = time.perf_counter() - start
        for fed, rss, buckets in points:
            print(f"  {fed:>11,} events: RSS {rss:7.1f} MB, {buckets:,} buckets")
        first, last = points[len(points) // 2 - 1], points[-1]
        rows.append(
            (
                "RSS after 10 M events, 1,000 series (MB)",
                f"{last[1]:.0f}",
                f"{first[0] / 1e6:.0f} M: {first[1]:.0f} MB",
            )
        )
        rows.append(
            ("in-process windowing rate (events/s)", f"{args.memory_events / took:,.0f}", "")
        )
    print()
    print(f"{'measure':<44}{'median/value':>16}  range / note")
    for name, value, note in rows:
        print(f"{name:<44}{value:>16}  {note}")
    if "throughput" not in args.skip:
        print(ingest.noise(off, load).replace("raw rate", "monitoring-off rate"))


if __name__ == "__main__":
    main()
