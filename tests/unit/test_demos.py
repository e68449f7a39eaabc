"""Per-request demonstrations: declarations, demo turns, the vote, the SDK's variant."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry

from promptd.demos import (
    Demo,
    DemoSpec,
    EnsembleSpec,
    demo_turns,
    fields_of,
    input_text,
    vote,
    with_turns,
)
from promptd.events import MetricEvent
from promptd.routing import Routing
from promptd.sdk.config import SdkConfig
from promptd.sdk.encode import Encoder
from promptd.sdk.pools import build, pool_key
from promptd.sdk.routing_client import RoutingCache
from promptd.sdk.stats import Counters

CONFIG: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "Name the city."},
        {"role": "user", "content": "Message: {text}"},
    ],
    "demos": {"source": "pool", "pool": "pool-1", "k": 2, "retriever": "lexical"},
}
DEMOS = [
    Demo("r1", {"text": "ship boxes to Lyon"}, "Lyon"),
    Demo("r2", {"text": "the printer is broken"}, "none"),
    Demo("r3", {"text": "ship chairs to Oslo"}, "Oslo"),
]


def test_a_declaration_round_trips_and_fixed_demos_have_none() -> None:
    """``DemoSpec.of`` reads what ``to_dict`` writes; a config without a pool has none."""
    spec = DemoSpec.of(CONFIG)
    assert spec == DemoSpec("pool-1", 2, None, "lexical")
    assert DemoSpec.of({"demos": spec.to_dict()}) == spec
    assert DemoSpec.of({"messages": []}) is None
    assert DemoSpec.of({"demos": {"source": "pool"}}) is None  # not pinned: not served
    assert EnsembleSpec.of({"ensemble": {"n": 1}}) is None
    assert EnsembleSpec.of({"ensemble": {"n": 3}}) == EnsembleSpec(3, 0.7, "label")


def test_demo_turns_fill_the_final_template_and_go_before_the_input() -> None:
    """Each demo is a user turn (the template filled with its input, clipped) and an
    assistant turn; the turns go right before the final user message."""
    turns = demo_turns("Message: {text}", [DEMOS[0], Demo("x", "raw text", "A" * 10)], 5)
    assert turns == [
        {"role": "user", "content": "Message: ship…"},
        {"role": "assistant", "content": "Lyon"},
        {"role": "user", "content": "raw …"},
        {"role": "assistant", "content": "AAAA…"},
    ]
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert with_turns(messages, turns[:2]) == [messages[0], *turns[:2], messages[1]]
    assert with_turns(messages, []) is messages


def test_retrieval_compares_the_template_fields() -> None:
    """The text retrieval compares is the template's fields, or every value."""
    assert fields_of("Q: {question} ({lang}) {question}") == ("question", "lang")
    assert input_text({"question": "why", "lang": "en", "id": 7}, ("question",)) == "why"
    assert input_text({"b": 2, "a": "x"}, ("missing",)) == "x\n2"
    assert input_text("plain", ("text",)) == "plain"


def test_the_vote_keeps_the_most_frequent_answer() -> None:
    """Labels are compared without case, quotes or a final period; JSON as values; ties
    go to the answer seen first; no answers, no vote."""
    assert vote(["Lyon.", "paris", '"lyon"', "Paris", "LYON"]) == "Lyon."
    assert vote(['{"a": 1, "b": 2}', '{"b":2,"a":1}', '{"a": 3}'], "json") == '{"a": 1, "b": 2}'
    assert vote(["x", "y"]) == "x"
    assert vote([]) == ""


def _cache_with_pool() -> RoutingCache:
    cache = RoutingCache(SdkConfig(registry=CollectorRegistry()), Counters())
    spec = DemoSpec.of(CONFIG)
    assert spec is not None
    key = pool_key(spec, CONFIG)
    cache.pools[key] = build(key, {"demos": [d.to_dict() for d in DEMOS]}, None)
    routing = Routing(prompt="p", active_version="v2", active_config=CONFIG)
    cache.install("p", routing, 60.0)
    return cache


def test_the_sdk_serves_each_call_its_nearest_demos_and_records_their_ids() -> None:
    """A variant taking demos from a loaded pool puts the two nearest before the input;
    each call records its own demo ids, which the encoder puts in the event."""
    cache = _cache_with_pool()
    entry = cache.entries["p"]
    assert entry.active is not None
    call = entry.active.for_call()
    messages = call.messages(text="please ship lamps to Oslo")
    assert [m["content"] for m in messages] == [
        "Name the city.",
        "Message: ship chairs to Oslo",
        "Oslo",
        "Message: ship boxes to Lyon",
        "Lyon",
        "Message: please ship lamps to Oslo",
    ]
    assert call.demo_ids == ["r3", "r1"]
    other = entry.active.for_call()
    other.messages(text="my printer is broken again")
    assert other.demo_ids is not None
    assert other.demo_ids[0] == "r2"
    assert call.demo_ids == ["r3", "r1"]  # one record per call

    encoder = Encoder(SdkConfig(metrics_topic="m"))
    item = ("m", time.time(), "p", "v2", "m", "rid", None, 5.0, True, None)
    item += (None, None, None, None, None, None, None, None, call.chosen)
    record = encoder.encode(item)
    assert not isinstance(record, str), encoder.last_invalid
    assert MetricEvent.model_validate_json(record[2]).demo_ids == ["r3", "r1"]


def test_a_pool_that_is_not_loaded_serves_no_demos_and_says_so() -> None:
    """A routing whose pool is missing serves the configuration without demos, counted."""
    counters = Counters()
    cache = RoutingCache(SdkConfig(registry=CollectorRegistry()), counters)
    cache.install("p", Routing(prompt="p", active_version="v2", active_config=CONFIG), 60.0)
    active = cache.entries["p"].active
    assert active is not None
    call = active.for_call()
    assert len(call.messages(text="ship to Lyon")) == 2
    assert call.demo_ids == []
    assert counters.errors.get("demos_unavailable") == 1
