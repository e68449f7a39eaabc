"""Routing from a real HTTP server on loopback: shares, rollback within a TTL, outages."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web

from promptd.daemon.broker import EmbeddedBroker, free_port
from promptd.routing import in_candidate
from promptd.sdk import Client, SdkConfig, instrument
from tests.conftest import wait_for
from tests.kafka_helpers import produce

pytestmark = pytest.mark.integration

TTL_S = 0.5


class RoutingServer:
    """Serves ``GET /v1/prompts/{name}/routing`` from a mutable dict of Routing JSON."""

    def __init__(self) -> None:
        self.routes: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        """One routing document, or 404 for an unknown prompt."""
        self.hits += 1
        body = self.routes.get(request.match_info["name"])
        if body is None:
            return web.json_response({"error": "unknown prompt"}, status=404)
        return web.json_response(body)

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_get("/v1/prompts/{name}/routing", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        """Close the listener and its connections."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def server() -> AsyncIterator[RoutingServer]:
    """A running routing server, stopped at teardown."""
    running = RoutingServer()
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """SDK clients made by the test, closed at teardown."""
    made: list[Client] = []
    yield made
    for client in made:
        client.close(1.0)


def _routing(weight: float) -> dict[str, Any]:
    return {
        "prompt": "summarization",
        "active_version": "v1",
        "active_template": "Summarize: {text}",
        "candidate_version": "v2",
        "candidate_template": "TL;DR {text}",
        "weight": weight,
        "salt": "rollout-1",
        "ttl_seconds": TTL_S,
    }


async def test_candidate_share_and_rollback_within_ttl(
    server: RoutingServer, clients: list[Client]
) -> None:
    """The candidate serves exactly its buckets; after a rollback all units get v1 in a TTL."""
    server.routes["summarization"] = _routing(0.2)
    client = Client(SdkConfig(daemon_url=server.url, registry=False, poll_interval_s=0.01))
    clients.append(client)
    served: list[tuple[str, str]] = []

    @instrument(
        prompt="summarization",
        version="v0",
        template="{text}",
        unit_id="user",
        inject="variant",
        client=client,
    )
    def summarize(text: str, user: str, variant: Any = None) -> str:
        served.append((user, variant.version))
        return str(variant.format(text=text))

    assert summarize("x", "warmup") == "x"  # default variant until routing arrives
    client.start()
    await wait_for(lambda: "summarization" in client.routing.entries, timeout=5)
    users = [f"user-{i}" for i in range(3000)]
    served.clear()
    for user in users:
        summarize("t", user)
    expected = [(u, "v2" if in_candidate("rollout-1", u, 0.2) else "v1") for u in users]
    assert served == expected
    share = sum(v == "v2" for _, v in served) / len(served)
    assert 0.17 < share < 0.23

    server.routes["summarization"] = _routing(0.0)  # rollback
    rolled_back_at = time.monotonic()

    def all_active() -> bool:
        served.clear()
        for user in users[:500]:
            summarize("t", user)
        return all(v == "v1" for _, v in served)

    await wait_for(all_active, timeout=5, interval=0.02)
    assert time.monotonic() - rolled_back_at < TTL_S + 0.3


async def test_last_known_routing_survives_daemon_outage(
    server: RoutingServer, clients: list[Client]
) -> None:
    """When the daemon goes away, the last fetched routing keeps serving."""
    server.routes["summarization"] = _routing(1.0)
    client = Client(
        SdkConfig(daemon_url=server.url, registry=False, poll_interval_s=0.01, routing_retry_s=0.1)
    )
    clients.append(client)

    @instrument(prompt="summarization", client=client)
    def call() -> str:
        return "ok"

    call()
    client.start()
    await wait_for(lambda: "summarization" in client.routing.entries, timeout=5)
    await server.stop()
    fetches = client.stats().routing_failures
    await wait_for(lambda: client.stats().routing_failures > fetches + 1, timeout=5)
    for _ in range(20):
        assert call() == "ok"
    entry = client.routing.entries["summarization"]
    assert entry.choose("anyone") is not None
    assert entry.choose("anyone").version == "v2"  # type: ignore[union-attr]


async def test_daemon_never_reachable_serves_default_fast(clients: list[Client]) -> None:
    """With no daemon on the routing URL, calls use the default variant and never wait."""
    client = Client(
        SdkConfig(
            daemon_url=f"http://127.0.0.1:{free_port()}",
            registry=False,
            poll_interval_s=0.01,
            routing_retry_s=0.05,
        )
    )
    clients.append(client)
    versions: list[str] = []

    @instrument(prompt="p", version="fallback", inject="variant", client=client)
    def call(variant: Any = None) -> int:
        versions.append(variant.version)
        return 1

    client.start()
    worst = 0.0
    for _ in range(200):
        start = time.perf_counter()
        assert call() == 1
        worst = max(worst, time.perf_counter() - start)
    await wait_for(lambda: client.stats().routing_failures >= 2, timeout=5)
    assert call() == 1
    assert set(versions) == {"fallback"}
    assert worst < 0.05


async def test_routing_from_the_routing_topic(
    broker: EmbeddedBroker, clients: list[Client]
) -> None:
    """With routing_from_kafka, the latest record per prompt on the topic is served."""
    topic = f"routing-{uuid.uuid4().hex[:8]}"
    old, new = _routing(0.0), {**_routing(0.0), "active_version": "v9"}
    await produce(
        broker.bootstrap_servers, topic, [json.dumps(old).encode(), json.dumps(new).encode()]
    )
    client = Client(
        SdkConfig(
            bootstrap_servers=broker.bootstrap_servers,
            routing_topic=topic,
            routing_from_kafka=True,
            registry=False,
            poll_interval_s=0.01,
        )
    )
    clients.append(client)
    client.start()

    def served_v9() -> bool:
        entry = client.routing.entries.get("summarization")
        return entry is not None and entry.choose("u").version == "v9"  # type: ignore[union-attr]

    await wait_for(served_v9, timeout=10)


async def test_unknown_prompt_uses_default(server: RoutingServer, clients: list[Client]) -> None:
    """A prompt the daemon does not know (404) is served by the decorator's default."""
    client = Client(SdkConfig(daemon_url=server.url, registry=False, poll_interval_s=0.01))
    clients.append(client)

    @instrument(prompt="unregistered", version="mine", inject="variant", client=client)
    def call(variant: Any = None) -> str:
        return str(variant.version)

    call()
    client.start()
    await wait_for(lambda: "unregistered" in client.routing.entries, timeout=5)
    assert call() == "mine"
    assert server.hits >= 1
