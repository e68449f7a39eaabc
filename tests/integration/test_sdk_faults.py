"""Broker faults and a full buffer: calls stay fast and unchanged, the accounting holds."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import promptd
from promptd.daemon.broker import EmbeddedBroker, free_port
from promptd.sdk import Client, SdkConfig, instrument
from tests.kafka_helpers import read_all

pytestmark = pytest.mark.integration

MAX_CALL_S = 0.05  # generous for CI noise; the bench measures the real overhead


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """SDK clients made by the test, closed at teardown."""
    made: list[Client] = []
    yield made
    for client in made:
        client.close(0.3)


def _client(clients: list[Client], bootstrap: str, **over: Any) -> Client:
    config = SdkConfig(
        bootstrap_servers=bootstrap,
        metrics_topic=f"m-{uuid.uuid4().hex[:8]}",
        registry=False,
        poll_interval_s=0.01,
        send_timeout_s=1.0,
        reconnect_backoff_max_s=0.2,
    )
    client = Client(config.replace(**over))
    clients.append(client)
    return client


def _calls(client: Client) -> tuple[Callable[[int], int], Callable[[], None]]:
    @instrument(prompt="p", model="m", client=client)
    def ok(x: int) -> int:
        return x * 2

    @instrument(prompt="p", model="m", client=client)
    def fails() -> None:
        raise ValueError("app error")

    return ok, fails


def _run_calls(ok: Callable[[int], int], fails: Callable[[], None], n: int) -> float:
    """Make ``n`` ok calls and ``n`` failing calls; return the slowest call's seconds."""
    worst = 0.0
    for i in range(n):
        start = time.perf_counter()
        assert ok(i) == 2 * i
        with pytest.raises(ValueError, match="app error"):
            fails()
        worst = max(worst, (time.perf_counter() - start) / 2)
    return worst


def test_broker_never_reachable(clients: list[Client]) -> None:
    """A closed port: nothing waits, results and exceptions pass, events stay accounted."""
    client = _client(clients, f"127.0.0.1:{free_port()}", queue_size=50)
    ok, fails = _calls(client)
    worst = _run_calls(ok, fails, 100)
    assert worst < MAX_CALL_S
    time.sleep(0.3)  # let the sender fail to connect a few times
    stats = client.stats()
    assert stats.consistent
    assert (stats.emitted, stats.delivered, stats.buffered) == (200, 0, 50)
    assert stats.dropped_by_reason["queue_full"] == 150
    assert stats.errors.get("connect", 0) >= 1
    client.close(0.2)
    stats = client.stats()
    assert stats.consistent
    assert stats.dropped_by_reason["shutdown"] == 50
    assert stats.buffered == 0


def test_queue_full_drops_newest(clients: list[Client]) -> None:
    """Beyond queue_size the newest events are dropped and counted, never blocking."""
    client = _client(clients, f"127.0.0.1:{free_port()}", queue_size=10)
    ok, _ = _calls(client)
    for i in range(25):
        ok(i)
        stats = client.stats()
        assert stats.consistent
    stats = client.stats()
    assert (stats.buffered, stats.dropped_by_reason["queue_full"]) == (10, 15)


async def test_broker_down_then_up(clients: list[Client]) -> None:
    """Events made while the broker is down are delivered once it comes up."""
    port = free_port()
    client = _client(clients, f"127.0.0.1:{port}")
    ok, fails = _calls(client)
    worst = _run_calls(ok, fails, 20)
    assert worst < MAX_CALL_S
    await asyncio.sleep(0.3)
    stats = client.stats()
    assert (stats.delivered, stats.buffered) == (0, 40)
    broker = EmbeddedBroker(port=port)
    await asyncio.to_thread(broker.start)
    try:
        assert await client.publisher.aflush(15)
        stats = client.stats()
        assert stats.consistent
        assert (stats.emitted, stats.delivered, stats.dropped) == (40, 40, 0)
        records = await read_all(broker.bootstrap_servers, client.config.metrics_topic, 40)
        bodies = [json.loads(r.value) for r in records]
        assert sorted(b["success"] for b in bodies) == [False] * 20 + [True] * 20
        assert {b["error"] for b in bodies if not b["success"]} == {"ValueError"}
        client.close(2.0)
    finally:
        await asyncio.to_thread(broker.stop)


def test_fork_child_publishes_through_its_own_sender(broker: EmbeddedBroker) -> None:
    """After os.fork() the child's calls go out through a sender of its own."""
    topic = f"m-{uuid.uuid4().hex[:8]}"
    promptd.configure(
        bootstrap_servers=broker.bootstrap_servers,
        metrics_topic=topic,
        registry=False,
        poll_interval_s=0.01,
    )
    try:

        @promptd.instrument(prompt="forked", model="m")
        def call(who: str) -> str:
            return who

        call("parent")
        assert promptd.flush(10)
        pid = os.fork()
        if pid == 0:  # child: report through the exit code only
            code = 1
            try:
                call("child")
                stats = promptd.sdk_stats()
                if promptd.flush(10) and promptd.sdk_stats().delivered == 1 == stats.emitted:
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        records = asyncio.run(read_all(broker.bootstrap_servers, topic, 2, timeout=10))
        request_ids = {json.loads(r.value)["request_id"] for r in records}
        assert len(request_ids) == 2
        assert promptd.sdk_stats().delivered == 1  # the parent's own count is untouched
    finally:
        promptd.shutdown(2.0)


EXIT_SCRIPT = """
import promptd
promptd.configure(bootstrap_servers={bootstrap!r}, metrics_topic={topic!r}, registry=False,
                  exit_flush_timeout_s=1.0)

@promptd.instrument(prompt="exiting", model="m")
def call() -> int:
    return 1

for _ in range(3):
    call()
"""


async def test_exit_flushes_buffered_events(broker: EmbeddedBroker) -> None:
    """A script that never calls flush() still delivers its events at interpreter exit."""
    topic = f"m-{uuid.uuid4().hex[:8]}"
    script = EXIT_SCRIPT.format(bootstrap=broker.bootstrap_servers, topic=topic)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    records = await read_all(broker.bootstrap_servers, topic, 3, timeout=10)
    assert len(records) == 3


async def test_exit_is_time_bounded_when_the_broker_is_down() -> None:
    """With the broker unreachable, exit waits about exit_flush_timeout_s, not forever,
    and says in one warning line how many events were not delivered and why."""
    bootstrap = f"127.0.0.1:{free_port()}"
    script = EXIT_SCRIPT.format(bootstrap=bootstrap, topic="t")
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert time.monotonic() - start < 1.0 + 2.5  # budget + thread join slack + start-up
    summary = [line for line in stderr.decode().splitlines() if "were not delivered" in line]
    assert len(summary) == 1, stderr.decode()
    assert summary[0].startswith("promptd SDK: 3 of 3 events were not delivered: 3 shutdown")
    assert f"last Kafka error at {bootstrap}" in summary[0]
