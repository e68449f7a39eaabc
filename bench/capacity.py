"""Where one leader saturates: the rollout controller's cost per live rollout.

    python bench/capacity.py [--rollouts 1,10,100] [--calls 2000] [--postgres-url URL]

Ingestion (events/s into PostgreSQL and SQLite) is ``bench/ingest.py``; the monitor's
windows are ``bench/monitor.py``. This measures the third part a leader runs for every
prompt: ``N`` live rollouts on a PostgreSQL store (a throwaway durable cluster, or a
schema on ``--postgres-url``), each fed ``--calls`` calls and as many feedback events
through the controller's batch listener (the path every stored batch takes), then timed:

* **feed**: microseconds of the batch listener per event (calls and feedback joined to
  them, in each rollout's accumulator);
* **tick**: one evaluation of every live rollout (observation, the sequential tests, the
  guardrails; a changed state is stored), per rollout; with the default
  ``rollout.tick_interval_s`` of 10 s, one core evaluates ``10 s / tick`` rollouts.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).parent))
import ingest

from promptd.daemon.logs import configure_logging
from promptd.daemon.rollout_profiles import profile_lookup
from promptd.daemon.settings import RolloutSettings
from promptd.events import FeedbackEvent, MetricEvent, new_event_id
from promptd.replacement.controller import RolloutController
from promptd.replacement.metrics import RolloutMetrics
from promptd.replacement.registry import NewVersion, Registry
from promptd.routing import Routing
from promptd.storage.database import Database
from promptd.storage.repository import BatchOutcome
from promptd.storage.rows import FeedbackRow, MetricRow, feedback_row, metric_row


async def measure(url: str, rollouts: int, calls: int) -> tuple[float, float]:
    """(feed µs per event, tick ms per rollout) for ``rollouts`` live rollouts."""
    db = await Database.open(url)
    try:
        registry = Registry(db, "balanced")
        controller = RolloutController(
            db, registry, profile_lookup(RolloutSettings()), RolloutMetrics(CollectorRegistry())
        )
        routings: list[Routing] = []
        for i in range(rollouts):
            name = f"prompt-{i}"
            for template in ("Summarize {text}.", "Summarize {text} in one line."):
                await registry.register(name, NewVersion(template=template))
            await controller.start_rollout(name, "v2", profile="conservative")
            routings.append(await controller.routing(name))
        batches = [batch(routing, calls) for routing in routings]
        began = time.process_time()
        for outcome in batches:
            await controller.on_batch(outcome)
        feed_us = (time.process_time() - began) / (rollouts * calls * 2) * 1e6
        began = time.perf_counter()
        await controller.tick()
        tick_ms = (time.perf_counter() - began) / rollouts * 1e3
        return feed_us, tick_ms
    finally:
        await db.close()


def batch(routing: Routing, calls: int) -> BatchOutcome:
    """``calls`` calls of the rollout's prompt, arms by its routing, each with feedback
    (rows made from the events, as ingestion stores them)."""
    now = time.time()
    metrics: list[MetricRow] = []
    feedback: list[FeedbackRow] = []
    for i in range(calls):
        unit = f"user-{i % 500}"
        version, _ = routing.choose(unit)
        assert version is not None
        request = new_event_id()
        common = {"ts": now, "prompt": routing.prompt, "variant": version, "request_id": request}
        call = MetricEvent(
            event_id=new_event_id(), model="m", unit_id=unit, latency_ms=120.0, success=True,
            tokens_in=10, tokens_out=20, cost_usd=0.001, **common,
        )  # fmt: skip
        rating = FeedbackEvent(event_id=new_event_id(), score=0.7, kind="thumbs", **common)
        metrics.append(metric_row(call))
        feedback.append(feedback_row(rating))
    return BatchOutcome(
        len(metrics), len(feedback), 0, tuple(metrics), tuple(feedback), ingested_at=now
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", default="1,10,100")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--postgres-url", help="an existing server (default: a throwaway one)")
    args = parser.parse_args()
    configure_logging("error", "json")
    print(f"{'live rollouts':>14}{'feed (us/event)':>18}{'tick (ms/rollout)':>20}")
    with ingest.postgres("postgresql", args.postgres_url) as stores:
        assert stores is not None
        for n in (int(x) for x in args.rollouts.split(",")):
            feed_us, tick_ms = asyncio.run(measure(next(stores), n, args.calls))
            print(f"{n:>14}{feed_us:>18.2f}{tick_ms:>20.2f}")
    print(f"\n{args.calls} calls and {args.calls} feedback events per rollout")


if __name__ == "__main__":
    main()
