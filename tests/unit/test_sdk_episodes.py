"""Episodes in the SDK: the scope, inheritance by nested calls, routing by episode, and
feedback on a whole episode (no broker, a recording publisher)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

import promptd
from promptd.events import FeedbackEvent, MetricEvent, decode_event
from promptd.routing import Routing, in_candidate
from promptd.sdk import Client, SdkConfig, instrument
from promptd.sdk.encode import FEEDBACK, Encoder

# Positions in the buffered tuples (see promptd.sdk.encode).
PROMPT, VARIANT, REQUEST_ID, UNIT_ID, EPISODE_ID = 2, 3, 5, 6, 16
FB_REQUEST_ID, FB_SCORE, FB_PROMPT, FB_EPISODE_ID = 2, 3, 7, 10

Recorded = tuple[Client, list[tuple[Any, ...]]]


@pytest.fixture
def client() -> Iterator[Recorded]:
    """The default client without Kafka, its publisher recording the buffered tuples."""
    sdk = promptd.configure(SdkConfig(bootstrap_servers=None, registry=False))
    items: list[tuple[Any, ...]] = []
    sdk.publisher.put = items.append  # type: ignore[method-assign]
    yield sdk, items
    promptd.shutdown(0.1)


def test_calls_in_an_episode_carry_its_id(client: Recorded) -> None:
    """Every call inside ``with promptd.episode()`` carries ``ep.id``; calls outside none."""
    sdk, items = client

    @instrument(prompt="extract", client=sdk)
    def extract(text: str) -> str:
        return text

    @instrument(prompt="answer", client=sdk)
    def answer(facts: str) -> str:
        return facts

    with promptd.episode() as ep:
        assert promptd.current_episode_id() == ep.id
        answer(extract("x"))
    extract("y")
    assert promptd.current_episode_id() is None
    assert [(i[PROMPT], i[EPISODE_ID]) for i in items] == [
        ("extract", ep.id),
        ("answer", ep.id),
        ("extract", None),
    ]
    assert len(ep.id) == 32
    assert int(ep.id, 16) >= 0


def test_explicit_ids_and_nested_scopes(client: Recorded) -> None:
    """An explicit id is used as given; a nested episode has its own id until it ends;
    ids longer than the contract's 128 characters or empty are refused at once."""
    sdk, items = client

    @instrument(prompt="p", client=sdk)
    def call() -> None:
        return None

    with promptd.episode("ep-123") as outer:
        call()
        with promptd.episode() as inner:
            call()
        call()
    assert outer.id == "ep-123"
    assert [i[EPISODE_ID] for i in items] == ["ep-123", inner.id, "ep-123"]
    for bad in ("", "x" * 129):
        with pytest.raises(ValueError, match="1 to 128 characters"):
            promptd.episode(bad)


def test_nested_instrumented_calls_share_an_implicit_episode(client: Recorded) -> None:
    """A decorated function calling another opens an episode: the nested calls and the
    outer call carry the outer call's request id; a call with nothing nested carries none."""
    sdk, items = client

    @instrument(prompt="retrieve", client=sdk)
    def retrieve(q: str) -> str:
        return q

    @instrument(prompt="agent", client=sdk)
    def agent(q: str) -> str:
        return retrieve(retrieve(q))

    agent("q")
    retrieve("alone")
    *nested, outer, alone = items
    assert outer[PROMPT] == "agent"
    assert [n[EPISODE_ID] for n in nested] == [outer[REQUEST_ID]] * 2
    assert outer[EPISODE_ID] == outer[REQUEST_ID]
    assert alone[EPISODE_ID] is None


def test_current_episode_id_inside_a_call_opens_its_episode(client: Recorded) -> None:
    """Asking for the episode inside an outermost call names its implicit episode, which
    the call then carries (so feedback can target it)."""
    sdk, items = client
    seen: list[str | None] = []

    @instrument(prompt="p", client=sdk)
    def call() -> None:
        seen.append(promptd.current_episode_id())

    call()
    assert seen == [items[0][REQUEST_ID]]
    assert items[0][EPISODE_ID] == items[0][REQUEST_ID]


async def test_async_episodes_follow_their_task(client: Recorded) -> None:
    """``async with promptd.episode()`` scopes the task's calls; concurrent tasks in their
    own episodes never mix ids."""
    sdk, items = client

    @instrument(prompt="p", client=sdk)
    async def call(tag: str) -> str:
        await asyncio.sleep(0.001)
        return tag

    async def work(tag: str) -> str:
        async with promptd.episode(f"ep-{tag}") as ep:
            for _ in range(5):
                await call(tag)
            return ep.id

    ids = await asyncio.gather(*(work(str(i)) for i in range(8)))
    assert sorted(ids) == sorted(f"ep-{i}" for i in range(8))
    by_episode: dict[str, int] = {}
    for item in items:
        by_episode[item[EPISODE_ID]] = by_episode.get(item[EPISODE_ID], 0) + 1
    assert by_episode == {f"ep-{i}": 5 for i in range(8)}


def test_calls_of_an_episode_are_routed_together(client: Recorded) -> None:
    """Without a unit id, every call of an episode is routed by the episode id: both
    prompts of one episode land in the same arm, and the split follows the hash."""
    sdk, items = client
    for prompt in ("extract", "answer"):
        routing = Routing(
            prompt=prompt,
            active_version="v1",
            active_template="A {x}",
            candidate_version="v2",
            candidate_template="B {x}",
            weight=0.5,
            salt="pipeline-salt",
        )
        sdk.routing.install(prompt, routing, 30.0)

    @instrument(prompt="extract", client=sdk)
    def extract() -> None:
        return None

    @instrument(prompt="answer", client=sdk)
    def answer() -> None:
        return None

    episodes = [f"ep-{i}" for i in range(400)]
    for eid in episodes:
        with promptd.episode(eid):
            extract()
            answer()
    expected = ["v2" if in_candidate("pipeline-salt", e, 0.5) else "v1" for e in episodes]
    assert [i[VARIANT] for i in items[0::2]] == expected
    assert [i[VARIANT] for i in items[1::2]] == expected
    assert 0.4 < expected.count("v2") / len(episodes) < 0.6


def test_unit_id_still_wins_over_the_episode(client: Recorded) -> None:
    """A call with a unit id is routed by it, in an episode or not."""
    sdk, items = client
    routing = Routing(
        prompt="p",
        active_version="v1",
        active_template="A",
        candidate_version="v2",
        candidate_template="B",
        weight=0.5,
        salt="s",
    )
    sdk.routing.install("p", routing, 30.0)

    @instrument(prompt="p", unit_id="user", client=sdk)
    def call(user: str) -> None:
        return None

    users = [f"user-{i}" for i in range(200)]
    for user in users:
        with promptd.episode():
            call(user)
    assert [i[VARIANT] for i in items] == [
        "v2" if in_candidate("s", u, 0.5) else "v1" for u in users
    ]
    assert all(i[UNIT_ID] == u for i, u in zip(items, users, strict=True))


def test_feedback_on_an_episode(client: Recorded) -> None:
    """``feedback(episode_id=..., score=...)`` and ``ep.feedback(score)`` buffer feedback
    without a request id; the positional call form still names a request."""
    _, items = client
    with promptd.episode("ep-9") as ep:
        pass
    promptd.feedback(episode_id="ep-9", score=0.25, comment="meh")
    ep.feedback(1.0, kind="thumbs")
    promptd.feedback("req-1", 0.5, "rating", prompt="p", variant="v1")
    assert [(i[0], i[FB_REQUEST_ID], i[FB_SCORE], i[FB_EPISODE_ID]) for i in items] == [
        (FEEDBACK, None, 0.25, "ep-9"),
        (FEEDBACK, None, 1.0, "ep-9"),
        (FEEDBACK, "req-1", 0.5, None),
    ]


def test_feedback_without_a_score_is_a_type_error(client: Recorded) -> None:
    """A missing score is refused like a missing argument; nothing is buffered."""
    _, items = client
    with pytest.raises(TypeError, match="needs a score"):
        promptd.feedback(episode_id="ep-1")
    assert items == []


def _encoded(encoder: Encoder, item: tuple[Any, ...]) -> tuple[str, bytes, Any]:
    record = encoder.encode(item)
    assert not isinstance(record, str), record
    topic, key, value = record
    return topic, key, decode_event(value)


def test_episode_feedback_encodes_without_prompt_and_is_keyed_by_episode() -> None:
    """Episode feedback needs no prompt or variant; it is keyed by its prompt when given,
    else by the episode id. Call feedback still needs a known call, and feedback naming
    neither a call nor an episode is dropped as invalid."""
    encoder = Encoder(SdkConfig(feedback_topic="f", metrics_topic="m"))
    base = (FEEDBACK, 1_795_000_000.0, None, 0.75, "thumbs", None, {"answer": "42"})
    topic, key, event = _encoded(encoder, (*base, None, None, None, "ep-1"))
    assert (topic, key) == ("f", b"ep-1")
    assert isinstance(event, FeedbackEvent)
    assert (event.request_id, event.episode_id, event.prompt, event.variant) == (
        None,
        "ep-1",
        None,
        None,
    )
    assert event.correction == {"answer": "42"}
    _, key, event = _encoded(encoder, (*base, "answer", None, None, "ep-1"))
    assert key == b"answer"
    assert encoder.encode((*base, None, None, None, None)) == "invalid"
    unknown = (FEEDBACK, 1_795_000_000.0, "req-x", 0.5, "q", None, None, None, None, None, "ep")
    assert encoder.encode(unknown) == "unknown_request"


def test_metric_carries_the_episode_id_on_the_wire(client: Recorded) -> None:
    """The encoded metric of a call in an episode has ``episode_id``; others omit it."""
    sdk, items = client

    @instrument(prompt="p", client=sdk)
    def call() -> None:
        return None

    with promptd.episode("ep-7"):
        call()
    call()
    encoder = Encoder(SdkConfig(metrics_topic="m"))
    events = [_encoded(encoder, item)[2] for item in items]
    assert all(isinstance(e, MetricEvent) for e in events)
    assert [e.episode_id for e in events] == ["ep-7", None]
    record = encoder.encode(items[1])
    assert not isinstance(record, str)
    assert "episode_id" not in json.loads(record[2])
