"""Webhook and Alertmanager sinks against a local aiohttp server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from promptd.monitoring.rules import Notification
from promptd.monitoring.sinks import AlertmanagerSink, KafkaSink, SinkError, WebhookSink

T0 = 1_800_000_000.0


def note(state: str = "firing") -> Notification:
    """A notification."""
    return Notification(
        rule="slow",
        fingerprint="abc",
        labels={"alertname": "slow", "prompt": "p", "severity": "page"},
        state="firing" if state == "firing" else "resolved",
        reason="fired",
        metric="latency_p95",
        value=1500.0,
        threshold=1000.0,
        baseline=None,
        severity="page",
        started_at=T0,
        resolved_at=None if state == "firing" else T0 + 60,
        degradation=False,
        window_seconds=300,
    )


class Receiver:
    """A local HTTP server that records bodies and answers with a configurable status."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []
        self.status = 200
        self.url = ""


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """Start the receiver on a free loopback port; cleaned up after the test."""
    state = Receiver()

    async def handle(request: web.Request) -> web.Response:
        state.bodies.append(await request.json())
        return web.Response(status=state.status, text="no")

    app = web.Application()
    app.router.add_post("/hook", handle)
    app.router.add_post("/api/v2/alerts", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


async def test_webhook_posts_json_with_the_alert_fields(receiver: Receiver) -> None:
    """The webhook body lists alerts with rule, labels, state, value, threshold, times."""
    sink = WebhookSink(receiver.url + "/hook", timeout_s=2)
    try:
        await sink.send([note()])
    finally:
        await sink.close()
    alert = receiver.bodies[0]["alerts"][0]
    assert alert["rule"] == "slow"
    assert alert["labels"]["prompt"] == "p"
    assert (alert["state"], alert["value"], alert["threshold"]) == ("firing", 1500.0, 1000.0)
    assert alert["started_at"] == T0
    assert alert["resolved_at"] is None


@pytest.mark.parametrize(("status", "retriable"), [(500, True), (429, True), (400, False)])
async def test_webhook_errors_say_whether_to_retry(
    receiver: Receiver, status: int, retriable: bool
) -> None:
    """5xx and 429 are retriable, other 4xx are not."""
    receiver.status = status
    sink = WebhookSink(receiver.url + "/hook", timeout_s=2)
    try:
        with pytest.raises(SinkError) as err:
            await sink.send([note()])
    finally:
        await sink.close()
    assert err.value.retriable is retriable


async def test_unreachable_webhook_is_a_retriable_error() -> None:
    """A refused connection is retriable."""
    sink = WebhookSink("http://127.0.0.1:9/hook", timeout_s=1)
    try:
        with pytest.raises(SinkError) as err:
            await sink.send([note()])
    finally:
        await sink.close()
    assert err.value.retriable


async def test_alertmanager_gets_postable_alerts(receiver: Receiver) -> None:
    """Alertmanager v2 alerts carry labels, annotations, startsAt and endsAt when resolved."""
    sink = AlertmanagerSink(receiver.url, timeout_s=2, generator_url="http://promptd/v1/alerts")
    try:
        await sink.send([note(), note("resolved")])
    finally:
        await sink.close()
    firing, resolved = receiver.bodies[0]
    assert firing["labels"]["alertname"] == "slow"
    assert firing["startsAt"].endswith("Z")
    assert "endsAt" not in firing
    assert resolved["endsAt"].endswith("Z")
    assert firing["generatorURL"] == "http://promptd/v1/alerts"


async def test_kafka_sink_keys_by_fingerprint_and_wraps_errors() -> None:
    """The Kafka sink sends JSON keyed by fingerprint; producer errors become SinkError."""
    sent: list[tuple[str, bytes, bytes]] = []

    async def send(topic: str, key: bytes, value: bytes) -> None:
        sent.append((topic, key, value))

    await KafkaSink("alerts", send).send([note()])
    assert sent[0][:2] == ("alerts", b"abc")

    async def broken(topic: str, key: bytes, value: bytes) -> None:
        raise RuntimeError("down")

    with pytest.raises(SinkError):
        await KafkaSink("alerts", broken).send([note()])
