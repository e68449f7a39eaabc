"""Restart-to-ready and failover times of real ``promptd run`` processes.

    python bench/failover.py [--runs 3] [--postgres-url URL]

Each run, on a Tansu broker and a PostgreSQL store (a throwaway durable cluster, or a
fresh schema on ``--postgres-url``), with the production lease durations (10 s lease,
7 s renew deadline, 2 s retry period) and Kafka session timeout (10 s):

* **restart to ready**: ``promptd run`` from process start until ``/readyz`` answers 200,
  for a daemon on a SQLite file and for one on the PostgreSQL store (the first of a pair:
  it leads, consumes, serves);
* **failover**: a second daemon stands by; the leader is SIGKILLed under a steady trickle
  of events; the time until the standby leads (``/readyz`` says ``role: leader``) and
  until it ingests (``/readyz?role=leader`` answers 200: partitions assigned, Kafka
  reachable), and whether every event produced around the kill is stored once.

Prints each run and the medians. The lease durations bound the failover: the lease of a
killed leader runs out within ``lease_duration_s`` of its last renewal and a standby
tries every ``retry_period_s``; the consumer group then gives the new leader the
partitions once the dead member's session has expired.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
import ingest

from promptd.daemon.broker import EmbeddedBroker
from promptd.events import new_event_id
from tests.daemon_process import DaemonProcess, environment

TOKEN = "bench-admin-token-0123456789"


def daemon_env(broker: EmbeddedBroker, url: str | None, tag: str) -> dict[str, str]:
    extra = {"PROMPTD_STORAGE_URL": url} if url is not None else {}
    return environment(broker.bootstrap_servers, tag, TOKEN, **extra)


async def readyz(daemon: DaemonProcess, query: str = "") -> tuple[int, dict[str, Any]]:
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(daemon.url + "/readyz" + query, timeout=aiohttp.ClientTimeout(2)) as resp,
        ):
            return resp.status, await resp.json()
    except (aiohttp.ClientError, TimeoutError):
        return 0, {}


async def until(predicate: Any, within_s: float = 120.0) -> float:
    """Poll ``predicate`` every 20 ms; the monotonic time it first held."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await predicate():
            return time.monotonic()
        await asyncio.sleep(0.02)
    raise TimeoutError("condition not met")


async def start_to_ready(daemon: DaemonProcess) -> float:
    began = time.monotonic()
    daemon.start()
    await daemon.wait_started(120)
    ready = await until(lambda: _ready(daemon))
    return ready - began


async def _ready(daemon: DaemonProcess) -> bool:
    return (await readyz(daemon))[0] == 200


class Trickle:
    """Events at about 200/s, each id kept, until stopped."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.sent: set[str] = set()
        self.stop = asyncio.Event()

    async def run(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.env["PROMPTD_KAFKA_BOOTSTRAP_SERVERS"], acks="all"
        )
        await producer.start()
        try:
            while not self.stop.is_set():
                for _ in range(10):
                    body = {"event_id": new_event_id(), "type": "metric", "ts": time.time(),
                            "prompt": "p", "variant": "v1", "model": "m", "success": True,
                            "request_id": new_event_id(), "latency_ms": 1.0}  # fmt: skip
                    topic = self.env["PROMPTD_KAFKA__METRICS_TOPIC"]
                    await producer.send(topic, json.dumps(body).encode(), key=b"p")
                    self.sent.add(str(body["event_id"]))
                await producer.flush()
                await asyncio.sleep(0.05)
        finally:
            await producer.stop()


async def stored(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        return {r[0] for r in await conn.fetch("SELECT event_id FROM metric_events")}
    finally:
        await conn.close()


async def one_run(broker: EmbeddedBroker, url: str, root: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    tag = uuid.uuid4().hex[:8]
    single = DaemonProcess(root / tag, "sqlite", daemon_env(broker, None, f"s{tag}"))
    try:
        out["restart_sqlite_s"] = await start_to_ready(single)
    finally:
        single.stop()
    env = daemon_env(broker, url, tag)
    a, b = DaemonProcess(root / tag, "a", env), DaemonProcess(root / tag, "b", env)
    trickle = Trickle(env)
    try:
        out["restart_postgresql_s"] = await start_to_ready(a)
        b.start()
        await b.wait_started(120)
        await until(lambda: _ready(b))
        sending = asyncio.create_task(trickle.run())
        await asyncio.sleep(3.0)
        a.signal(signal.SIGKILL)
        killed = time.monotonic()

        async def leads() -> bool:
            return (await readyz(b))[1].get("role") == "leader"

        async def ingests() -> bool:
            return (await readyz(b, "?role=leader"))[0] == 200

        out["failover_leads_s"] = await until(leads) - killed
        out["failover_ingests_s"] = await until(ingests) - killed
        await asyncio.sleep(2.0)
        trickle.stop.set()
        await sending

        async def all_stored() -> bool:
            return await stored(url) >= trickle.sent

        await until(all_stored, 60)
        out["events"] = len(trickle.sent)
        out["exactly_once"] = float(await stored(url) == trickle.sent)
    finally:
        for daemon in (a, b):
            daemon.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--postgres-url", help="an existing server (default: a throwaway one)")
    args = parser.parse_args()
    results: list[dict[str, float]] = []
    load = [os.getloadavg()[0]]
    with (
        EmbeddedBroker() as broker,
        tempfile.TemporaryDirectory() as tmp,
        ingest.postgres("postgresql", args.postgres_url) as stores,
    ):
        assert stores is not None
        for run in range(args.runs):
            result = asyncio.run(one_run(broker, next(stores), Path(tmp)))
            results.append(result)
            load.append(os.getloadavg()[0])
            print(f"run {run + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))
    print()
    print(f"{'measure':<48}{'median':>9}{'min':>9}{'max':>9}")
    for key, name in (
        ("restart_sqlite_s", "restart to ready, SQLite (s)"),
        ("restart_postgresql_s", "restart to ready, PostgreSQL (s)"),
        ("failover_leads_s", "SIGKILL of the leader to the standby leading (s)"),
        ("failover_ingests_s", "SIGKILL of the leader to the standby ingesting (s)"),
    ):
        values = [r[key] for r in results]
        print(f"{name:<48}{statistics.median(values):>9.2f}{min(values):>9.2f}{max(values):>9.2f}")
    once = sum(int(r["exactly_once"]) for r in results)
    print(f"\nevery produced event stored exactly once: {once} of {len(results)} runs")
    print("lease 10 s, renew deadline 7 s, retry period 2 s; Kafka session timeout 10 s")
    print(f"1-minute load average before and after each run (2 cores): {load}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
