"""Time added per call by ``@promptd.instrument``, beside prometheus-client and OpenTelemetry.

Run: ``python bench/sdk_overhead.py [--calls 200000] [--only decorator|retrieval]``. Needs
the dev extra (the embedded Tansu broker) and ``opentelemetry-sdk`` for the comparison row.

Every call is timed on its own with ``perf_counter_ns`` after a warm-up; the table shows
the median and p99 of those times minus the bare function's median and p99 measured the
same way in the same run (so the timer's own cost cancels), and the slowest single call.
Scenarios: a healthy broker (the sender thread is busy delivering meanwhile, so this row
includes its GIL contention), the same for calls made inside an open ``promptd.episode()``,
and a broker that is down (a closed port).

**Per-request demonstrations** (``--only retrieval``, or after the table): a version that
takes ``k`` = 4 demos from a pool of ``--pool`` (1,000) demos, retrieved lexically (BM25,
``bm25s``) for each call's input. Each call renders ``variant.for_call().messages(...)``
for an input the pool does not hold; the reference is the same configuration without
demos, timed the same way in the same run, and the added median and p99 are the medians
over ``--runs`` (5) runs of the difference. Then the memory of a pool of ``--big-pool``
(10,000) demos in the app's process: what building its index from the snapshot's JSON
keeps allocated (tracemalloc, numpy's arrays included) and the peak while building.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import promptd
from promptd.daemon.broker import EmbeddedBroker, free_port

Timings = list[int]


def time_sync(
    fn: Callable[[int], Any],
    calls: int,
    warmup: int,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> Timings:
    """Per-call nanoseconds of ``fn(i)`` (wall clock, or ``clock``)."""
    for i in range(warmup):
        fn(i)
    out = [0] * calls
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


def demo_texts(n: int, seed: int) -> list[str]:
    """``n`` varied messages (the optimizer bench's routing and city tasks)."""
    from optimize_tasks import city_task, routing_task

    half = n // 2
    return [i.text for i in routing_task(n - half, seed).items + city_task(half, seed).items]


DEMO_CONFIG: Final = {
    "messages": [
        {"role": "system", "content": "Which department should handle this message?"},
        {"role": "user", "content": "Message: {text}"},
    ]
}


def pool_variant(size: int, k: int) -> tuple[Any, Any]:
    """A variant taking ``k`` demos per call from a pool of ``size``, and the same
    configuration without demos (the reference), as the SDK's routing cache builds them."""
    from promptd.demos import Demo, DemoSpec
    from promptd.routing import Routing
    from promptd.sdk.config import SdkConfig
    from promptd.sdk.pools import build, pool_key
    from promptd.sdk.routing_client import RoutingCache
    from promptd.sdk.stats import Counters

    config = {**DEMO_CONFIG, "demos": {"source": "pool", "pool": "pool-bench", "k": k}}
    spec = DemoSpec.of(config)
    assert spec is not None
    body = {
        "demos": [
            Demo(f"r{i}", {"text": text}, "billing").to_dict()
            for i, text in enumerate(demo_texts(size, 7))
        ]
    }
    cache = RoutingCache(SdkConfig(registry=False), Counters())
    key = pool_key(spec, config)
    cache.pools[key] = build(key, body, None)
    cache.install("dyn", Routing(prompt="dyn", active_version="v2", active_config=config), 1e9)
    cache.install("fix", Routing(prompt="fix", active_version="v1", active_config=DEMO_CONFIG), 1e9)
    return cache.entries["dyn"].active, cache.entries["fix"].active


def retrieval(calls: int, warmup: int, runs: int, size: int, big: int) -> None:
    """Added time per call of per-request demos, and a big pool's memory (see above)."""
    started = time.perf_counter()
    dynamic, fixed = pool_variant(size, 4)
    first = time.perf_counter() - started
    queries = demo_texts(1_000, 99)  # other seeds: inputs the pool does not hold

    def render(variant: Any) -> Callable[[int], Any]:
        return lambda i: variant.for_call().messages(text=queries[i % len(queries)])

    check = dynamic.for_call()
    shown = len(check.messages(text=queries[0])) - 2
    print(
        f"per-request demos: pool of {size}, k=4 ({shown // 2} demos shown for the first "
        f"query), {calls} calls per run after {warmup}, {runs} runs; microseconds"
    )
    # Wall clock, and the thread's CPU time (what the call costs when the machine's
    # other processes preempt it: the wall-clock p99 of a loaded machine is theirs).
    for label, clock in (("wall clock", time.perf_counter_ns), ("thread CPU", time.thread_time_ns)):
        medians, p99s, bases = [], [], []
        for _ in range(runs):
            base = summary(time_sync(render(fixed), calls, warmup, clock))
            dyn = summary(time_sync(render(dynamic), calls, warmup, clock))
            medians.append(dyn[0] - base[0])
            p99s.append(dyn[1] - base[1])
            bases.append(base[0])
        print(
            f"  {label}: added median {statistics.median(medians):.1f} (runs: "
            f"{', '.join(f'{m:.1f}' for m in medians)}); added p99 "
            f"{statistics.median(p99s):.1f} (runs: {', '.join(f'{p:.1f}' for p in p99s)}); "
            f"reference median {statistics.median(bases):.1f}"
        )
    print(f"  first pool: import bm25s and index {size} demos in {first * 1e3:.0f} ms")
    import json
    import tracemalloc

    from promptd.demos import Demo
    from promptd.sdk.pools import build

    texts = demo_texts(big, 11)
    body = json.dumps(
        {"demos": [Demo(f"r{i}", {"text": t}, "billing").to_dict() for i, t in enumerate(texts)]}
    )
    gc.collect()
    tracemalloc.start()
    pool = build(("pool-big", "lexical", ("text",)), json.loads(body), None)
    gc.collect()
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"  a pool of {len(pool.demos)} demos ({len(body) / 1e6:.1f} MB of JSON): "
        f"{kept / 1e6:.1f} MB kept in the app, {peak / 1e6:.1f} MB at peak while indexing"
    )


def main() -> None:
    """Measure every row and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--warmup", type=int, default=20_000)
    parser.add_argument("--only", choices=["decorator", "retrieval"])
    parser.add_argument("--runs", type=int, default=5, help="retrieval: runs (median shown)")
    parser.add_argument("--retrieval-calls", type=int, default=20_000)
    parser.add_argument("--pool", type=int, default=1_000)
    parser.add_argument("--big-pool", type=int, default=10_000)
    args = parser.parse_args()
    if args.only != "decorator":
        retrieval(args.retrieval_calls, 1_000, args.runs, args.pool, args.big_pool)
    if args.only == "retrieval":
        return
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
