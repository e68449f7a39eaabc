"""The SDK never drops silently: a bad score raises, each cause of a drop is warned once,
and a client that ends with undelivered events says so in one line."""

from __future__ import annotations

import logging
import math
import time

import pytest

import promptd
from promptd.sdk import Client, SdkConfig, instrument, notices
from promptd.sdk.encode import METRIC, Encoder
from promptd.sdk.stats import SdkStats


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with no cause warned about yet."""
    monkeypatch.setattr(notices, "_warned", set())


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "promptd.sdk"]


@pytest.mark.parametrize("score", [7, -0.1, 1.5, math.nan])
def test_feedback_score_out_of_range_raises(score: float) -> None:
    """A score outside 0..1 is a bad argument: ValueError naming the range."""
    with pytest.raises(ValueError, match=r"score must be from 0 to 1 .*got"):
        promptd.feedback("req-1", score)


def test_feedback_score_of_the_wrong_type_raises() -> None:
    """A score that is not a number (nor a bool) is a TypeError; a missing one too."""
    with pytest.raises(TypeError, match="score must be a number from 0 to 1"):
        promptd.feedback("req-1", "0.5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs a score"):
        promptd.feedback("req-1")


def test_valid_scores_do_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    """0, 1, a float between and a bool are accepted and buffered."""
    sent: list[object] = []
    client = Client(SdkConfig(registry=False))
    monkeypatch.setattr(client.publisher, "put", sent.append)
    monkeypatch.setattr("promptd.sdk.client._client", client)
    for score in (0, 1, 0.25, True):
        promptd.feedback("req-1", score, prompt="p", variant="v1")
    assert len(sent) == 4
    client.close(0.1)


def test_no_bootstrap_warns_once_and_the_close_sums_up(caplog: pytest.LogCaptureFixture) -> None:
    """Without a Kafka address the first dropped event is warned about (naming the
    variable to set), later ones are only counted, and closing the client says how many
    were not delivered and why."""
    client = Client(SdkConfig(registry=False))

    @instrument(prompt="p", client=client)
    def call() -> None:
        return None

    with caplog.at_level(logging.WARNING, "promptd.sdk"):
        call()
        call()
        first = list(_warnings(caplog))
        client.close(0.1)
    assert len(first) == 1
    assert "PROMPTD_KAFKA_BOOTSTRAP_SERVERS" in first[0]
    assert "no_bootstrap" in first[0]
    summary = _warnings(caplog)[1:]
    assert summary == [
        "promptd SDK: 2 of 2 events were not delivered: 2 no_bootstrap ("
        + notices.DROP_EXPLANATIONS["no_bootstrap"]
        + ")"
    ]


def test_everything_delivered_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """A client that dropped nothing closes silently."""
    with caplog.at_level(logging.WARNING, "promptd.sdk"):
        Client(SdkConfig(registry=False)).close(0.1)
    assert _warnings(caplog) == []


def test_an_invalid_event_is_warned_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    """The sender's first invalid event is warned about with what was wrong with it."""
    encoder = Encoder(SdkConfig())
    item = (METRIC, time.time(), "p" * 300, "v1", "m", "r1", None, 1.0, True, None)
    assert encoder.encode((*item, None, None, None, None, None, None, None)) == "invalid"
    assert encoder.last_invalid is not None
    assert encoder.last_invalid.startswith("a metric event: prompt: ")
    assert "Value error" not in encoder.last_invalid
    client = Client(SdkConfig(registry=False))
    with caplog.at_level(logging.WARNING, "promptd.sdk"):
        client.publisher.settle(0, 0, {"invalid": 1}, {"invalid": encoder.last_invalid})
        client.publisher.settle(0, 0, {"invalid": 1}, {"invalid": encoder.last_invalid})
    (warning,) = _warnings(caplog)
    assert encoder.last_invalid in warning
    client.close(0.1)


def test_undelivered_summary_names_counts_reasons_and_the_last_kafka_error() -> None:
    """The exit line: lost count of emitted, each reason with its count, what is still
    buffered, and the last connection error with the address."""
    stats = SdkStats(
        emitted=12,
        delivered=2,
        dropped=9,
        buffered=1,
        dropped_by_reason={"shutdown": 7, "send_failed": 2, "queue_full": 0},
    )
    line = notices.undelivered_summary(
        stats, "localhost:9092", {"connect": "KafkaConnectionError: Unable to bootstrap"}
    )
    assert line == (
        "10 of 12 events were not delivered: 2 send_failed ("
        + notices.DROP_EXPLANATIONS["send_failed"]
        + "); 7 shutdown ("
        + notices.DROP_EXPLANATIONS["shutdown"]
        + "); 1 still buffered; last Kafka error at localhost:9092: "
        "KafkaConnectionError: Unable to bootstrap"
    )
    clean = SdkStats(emitted=3, delivered=3, dropped=0, buffered=0)
    assert notices.undelivered_summary(clean, "localhost:9092", {}) is None
