"""Time added per call by ``@promptd.instrument``, beside prometheus-client and OpenTelemetry.

Run: ``python bench/sdk_overhead.py [--calls 200000]``. Needs the dev extra (the embedded
Tansu broker) and ``opentelemetry-sdk`` for the comparison row.

Every call is timed on its own with ``perf_counter_ns`` after a warm-up; the table shows
the median and p99 of those times minus the bare function's median and p99 measured the
same way in the same run (so the timer's own cost cancels), and the slowest single call.
Scenarios: a healthy broker (the sender thread is busy delivering meanwhile, so this row
includes its GIL contention), the same for calls made inside an open ``promptd.episode()``,
and a broker that is down (a closed port).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import promptd
from promptd.daemon.broker import EmbeddedBroker, free_port

Timings = list[int]


def time_sync(fn: Callable[[int], Any], calls: int, warmup: int) -> Timings:
    """Per-call nanoseconds of ``fn(i)``."""
    for i in range(warmup):
        fn(i)
    out = [0] * calls
    clock = time.perf_counter_ns
    gc.collect()
    for i in range(calls):
        start = clock()
        fn(i)
        out[i] = clock() - start
    return out


def time_async(fn: Callable[[int], Awaitable[Any]], calls: int, warmup: int) -> Timings:
    """Per-call nanoseconds of ``await fn(i)`` inside one event loop."""

    async def run() -> Timings:
        for i in range(warmup):
            await fn(i)
        out = [0] * calls
        clock = time.perf_counter_ns
        gc.collect()
        for i in range(calls):
            start = clock()
            await fn(i)
            out[i] = clock() - start
        return out

    return asyncio.run(run())


def summary(samples: Timings) -> tuple[float, float, float, int]:
    """(median, p99, max) in microseconds, and the number of calls over 1 ms."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    slow = sum(1 for s in ordered if s > 1_000_000)
    return statistics.median(ordered) / 1e3, p99 / 1e3, ordered[-1] / 1e3, slow


def bare_sync(x: int) -> int:
    """The function being wrapped: as cheap as possible, so only overhead shows."""
    return x + 1


async def bare_async(x: int) -> int:
    """Async twin of :func:`bare_sync`."""
    return x + 1


def instrumented(
    bootstrap: str, queue_size: int
) -> tuple[Callable[[int], int], Callable[[int], Awaitable[int]]]:
    """Configure the SDK on ``bootstrap`` and wrap both bare functions."""
    promptd.configure(
        bootstrap_servers=bootstrap,
        metrics_topic="bench.metrics",
        queue_size=queue_size,
        registry=False,
        send_timeout_s=2.0,
    )
    wrap = promptd.instrument(prompt="bench", model="bench-model")
    return wrap(bare_sync), wrap(bare_async)


def prometheus_wrapped() -> tuple[Callable[[int], int], Callable[[int], Awaitable[int]]]:
    """prometheus-client's ``Histogram.time()`` decorator on a private registry."""
    from prometheus_client import CollectorRegistry, Histogram

    hist = Histogram("bench_seconds", "bench", registry=CollectorRegistry())
    return hist.time()(bare_sync), hist.time()(bare_async)


def otel_wrapped() -> tuple[Callable[[int], int], Callable[[int], Awaitable[int]]] | None:
    """An OpenTelemetry SDK span per call, batch processor, exporter that drops everything."""
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
    except ImportError:
        return None

    class NoOpExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NoOpExporter()))
    tracer = provider.get_tracer("bench")

    def sync(x: int) -> int:
        with tracer.start_as_current_span("llm_call"):
            return bare_sync(x)

    async def asyn(x: int) -> int:
        with tracer.start_as_current_span("llm_call"):
            return await bare_async(x)

    return sync, asyn


def main() -> None:
    """Measure every row and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--warmup", type=int, default=20_000)
    args = parser.parse_args()
    calls, warmup = args.calls, args.warmup

    rows: list[tuple[str, str, Timings]] = []
    base_sync = time_sync(bare_sync, calls, warmup)
    base_async = time_async(bare_async, calls, warmup)

    with EmbeddedBroker() as broker:
        # A buffer big enough that the healthy rows never drop: every event is delivered.
        sync_fn, async_fn = instrumented(broker.bootstrap_servers, 4 * (calls + warmup))
        rows.append(("promptd, broker healthy", "sync", time_sync(sync_fn, calls, warmup)))
        rows.append(("promptd, broker healthy", "async", time_async(async_fn, calls, warmup)))
        with promptd.episode():
            # asyncio.run copies this context: the async calls are in the episode too.
            rows.append(("promptd, in an episode", "sync", time_sync(sync_fn, calls, warmup)))
            rows.append(("promptd, in an episode", "async", time_async(async_fn, calls, warmup)))
        delivered_ok = promptd.flush(60)
        healthy = promptd.sdk_stats()
        promptd.shutdown(5.0)

    # The default buffer (10,000): it fills, then the calls take the drop path.
    sync_fn, async_fn = instrumented(f"127.0.0.1:{free_port()}", 10_000)
    rows.append(("promptd, broker down", "sync", time_sync(sync_fn, calls, warmup)))
    rows.append(("promptd, broker down", "async", time_async(async_fn, calls, warmup)))
    down = promptd.sdk_stats()
    promptd.shutdown(0.5)

    prom_sync, prom_async = prometheus_wrapped()
    rows.append(("prometheus Histogram.time()", "sync", time_sync(prom_sync, calls, warmup)))
    rows.append(("prometheus Histogram.time()", "async", time_async(prom_async, calls, warmup)))
    otel = otel_wrapped()
    if otel is not None:
        rows.append(("OpenTelemetry span, no-op export", "sync", time_sync(otel[0], calls, warmup)))
        rows.append(
            ("OpenTelemetry span, no-op export", "async", time_async(otel[1], calls, warmup))
        )

    bases = {"sync": summary(base_sync), "async": summary(base_async)}
    print(f"{calls} calls per row after {warmup} warm-up calls; times in microseconds")
    print(
        f"bare function: sync median {bases['sync'][0]:.2f} p99 {bases['sync'][1]:.2f} "
        f"(calls >1ms: {bases['sync'][3]}); async median {bases['async'][0]:.2f} "
        f"p99 {bases['async'][1]:.2f} (calls >1ms: {bases['async'][3]})"
    )
    header = (
        f"{'wrapper':34} {'kind':5} {'added median':>12} {'added p99':>10} "
        f"{'max call':>9} {'calls >1ms':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, kind, samples in rows:
        median, p99, worst, slow = summary(samples)
        base = bases[kind]
        print(
            f"{name:34} {kind:5} {median - base[0]:12.2f} {p99 - base[1]:10.2f} "
            f"{worst:9.1f} {slow:10d}"
        )
    print(
        f"healthy: emitted {healthy.emitted}, delivered {healthy.delivered}, "
        f"dropped {healthy.dropped}, flushed={delivered_ok}; "
        f"down: emitted {down.emitted}, buffered {down.buffered}, dropped {down.dropped}"
    )


if __name__ == "__main__":
    main()
