"""Ingestion end to end through the real broker and a real SQLite file."""

from __future__ import annotations

import json
import time
import uuid

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from promptd.events import FeedbackEvent, MetricEvent, new_event_id
from tests.conftest import wait_for
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.integration

# Recent timestamps: the retention policy (30 days by default) deletes older events.
NOW = time.time()


def _metric(i: int, **over: object) -> dict[str, object]:
    body: dict[str, object] = {
        "event_id": new_event_id(),
        "type": "metric",
        "ts": NOW - 3600 + i * 0.1,
        "prompt": "summarization",
        "variant": "v1",
        "model": "gpt-4o-mini",
        "request_id": f"req-{i}",
        "unit_id": f"user-{i % 97}",
        "latency_ms": 100.0 + i % 50,
        "success": i % 10 != 0,
        "tokens_in": 10,
        "tokens_out": 20,
    }
    body.update(over)
    return body


def _feedback(i: int) -> dict[str, object]:
    return {
        "event_id": new_event_id(),
        "type": "feedback",
        "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 60)),
        "prompt": "summarization",
        "variant": "v1",
        "request_id": f"req-{i}",
        "score": (i % 5) / 4,
        "kind": "thumbs",
    }


MALFORMED: list[tuple[bytes | None, str]] = [
    (b"this is not json", "not_json"),
    (b"[1, 2, 3]", "not_object"),
    (json.dumps(_metric(1, latency_ms="fast")).encode(), "invalid"),
    (json.dumps({k: v for k, v in _metric(2).items() if k != "model"}).encode(), "invalid"),
    (json.dumps(_metric(3, prompt="p" * 201)).encode(), "invalid"),
    (json.dumps(_metric(4, type="trace")).encode(), "unknown_type"),
    (json.dumps(_metric(5, latency_ms=-1)).encode(), "invalid"),
    (json.dumps({**_feedback(6), "score": 1.5}).encode(), "invalid"),
    (json.dumps(_metric(7, error="x" * 100_000)).encode(), "invalid"),
    (json.dumps(_metric(8, attributes={"blob": "y" * 300_000})).encode(), "oversized"),
    (json.dumps({**_metric(9), "schema": 2}).encode(), "unknown_schema"),
    (json.dumps(_metric(10, success="yes")).encode(), "invalid"),
]


async def test_stores_each_valid_event_once_and_dead_letters_the_rest(
    make_settings, backend, start_daemon
) -> None:
    """Valid events are stored exactly once; malformed records go to the DLQ with a reason
    (on both storage backends)."""
    settings = make_settings(storage=backend)
    kafka = settings.kafka
    metrics = [json.dumps(_metric(i)).encode() for i in range(3000)]
    feedback = [json.dumps(_feedback(i)).encode() for i in range(500)]
    duplicates = metrics[:200] + feedback[:50]  # exact re-sends, as a retrying producer would
    running = await start_daemon(settings)
    await produce(kafka.bootstrap_servers, kafka.metrics_topic, metrics + duplicates[:200])
    await produce(kafka.bootstrap_servers, kafka.feedback_topic, feedback + duplicates[200:])
    await produce(kafka.bootstrap_servers, kafka.metrics_topic, [raw for raw, _ in MALFORMED])

    repo = running.daemon.repo
    await wait_for(lambda: _counts_are(repo, (3000, 500)), timeout=30)
    dead = await read_all(kafka.bootstrap_servers, kafka.dlq_topic, len(MALFORMED))
    assert len(dead) == len(MALFORMED)
    by_value = {rec.value: dict(rec.headers) for rec in dead}
    for raw, reason in MALFORMED:
        headers = by_value[raw]
        assert headers["promptd-reason"].decode() == reason, raw[:80]
        assert headers["promptd-source-topic"].decode() == kafka.metrics_topic
        assert int(headers["promptd-source-offset"]) >= 3200
        assert "promptd-source-partition" in headers

    total = len(metrics) + len(feedback) + len(duplicates) + len(MALFORMED)
    await wait_for(lambda: _stored_offsets_total(repo, total), timeout=10)
    async with aiohttp.ClientSession() as http, http.get(running.url + "/v1/status") as resp:
        status = await resp.json()
    assert status["events"]["stored"] == 3500
    assert status["events"]["duplicates"] == 250
    assert status["events"]["dead_lettered"] == len(MALFORMED)
    assert status["kafka"]["connected"] is True
    assert status["kafka"]["lag"] == 0
    await running.stop()

    # Offsets were also committed to Kafka for lag visibility.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers, group_id=kafka.group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        committed = 0
        for partition in range(kafka.topic_partitions):
            for topic in kafka.event_topics:
                committed += await consumer.committed(TopicPartition(topic, partition)) or 0
    finally:
        await consumer.stop()
    assert committed == total


async def _counts_are(repo, expected: tuple[int, int]) -> bool:
    return await repo.count_events() == expected


async def _stored_offsets_total(repo, total: int) -> bool:
    return sum((await repo.load_offsets()).values()) == total


async def test_hard_stop_mid_ingestion_loses_nothing_and_counts_nothing_twice(
    make_settings, backend, start_daemon
) -> None:
    """A daemon cancelled without its shutdown path resumes from storage: each event once
    (on both storage backends)."""
    settings = make_settings(kafka={"max_batch_records": 200}, storage=backend)
    kafka = settings.kafka
    values = [json.dumps(_metric(i)).encode() for i in range(6000)]
    await produce(kafka.bootstrap_servers, kafka.metrics_topic, values)
    first = await start_daemon(settings)
    await wait_for(lambda: _has_some(first.daemon.repo), timeout=30, interval=0.005)
    await first.kill()
    stored_after_kill = (await _count(settings))[0]
    assert stored_after_kill >= 400

    second = await start_daemon(settings)
    await wait_for(lambda: _counts_are(second.daemon.repo, (6000, 0)), timeout=30)
    counters = await second.daemon.repo.counters()
    # Replayed records are duplicates only for rows the first run stored without
    # recording their offsets, which one transaction makes impossible.
    assert counters.get("duplicates", 0) == 0
    assert counters["stored.metric"] == 6000
    await second.stop()


async def _has_some(repo) -> bool:
    metrics, _ = await repo.count_events()
    return metrics >= 400


async def _count(settings) -> tuple[int, int]:
    from promptd.storage.database import Database
    from promptd.storage.repository import EventRepository

    db = await Database.open(settings.storage.target)
    try:
        return await EventRepository(db).count_events()
    finally:
        await db.close()


async def test_models_round_trip_through_the_daemon(make_settings, start_daemon) -> None:
    """Events built with the public models and ``to_json`` are stored field for field."""
    settings = make_settings()
    running = await start_daemon(settings)
    metric = MetricEvent(
        event_id=new_event_id(),
        ts=NOW - 10.5,
        prompt="qa",
        variant="v2",
        model="m",
        request_id=uuid.uuid4().hex,
        latency_ms=12.5,
        success=False,
        error="TimeoutError",
        quality=0.25,
        cost_usd=0.002,
        input={"question": "why?"},
        output="because",
        attributes={"tenant": "acme"},
    )
    fb = FeedbackEvent(
        event_id=new_event_id(),
        ts=NOW - 9,
        prompt="qa",
        variant="v2",
        request_id=metric.request_id,
        score=0.0,
        kind="correction",
        correction={"answer": "because of X"},
    )
    await produce(
        settings.kafka.bootstrap_servers, settings.kafka.metrics_topic, [metric.to_json()]
    )
    await produce(settings.kafka.bootstrap_servers, settings.kafka.feedback_topic, [fb.to_json()])
    repo = running.daemon.repo
    await wait_for(lambda: _counts_are(repo, (1, 1)))
    async with repo.db.reader.execute(
        "SELECT m.error, m.quality, m.input, m.attributes, f.correction, f.kind "
        "FROM metric_events m JOIN feedback_events f USING (request_id)"
    ) as cur:
        row = await cur.fetchone()
    assert row == (
        "TimeoutError",
        0.25,
        '{"question":"why?"}',
        '{"tenant":"acme"}',
        '{"answer":"because of X"}',
        "correction",
    )
