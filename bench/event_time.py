"""Event time under outages: the live windows against a full replay and the stored events.

    python bench/event_time.py [--rate 40] [--scenario outage|sigkill|both]

Runs the real daemon (``promptd run``, a subprocess) on a Tansu broker of its own, with the
default monitoring settings (``lateness_s`` 30 s), while a producer sends ``--rate`` calls
per second on three partitions of each topic and one feedback per call, published up to
20 s after the call but stamped with the call's time (so the feedback partitions are up
to 20 s out of order, within the lateness).

* **outage**: 20 s of traffic, a clean stop (SIGTERM), 40 s of downtime while the
  traffic goes on, a restart, 20 s more.
* **sigkill**: 10 SIGKILLs 3 to 8 s apart, each followed at once by a restart (what a
  supervisor does; a restart that refuses to run is started again, and counted; the
  time from each restart to ready is reported).

Then the traffic stops, and once every event is stored it prints, for each window length
and prompt: the events in the daemon's live window (``/v1/prompts/{name}/stats``), in a
full replay from the SQLite file at the same instant (what a start without a snapshot
builds, ``rebuild_windows``), and the events stored whose timestamp lies in that
window's range (a SQL count: what the window would hold if nothing were dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from promptd.daemon.broker import EmbeddedBroker
from promptd.daemon.logs import configure_logging
from promptd.monitoring.config import MonitoringSettings
from promptd.monitoring.monitor import rebuild_windows
from promptd.monitoring.windows import WindowStore
from promptd.storage.database import Database

PROMPTS = ("alpha", "beta", "gamma")
WINDOWS = (60, 300, 3600)
FEEDBACK_DELAY_S = 20.0


class Traffic:
    """Calls at ``rate``/s on three partitions; their feedback up to 20 s later."""

    def __init__(self, bootstrap: str, tag: str, rate: float) -> None:
        self.bootstrap, self.tag, self.rate = bootstrap, tag, rate
        self.sent = [0, 0]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        rng = random.Random(1)
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        pending: list[tuple[float, bytes, int]] = []
        step = 3 / self.rate
        try:
            while not self.stop.is_set() or pending:
                now = time.time()
                if not self.stop.is_set():
                    for partition, prompt in enumerate(PROMPTS):
                        rid = uuid.uuid4().hex
                        call = {
                            "event_id": uuid.uuid4().hex,
                            "type": "metric",
                            "ts": now,
                            "prompt": prompt,
                            "variant": f"v{rng.randrange(2)}",
                            "model": "m",
                            "request_id": rid,
                            "latency_ms": rng.lognormvariate(5, 0.5),
                            "success": rng.random() < 0.95,
                        }
                        value = json.dumps(call).encode()
                        await producer.send(f"m-{self.tag}", value, partition=partition)
                        self.sent[0] += 1
                        note = {
                            **{k: call[k] for k in ("ts", "prompt", "variant", "request_id")},
                            "event_id": uuid.uuid4().hex,
                            "type": "feedback",
                            "score": rng.random(),
                        }
                        due = now + rng.uniform(0, FEEDBACK_DELAY_S)
                        pending.append((due, json.dumps(note).encode(), partition))
                pending.sort()
                while pending and (pending[0][0] <= now or self.stop.is_set()):
                    _, value, partition = pending.pop(0)
                    await producer.send(f"f-{self.tag}", value, partition=partition)
                    self.sent[1] += 1
                await asyncio.sleep(step)
            await producer.flush()
        finally:
            await producer.stop()


class Daemons:
    """``promptd run`` subprocesses on one data directory, restarted like a supervisor."""

    def __init__(self, data: Path, bootstrap: str, tag: str) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTD_")}
        self.env |= {
            "PROMPTD_DATA_DIR": str(data),
            "PROMPTD_HTTP_PORT": "0",
            "PROMPTD_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "PROMPTD_KAFKA__METRICS_TOPIC": f"m-{tag}",
            "PROMPTD_KAFKA__FEEDBACK_TOPIC": f"f-{tag}",
            "PROMPTD_KAFKA__GROUP_ID": f"g-{tag}",
            "PROMPTD_LOG_LEVEL": "warning",
        }
        self.data = data
        self.proc: subprocess.Popen[bytes] | None = None
        self.refused = 0
        #: Seconds from each start (the first attempt) to ready.
        self.ready_s: list[float] = []

    def start(self) -> None:
        """Start, and start again until one runs (a refusal is counted)."""
        started = time.monotonic()
        while True:
            (self.data / "runtime.json").unlink(missing_ok=True)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "promptd.daemon.cli", "run"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready(60):
                self.ready_s.append(time.monotonic() - started)
                return
            self.refused += 1

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError, ValueError, KeyError):
                url = self.url() + "/readyz"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return True
            time.sleep(0.1)
        raise RuntimeError("the daemon did not become ready")

    def url(self) -> str:
        runtime = json.loads((self.data / "runtime.json").read_text())
        return f"http://127.0.0.1:{runtime['http_port']}"

    def end(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(30)


def stored(path: Path) -> tuple[int, int]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM metric_events), (SELECT count(*) FROM feedback_events)"
        ).fetchone()
    return int(row[0]), int(row[1])


def in_range(path: Path, prompt: str, start: float, end: float) -> tuple[int, int]:
    """Stored calls and feedback of ``prompt`` stamped in ``[start, end)``."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM metric_events WHERE prompt = ?1 AND ts >= ?2 AND "
            "ts < ?3), (SELECT count(*) FROM feedback_events WHERE prompt = ?1 AND ts >= ?2 "
            "AND ts < ?3)",
            (prompt, start, end),
        ).fetchone()
    return int(row[0]), int(row[1])


async def replayed(path: Path, prompt: str, seconds: float, now: float) -> tuple[int, int]:
    """Calls and feedback of ``prompt`` in a full replay from the file at ``now``."""
    db = await Database.open(path)
    try:
        store = WindowStore(MonitoringSettings().window_config())
        await rebuild_windows(store, db, now, 3600)
        stats = store.stats(prompt, window_seconds=seconds, now=now)
    finally:
        await db.close()
    return stats.request_count, stats.feedback_count


def compare(daemons: Daemons, db: Path) -> list[dict[str, Any]]:
    rows = []
    for seconds in WINDOWS:
        live_total = [0, 0]
        replay_total = [0, 0]
        stored_total = [0, 0]
        for prompt in PROMPTS:
            url = f"{daemons.url()}/v1/prompts/{prompt}/stats?window={seconds}s"
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = json.loads(resp.read())
            total = body["total"]
            live = (total["request_count"], total["feedback_count"])
            replay = asyncio.run(replayed(db, prompt, seconds, body["now"]))
            counted = in_range(db, prompt, total["start"], total["end"])
            for acc, value in ((live_total, live), (replay_total, replay), (stored_total, counted)):
                acc[0] += value[0]
                acc[1] += value[1]
        counts = {"live": live_total, "replay": replay_total, "stored": stored_total}
        rows.append({"window_s": seconds, **counts})
    return rows


def scenario(name: str, rate: float) -> None:
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        tag = uuid.uuid4().hex[:8]
        data = Path(tmp) / "data"
        daemons = Daemons(data, broker.bootstrap_servers, tag)
        traffic = Traffic(broker.bootstrap_servers, tag, rate)
        daemons.start()
        traffic.thread.start()
        started = time.monotonic()
        kills = 0
        if name == "outage":
            time.sleep(20)
            daemons.end(signal.SIGTERM)
            time.sleep(40)
            daemons.start()
            time.sleep(20)
        else:
            rng = random.Random(2)
            for _ in range(10):
                time.sleep(rng.uniform(3, 8))
                daemons.end(signal.SIGKILL)
                kills += 1
                daemons.start()
            time.sleep(5)
        traffic.stop.set()
        traffic.thread.join(120)
        sent = tuple(traffic.sent)
        db = data / "promptd.db"
        deadline = time.monotonic() + 120
        while stored(db) != sent and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1)
        result = {
            "scenario": name,
            "seconds": round(time.monotonic() - started),
            "sent": sent,
            "stored": stored(db),
            "sigkills": kills,
            "refused_restarts": daemons.refused,
            "restart_to_ready_s": {
                "median": round(statistics.median(daemons.ready_s[1:]), 1),
                "max": round(max(daemons.ready_s[1:]), 1),
            },
            "windows": compare(daemons, db),
        }
        daemons.end(signal.SIGTERM)
        print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=40.0, help="calls per second")
    parser.add_argument("--scenario", choices=("outage", "sigkill", "both"), default="both")
    args = parser.parse_args()
    configure_logging("warning", "json")
    for name in ("outage", "sigkill"):
        if args.scenario in (name, "both"):
            scenario(name, args.rate)


if __name__ == "__main__":
    main()
