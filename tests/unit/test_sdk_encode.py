"""Sender-side encoding, configuration and the Prometheus export of the SDK."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from promptd.events import FeedbackEvent, MetricEvent, decode_event
from promptd.sdk import Client, SdkConfig
from promptd.sdk.encode import FEEDBACK, METRIC, Encoder
from promptd.sdk.stats import StatsCollector


def _metric(request_id: str = "r1", **over: Any) -> tuple[Any, ...]:
    fields: dict[str, Any] = {
        "ts": time.time(),
        "prompt": "summarization",
        "variant": "v1",
        "model": "gpt",
        "request_id": request_id,
        "unit_id": "u1",
        "latency_ms": 12.5,
        "success": True,
        "error": None,
        "tokens_in": 3,
        "tokens_out": 4,
        "cost_usd": None,
        "input": None,
        "output": None,
        "attributes": None,
        "episode_id": None,
        "sizing": None,
    }
    fields.update(over)
    return (METRIC, *fields.values())


def _feedback(request_id: str, score: Any = 0.8, **over: Any) -> tuple[Any, ...]:
    fields: dict[str, Any] = {
        "ts": time.time(),
        "request_id": request_id,
        "score": score,
        "kind": "thumbs",
        "comment": None,
        "correction": None,
        "prompt": None,
        "variant": None,
        "model": None,
        "episode_id": None,
    }
    fields.update(over)
    return (FEEDBACK, *fields.values())


def test_metric_round_trips_through_the_daemon_decoder() -> None:
    """An encoded metric is a valid wire event, keyed by prompt, with a fresh event id."""
    encoder = Encoder(SdkConfig(metrics_topic="m"))
    first = encoder.encode(_metric())
    second = encoder.encode(_metric())
    assert not isinstance(first, str)
    assert not isinstance(second, str)
    topic, key, value = first
    assert (topic, key) == ("m", b"summarization")
    event = decode_event(value)
    assert isinstance(event, MetricEvent)
    assert (event.request_id, event.unit_id, event.tokens_in) == ("r1", "u1", 3)
    assert json.loads(first[2])["event_id"] != json.loads(second[2])["event_id"]


def test_input_chars_are_counted_in_the_sender() -> None:
    """The input size is counted when the event is encoded; a counting function that
    fails or returns no count gives no size, and the call is still sent."""
    encoder = Encoder(SdkConfig(metrics_topic="m"))

    def count(text: str, n: int) -> int:
        return len(text) * n

    def sent(sizing: Any) -> int | None:
        record = encoder.encode(_metric(sizing=sizing))
        assert not isinstance(record, str)
        event = decode_event(record[2])
        assert isinstance(event, MetricEvent)
        return event.input_chars

    assert sent((count, ("abc",), {"n": 2})) == 6
    assert sent((count, (), {})) is None  # a TypeError inside the app's function
    assert sent((lambda: "12", (), {})) is None
    assert sent((lambda: -1, (), {})) is None
    assert sent(None) is None


def test_feedback_joins_the_remembered_call() -> None:
    """Feedback without prompt/variant takes them from the call with its request id."""
    encoder = Encoder(SdkConfig(feedback_topic="f"))
    encoder.encode(_metric("r7", variant="v3"))
    record = encoder.encode(_feedback("r7", score=True))
    assert not isinstance(record, str)
    event = decode_event(record[2])
    assert isinstance(event, FeedbackEvent)
    assert (event.prompt, event.variant, event.model, event.score) == (
        "summarization",
        "v3",
        "gpt",
        1.0,
    )


def test_feedback_unknown_request_and_lru_bound() -> None:
    """Unknown request ids are a drop reason; the LRU forgets the oldest calls."""
    encoder = Encoder(SdkConfig(feedback_lru_size=2))
    for rid in ("a", "b", "c"):
        encoder.encode(_metric(rid))
    assert encoder.encode(_feedback("a")) == "unknown_request"
    assert not isinstance(encoder.encode(_feedback("c")), str)
    explicit = encoder.encode(_feedback("zzz", prompt="p", variant="v9"))
    assert not isinstance(explicit, str)


def test_invalid_events_become_a_reason() -> None:
    """Events the model rejects are reported as 'invalid', not raised."""
    encoder = Encoder(SdkConfig())
    assert encoder.encode(_metric(prompt="p" * 500)) == "invalid"
    assert encoder.encode(_feedback("r", score=3.0, prompt="p", variant="v")) == "invalid"


def test_capture_is_redacted_and_capped() -> None:
    """The redaction hook runs first; oversized captures are cut to the cap."""

    def redact(field: str, value: Any) -> Any:
        return (
            {k: "***" if k == "email" else v for k, v in value.items()}
            if field == "input"
            else value
        )

    encoder = Encoder(SdkConfig(redact=redact, capture_max_bytes=1024))
    record = encoder.encode(_metric(input={"email": "a@b.c", "text": "hi"}, output="x" * 5000))
    assert not isinstance(record, str)
    body = json.loads(record[2])
    assert body["input"] == {"email": "***", "text": "hi"}
    assert 900 < len(body["output"]) <= 1024


def test_config_from_env_and_overrides() -> None:
    """PROMPTD_ variables configure the SDK; arguments win; typos are rejected."""
    env = {
        "PROMPTD_KAFKA_BOOTSTRAP_SERVERS": "k:9092",
        "PROMPTD_KAFKA__METRICS_TOPIC": "mm",
        "PROMPTD_DAEMON_URL": "http://d:8787",
        "PROMPTD_KAFKA_ENABLE_IDEMPOTENCE": "true",
        "PROMPTD_SDK_QUEUE_SIZE": "7",
    }
    config = SdkConfig.from_env(env, feedback_topic="ff")
    assert config.bootstrap_servers == "k:9092"
    assert config.metrics_topic == "mm"
    assert config.feedback_topic == "ff"
    assert config.daemon_url == "http://d:8787"
    assert config.enable_idempotence is True
    assert config.queue_size == 7
    assert SdkConfig.from_env({"PROMPTD_KAFKA_BOOTSTRAP_SERVERS": ""}).bootstrap_servers is None
    with pytest.raises(TypeError, match="bootstrap"):
        SdkConfig.from_env({}, bootstrap="x")


def test_prometheus_collector_reports_the_identity() -> None:
    """The collector exports emitted, dropped by reason and buffered at scrape time."""
    client = Client(SdkConfig(bootstrap_servers=None, registry=False))
    registry = CollectorRegistry()
    registry.register(StatsCollector(client.stats))
    client.publisher.put(_metric())
    client.publisher.put(_metric())
    assert registry.get_sample_value("promptd_sdk_events_emitted_total") == 2
    assert (
        registry.get_sample_value("promptd_sdk_events_dropped_total", {"reason": "no_bootstrap"})
        == 2
    )
    assert registry.get_sample_value("promptd_sdk_events_buffered") == 0
    client.close(0.1)


def test_import_is_light() -> None:
    """Importing promptd loads none of the heavy libraries (pydantic, msgspec, aiokafka, …)."""
    heavy = [
        "pydantic",
        "msgspec",
        "aiokafka",
        "aiohttp",
        "scipy",
        "litellm",
        "aiosqlite",
        "asyncio",
        "promptd.daemon",
    ]
    code = f"import sys, promptd; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_environment_check_does_not_load_the_daemon() -> None:
    """Checking the app's PROMPTD_ variables (a typo is warned about, with the daemon's
    names known) loads neither the daemon nor its heavy dependencies."""
    heavy = ["promptd.daemon", "pydantic_settings", "scipy", "litellm", "aiosqlite"]
    code = (
        "import sys, promptd\n"
        "promptd.sdk.SdkConfig.from_env({'PROMPTD_HTTP_PROT': '1'})\n"
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert "did you mean PROMPTD_HTTP_PORT?" in out.stderr
