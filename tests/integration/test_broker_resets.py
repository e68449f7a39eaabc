"""Broker resets and record codecs, through real brokers and a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c

from promptd.daemon.broker import EmbeddedBroker
from promptd.daemon.kafka import ensure_topics
from promptd.events import new_event_id
from tests.conftest import wait_for
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.integration

CODECS = ("gzip", "snappy", "lz4", "zstd")


def metric_values(n: int, tag: str) -> list[bytes]:
    """``n`` valid MetricEvents as JSON, with fresh event ids."""
    now = time.time()
    return [
        json.dumps(
            {
                "event_id": new_event_id(),
                "type": "metric",
                "ts": now - 60 + i * 0.01,
                "prompt": "summarization",
                "variant": "v1",
                "model": "m",
                "request_id": f"{tag}-{i}",
                "latency_ms": 5,
                "success": True,
            }
        ).encode()
        for i in range(n)
    ]


@pytest.fixture
def private_broker() -> Iterator[Callable[..., EmbeddedBroker]]:
    """Factory of brokers owned by the test (restartable), all stopped at teardown."""
    started: list[EmbeddedBroker] = []

    def factory(port: int | None = None) -> EmbeddedBroker:
        broker = EmbeddedBroker(port=port)
        broker.start()
        started.append(broker)
        return broker

    yield factory
    for broker in started:
        broker.stop()


async def stored_metrics(running: Any) -> int:
    """Rows in the daemon's metric_events table."""
    return int((await running.daemon.repo.count_events())[0])


def sample(running: Any, name: str, **labels: str) -> float:
    """A sample of the daemon's Prometheus registry (0 when absent)."""
    return running.daemon.registry.get_sample_value(name, labels) or 0.0


async def test_broker_restarting_empty_is_reread_counted_logged_and_alerted(
    make_settings, start_daemon, private_broker
) -> None:
    """A broker that restarts empty under a running daemon: the partition is re-read from
    its start, so every event published after the restart is stored; the reset is counted,
    logged as kafka_offset_reset and published as an alert."""
    broker = private_broker()
    settings = make_settings(kafka={"bootstrap_servers": broker.bootstrap_servers})
    running = await start_daemon(settings)
    bootstrap, topic = broker.bootstrap_servers, settings.kafka.metrics_topic
    await produce(bootstrap, topic, metric_values(50, "before"))
    await wait_for(lambda: _has(running, 50), timeout=30)

    with structlog.testing.capture_logs() as logs:
        broker.stop()
        broker = private_broker(port=broker.port)
        # As after any broker restart: the topics come back (the design's test notes).
        await ensure_topics(settings.kafka, bootstrap)
        await produce(bootstrap, topic, metric_values(20, "after"))
        await wait_for(lambda: _has(running, 70), timeout=40)

    resets = [e for e in logs if e["event"] == "kafka_offset_reset"]
    assert resets, [e["event"] for e in logs]
    assert resets[0]["topic"] == topic
    assert resets[0]["stored_offset"] == 50
    assert resets[0]["high_watermark"] < 50
    assert (
        sample(
            running,
            "promptd_kafka_offset_resets_total",
            topic=topic,
            reason="log_behind_stored_offset",
        )
        >= 1
    )
    alerts = await read_all(bootstrap, settings.kafka.alerts_topic, 1, timeout=20)
    bodies = [json.loads(a.value) for a in alerts]
    assert any(b["rule"] == "kafka_offset_reset" and b["labels"]["topic"] == topic for b in bodies)
    assert running.daemon.readiness() == (True, "ok")


async def _has(running: Any, n: int) -> bool:
    count = await stored_metrics(running)
    assert count <= n, f"stored {count} > {n}: an event was counted twice"
    return count == n


async def test_records_of_every_codec_from_librdkafka_and_aiokafka_are_stored(
    make_settings, start_daemon
) -> None:
    """gzip, snappy, lz4 and zstd batches, produced by librdkafka (confluent-kafka) and by
    aiokafka, are all decoded and stored; nothing is dead-lettered."""
    from confluent_kafka import Producer as RdKafkaProducer

    settings = make_settings()
    running = await start_daemon(settings)
    bootstrap, topic = settings.kafka.bootstrap_servers, settings.kafka.metrics_topic

    def librdkafka(codec: str, values: list[bytes]) -> None:
        producer = RdKafkaProducer(
            {
                "bootstrap.servers": bootstrap,
                "compression.type": codec,
                "linger.ms": 50,
                "enable.idempotence": False,
                "log_level": 0,
            }
        )
        for value in values:
            producer.produce(topic, value, key=b"summarization")
        assert producer.flush(30) == 0

    for codec in CODECS:
        await asyncio.to_thread(librdkafka, codec, metric_values(25, f"rd-{codec}"))
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, compression_type=codec)
        await producer.start()
        try:
            batch = [await producer.send(topic, v, key=b"k") for v in metric_values(25, codec)]
            await asyncio.gather(*batch)
        finally:
            await producer.stop()

    await wait_for(lambda: _has(running, 200), timeout=30)
    status = await running.daemon.status()
    assert status["events"]["dead_lettered"] == 0
    assert running.daemon.health() == (True, "ok")


def corrupt_gzip_batch(records: int) -> bytes:
    """A record batch flagged gzip whose payload is not gzip, with a valid CRC (so only
    decoding can notice)."""
    builder = DefaultRecordBatchBuilder(2, 1, 0, -1, -1, -1, 1 << 20)
    for i in range(records):
        builder.append(i, timestamp=int(time.time() * 1000), key=b"k", value=b"x" * 100, headers=[])
    buf = bytearray(builder.build())
    records_at = 61  # the v2 batch header is 61 bytes; the CRC covers attributes onwards
    buf[records_at:] = bytes(len(buf) - records_at)
    struct.pack_into(">I", buf, 17, calc_crc32c(bytes(buf[21:])))
    return bytes(buf)


async def produce_raw(bootstrap: str, topic: str, partition: int, batch: bytes) -> int:
    """Send one raw record batch (acks=all); returns its base offset."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        await client.force_metadata_update()
        node = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        answer = await client.send(
            node, ProduceRequest(None, -1, 10_000, [(topic, [(partition, batch)])])
        )
        part = answer.topics[0][1][0]
        assert part[1] == 0, part
        return int(part[2])
    finally:
        await client.close()


async def test_an_undecodable_batch_halts_ingestion_loudly_and_skips_nothing(
    make_settings, start_daemon
) -> None:
    """A corrupt compressed batch is never skipped: ingestion halts at it, /healthz and
    /readyz fail naming it within 15 s, it is counted and alerted, and the stored offset of
    its partition stays at the batch."""
    settings = make_settings()
    running = await start_daemon(settings)
    bootstrap, topic = settings.kafka.bootstrap_servers, settings.kafka.metrics_topic
    await produce(bootstrap, topic, metric_values(10, "ok"))
    await wait_for(lambda: _has(running, 10), timeout=30)
    partition = next(p for (t, p) in running.daemon.ingestor.state.next_offsets if t == topic)

    with structlog.testing.capture_logs() as logs:
        offset = await produce_raw(bootstrap, topic, partition, corrupt_gzip_batch(5))
        await produce(bootstrap, topic, metric_values(5, "behind"))
        started = time.monotonic()
        await wait_for(lambda: not running.daemon.readiness()[0], timeout=15)
    assert time.monotonic() - started < 15
    _ready, reason = running.daemon.readiness()
    assert "undecodable" in reason
    assert running.daemon.health()[0] is False
    assert sample(running, "promptd_kafka_undecodable_batches_total") == 1
    assert "ingest_halted" in [e["event"] for e in logs]
    assert any(
        e["event"] == "alert_firing" and e["rule"] == "kafka_undecodable_batch" for e in logs
    )
    await asyncio.sleep(1.0)
    assert await stored_metrics(running) == 10
    stored = await running.daemon.repo.load_offsets([(topic, partition)])
    assert stored[(topic, partition)] == offset
