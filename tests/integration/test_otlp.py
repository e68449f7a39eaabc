"""An app instrumented only with OpenTelemetry, through a real broker and daemon.

Its spans come from the OpenTelemetry SDK and reach the daemon either through the real
OTLP/HTTP exporter posting to ``/v1/traces`` or as the Collector's Kafka exporter writes
them to the OTLP topic. The app reads its prompt version from the routing endpoint and
names it on its spans (``promptd.variant``), which is all a rollout needs.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from promptd.replacement.registry import NewVersion
from promptd.routing import Routing
from tests.conftest import wait_for
from tests.kafka_helpers import read_all
from tests.optimize_fake_llm import FakeLLM, serving
from tests.optimize_task import CITIES, TEMPLATE, responder, rows
from tests.otel_spans import (
    Recorder,
    collector_records,
    genai_call,
    openinference_call,
    other_spans,
)

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _export(url: str, spans: Sequence[ReadableSpan], headers: dict[str, str]) -> SpanExportResult:
    """The real OTLP/HTTP exporter (protobuf, gzip) posting to the daemon (blocking)."""
    exporter = OTLPSpanExporter(
        endpoint=f"{url}/v1/traces", headers=headers, timeout=10, compression=Compression.Gzip
    )
    try:
        return exporter.export(spans)
    finally:
        exporter.shutdown()


async def _produce(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def _get(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_otel_only_app_appears_in_windows_and_its_rollout_is_promoted(
    make_settings: Any, start_daemon: Any
) -> None:
    """Spans posted by the OTLP/HTTP exporter become calls in the monitor's windows; a
    candidate the app's own evaluations score higher (evaluation events on the spans:
    source ``eval:Relevance``, chosen as the rollout's signal) wins a fixed split
    experiment attributed through ``promptd.variant``, and is promoted."""
    settings = make_settings(
        http={"admin_token": TOKEN},
        rollout={"tick_interval_s": 0.1, "time_scale": 0.001},
        evaluation={
            "external": ["Relevance"],
            "signals": [{"prompts": ["summarize"], "rollout": ["eval:Relevance"]}],
        },
    )
    running = await start_daemon(settings)
    url = running.url
    rec = Recorder()
    assert await asyncio.to_thread(_export, url, [], AUTH) == SpanExportResult.SUCCESS
    genai_call(rec.tracer)
    unauthorized = await asyncio.to_thread(_export, url, rec.take(), {})
    assert unauthorized == SpanExportResult.FAILURE
    async with aiohttp.ClientSession(url, headers=AUTH) as http:
        for template in ("Summarize {document}.", "Summarize {document} in one line."):
            async with http.post("/v1/prompts/summarize/versions", json={"template": template}):
                pass
        experiment = {"candidate_share": 0.5, "min_samples_per_arm": 100, "min_duration_s": 0}
        body = {"prompt": "summarize", "candidate_version": "v2", "experiment": experiment}
        async with http.post("/v1/rollouts", json=body) as resp:
            assert resp.status == 201
            rollout = await resp.json()
        rng = random.Random(5)
        for wave in range(20):
            # The app's own routing read (no promptd SDK): which version serves whom.
            routing = Routing.model_validate(await _get(http, "/v1/prompts/summarize/routing"))
            for user in range(wave * 300, wave * 300 + 300):
                unit = f"user-{user}"
                version, _ = routing.choose(unit)
                good = rng.random() < (0.9 if version == "v2" else 0.3)
                genai_call(
                    rec.tracer,
                    variant=version,
                    unit=unit,
                    score=float(good),
                    start_ns=time.time_ns(),
                )
            assert await asyncio.to_thread(_export, url, rec.take(), AUTH) == (
                SpanExportResult.SUCCESS
            )
            if wave == 0:
                stats = await wait_for(lambda: _stats_with(http, 300), timeout=20)
                # The span evaluations are the app's evaluator's, not people's feedback.
                assert stats["total"]["feedback_count"] == 0
                assert set(stats["variants"]) == {"v1", "v2"}
            state = await _get(http, f"/v1/rollouts/{rollout['id']}")
            if state["status"] != "running":
                break
        assert state["status"] == "promoted", state["decisions"][-3:]
        assert state["signals"] == ["eval:Relevance"]
        routing = Routing.model_validate(await _get(http, "/v1/prompts/summarize/routing"))
        assert routing.active_version == "v2"
        status = await _get(http, "/v1/status")
        assert status["otlp"]["spans.call"] >= 300


async def _stats_with(http: aiohttp.ClientSession, n: int) -> Any:
    stats = await _get(http, "/v1/prompts/summarize/stats?window=1h")
    total = stats["total"]
    return stats if total["request_count"] >= n else None


async def test_collector_framed_records_are_stored_once_and_bad_ones_dead_lettered(
    make_settings: Any, start_daemon: Any
) -> None:
    """otlp_json records keyed by trace id (partition_traces_by_id), produced twice,
    store each call and its feedback once; non-LLM spans are counted; a record that is
    not OTLP goes to the dead-letter topic with its reason and source."""
    settings = make_settings(kafka={"otlp_encoding": "otlp_json"})
    running = await start_daemon(settings)
    rec = Recorder()
    now = time.time_ns()
    for i in range(5):
        openinference_call(rec.tracer, prompt="city", variant="v1", score=1.0, start_ns=now + i)
    other_spans(rec.tracer, start_ns=now)
    records = collector_records(rec.request(), "otlp_json", by_trace=True)
    bootstrap = settings.kafka.bootstrap_servers
    topic = settings.kafka.otlp_topic
    await _produce(bootstrap, topic, [*records, *records, (None, b"{oops")])
    [dead] = await read_all(bootstrap, settings.kafka.dlq_topic, 1)
    headers = dict(dead.headers)
    assert headers["promptd-reason"] == b"not_json"
    assert headers["promptd-source-topic"] == topic.encode()
    genai_call(rec.tracer, start_ns=now)
    [(_, body)] = collector_records(rec.request(), "otlp_json")
    async with aiohttp.ClientSession(running.url) as http:
        # OTLP JSON over HTTP too: published to the topic, then stored like the rest.
        json_type = {"Content-Type": "application/json"}
        async with http.post("/v1/traces", data=body, headers=json_type) as resp:
            assert (resp.status, await resp.json()) == (200, {})
        async with http.post("/v1/traces", data=b'{"resourceSpans": 1}', headers=json_type) as resp:
            assert resp.status == 400
        async with http.post(
            "/v1/traces", data=body, headers={"Content-Type": "text/plain"}
        ) as resp:
            assert resp.status == 415
        status = await wait_for(lambda: _status_with(http), timeout=20)
    assert status["events"]["stored_metrics"] == 6
    assert status["events"]["stored_feedback"] == 5
    assert status["events"]["duplicates"] == 10
    assert status["otlp"]["spans.not_llm"] == 6
    assert status["events"]["dead_lettered_by_reason"] == {"not_json": 1}


async def _status_with(http: aiohttp.ClientSession) -> Any:
    status = await _get(http, "/v1/status")
    events = status["events"]
    done = events["duplicates"] >= 10 and events["stored_metrics"] >= 6
    return status if done else None


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    """The scripted model and proposer."""
    async with serving(responder) as server:
        yield server


async def test_optimization_run_uses_the_spans_captured_inputs_and_outputs(
    make_settings: Any, start_daemon: Any, fake_llm: FakeLLM
) -> None:
    """Calls captured only as OpenInference spans (template variables, output, span
    annotations) are the examples of an optimization run: the model is asked about their
    inputs, and the template it finds with them is deployed."""
    model = {"model": "openai/test-model", "api_base": fake_llm.api_base, "temperature": 0.0}
    settings = make_settings(
        monitoring={"feedback_volume_threshold": 1_000_000_000},
        optimization={
            "strategies": ["fewshot"],
            "evaluation": {"model": model, "metric": "token_f1", "bootstrap_samples": 200},
            "fewshot": {"num_candidates": 2},
            "splits": {"min_test": 10},
            "schedule_check_interval_s": 3600,
        },
    )
    running = await start_daemon(settings)
    daemon = running.daemon
    await daemon.components["registry"].register("city", NewVersion(template=TEMPLATE))
    rec = Recorder()
    now = time.time_ns()
    examples = rows(120)
    for i, row in enumerate(examples):
        # Right answers rated well are the references; the chatty ones rated low.
        right = i % 2 == 0
        city = CITIES[i % len(CITIES)]
        openinference_call(
            rec.tracer,
            prompt="city",
            variant="v1",
            variables=dict(row.input) if isinstance(row.input, dict) else {},
            answer=city if right else row.output,
            score=1.0 if right else 0.2,
            start_ns=now - 10**9 + i,
        )
    records = collector_records(rec.request(), "otlp_proto")
    await _produce(settings.kafka.bootstrap_servers, settings.kafka.otlp_topic, records)
    await wait_for(lambda: _count(daemon, "feedback_events", 120), timeout=20)
    async with aiohttp.ClientSession(running.url) as http:
        async with http.post("/v1/optimize/city", json={"strategies": ["fewshot"]}) as resp:
            assert resp.status == 202, await resp.text()
            run_id = (await resp.json())["run_id"]
        run = await wait_for(lambda: _finished(http, run_id), timeout=60)
    assert run["status"] == "completed", run
    # Every captured call is an example; the few-shot search on them beats the active
    # template on the untouched test split, and the winner goes to a rollout.
    assert run["progress"]["splits"]["examples"] == 120, run.get("progress")
    assert run["outcome"] == "deployed", run.get("progress")
    asked = json.dumps(fake_llm.requests)
    captured = [r.input["text"] for r in examples if isinstance(r.input, dict)]
    assert sum(text in asked for text in captured) >= 10


async def _count(daemon: Any, table: str, n: int) -> bool:
    async with daemon.db.reader.execute(f"SELECT count(*) FROM {table}") as cur:
        row = await cur.fetchone()
    return int(row[0]) >= n


async def _finished(http: aiohttp.ClientSession, run_id: str) -> Any:
    run = await _get(http, f"/v1/optimizations/{run_id}")
    return run if run["status"] != "running" else None
