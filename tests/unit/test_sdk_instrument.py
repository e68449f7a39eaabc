"""The ``@instrument`` decorator on its own: no broker, no thread, a recording publisher."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

import promptd
from promptd.routing import Routing, in_candidate
from promptd.sdk import Client, PromptVariant, SdkConfig, instrument
from promptd.sdk.encode import METRIC

# Positions in the buffered metric tuple (see promptd.sdk.encode).
PROMPT, VARIANT, MODEL, REQUEST_ID, UNIT_ID, LATENCY, SUCCESS, ERROR = 2, 3, 4, 5, 6, 7, 8, 9
TOKENS_IN, TOKENS_OUT, COST, INPUT, OUTPUT, ATTRIBUTES = 10, 11, 12, 13, 14, 15
SIZING = 17


def _size(item: tuple[Any, ...]) -> int | None:
    """The input size the sender would send for a buffered call."""
    if item[SIZING] is None:
        return None
    count, args, kwargs = item[SIZING]
    size: int | None = count(*args, **kwargs)
    return size


@pytest.fixture
def client() -> Iterator[tuple[Client, list[tuple[Any, ...]]]]:
    """A client without Kafka whose publisher records the buffered tuples."""
    sdk = Client(SdkConfig(bootstrap_servers=None, registry=False))
    items: list[tuple[Any, ...]] = []
    sdk.publisher.put = items.append  # type: ignore[method-assign]
    yield sdk, items
    sdk.close(0.1)


def test_sync_result_and_metric(client: tuple[Client, list[tuple[Any, ...]]]) -> None:
    """A sync call returns its result unchanged and buffers one successful metric."""
    sdk, items = client

    @instrument(prompt="summarization", model="gpt-x", client=sdk)
    def summarize(text: str) -> str:
        return text.upper()

    assert summarize("abc") == "ABC"
    (item,) = items
    assert item[0] == METRIC
    assert item[PROMPT] == "summarization"
    assert item[VARIANT] == "default"
    assert item[MODEL] == "gpt-x"
    assert item[SUCCESS] is True
    assert item[ERROR] is None
    assert 0 <= item[LATENCY] < 50


def test_exception_reraised_unchanged(client: tuple[Client, list[tuple[Any, ...]]]) -> None:
    """The app's exception object passes through and its type is recorded."""
    sdk, items = client
    boom = KeyError("missing")

    @instrument(prompt="p", client=sdk)
    def fails() -> None:
        raise boom

    with pytest.raises(KeyError) as caught:
        fails()
    assert caught.value is boom
    assert items[0][SUCCESS] is False
    assert items[0][ERROR] == "KeyError"


async def test_async_function(client: tuple[Client, list[tuple[Any, ...]]]) -> None:
    """An async function stays a coroutine function and is timed around its await."""
    sdk, items = client

    @instrument(prompt="p", client=sdk)
    async def slow(x: int) -> int:
        await asyncio.sleep(0.02)
        return x + 1

    assert asyncio.iscoroutinefunction(slow)
    assert await slow(1) == 2
    assert items[0][LATENCY] >= 15


def test_method_and_unit_id_argument(client: tuple[Client, list[tuple[Any, ...]]]) -> None:
    """On a method, the unit id is read by argument name, positional or keyword."""
    sdk, items = client

    class Bot:
        @instrument(prompt="p", unit_id="user", client=sdk)
        def answer(self, question: str, user: str) -> str:
            return question

    bot = Bot()
    assert bot.answer("q", "alice") == "q"
    bot.answer("q", user="bob")
    assert [i[UNIT_ID] for i in items] == ["alice", "bob"]


def test_unit_id_callable_and_context(client: tuple[Client, list[tuple[Any, ...]]]) -> None:
    """The unit id comes from a callable of the arguments, else the context variable."""
    sdk, items = client

    @instrument(prompt="p", unit_id=lambda req: req["session"], client=sdk)
    def by_callable(req: dict[str, str]) -> None:
        return None

    @instrument(prompt="p", client=sdk)
    def by_context() -> None:
        return None

    by_callable({"session": "s-1"})
    with promptd.unit_scope("u-9"):
        by_context()
    by_context()
    assert [i[UNIT_ID] for i in items] == ["s-1", "u-9", None]


def test_request_id_visible_inside_and_after(
    client: tuple[Client, list[tuple[Any, ...]]],
) -> None:
    """current_request_id() names the running call; last_request_id() survives it."""
    sdk, items = client
    seen: list[str | None] = []

    @instrument(prompt="p", client=sdk)
    def call() -> None:
        seen.append(promptd.current_request_id())

    call()
    assert seen[0] == items[0][REQUEST_ID]
    assert promptd.current_request_id() is None
    assert promptd.last_request_id() == items[0][REQUEST_ID]
    call()
    assert items[0][REQUEST_ID] != items[1][REQUEST_ID]


def test_inject_variant_and_context(client: tuple[Client, list[tuple[Any, ...]]]) -> None:
    """The chosen variant is injected as a keyword argument and in the context."""
    sdk, _ = client
    got: list[Any] = []

    @instrument(prompt="p", version="v0", template="Hi {name}", inject="variant", client=sdk)
    def greet(name: str, variant: PromptVariant | None = None) -> str:
        got.append(promptd.current_variant())
        assert variant is not None
        return variant.format(name=name)

    assert greet("Ada") == "Hi Ada"
    assert got[0] == PromptVariant("p", "v0", "Hi {name}")
    assert promptd.current_variant() is None


def test_routing_share_is_sticky(client: tuple[Client, list[tuple[Any, ...]]]) -> None:
    """With a 30 % rollout, exactly the units in the candidate buckets get it."""
    sdk, items = client
    routing = Routing(
        prompt="p",
        active_version="v1",
        active_template="A",
        candidate_version="v2",
        candidate_template="B",
        weight=0.3,
        salt="r1",
    )
    sdk.routing.install("p", routing, 30.0)

    @instrument(prompt="p", unit_id="user", client=sdk)
    def call(user: str) -> None:
        return None

    users = [f"user-{i}" for i in range(2000)]
    for user in users:
        call(user)
    expected = ["v2" if in_candidate("r1", u, 0.3) else "v1" for u in users]
    assert [i[VARIANT] for i in items] == expected
    assert 0.26 < expected.count("v2") / len(users) < 0.34


def test_usage_from_openai_and_litellm_shapes(
    client: tuple[Client, list[tuple[Any, ...]]],
) -> None:
    """Token usage, cost and model come from an OpenAI/litellm-like response."""
    sdk, items = client
    response = SimpleNamespace(
        model="gpt-4o-mini",
        usage=SimpleNamespace(prompt_tokens=12, completion_tokens=34),
        _hidden_params={"response_cost": 0.0021},
    )
    as_dict = {"model": "m2", "usage": {"input_tokens": 5, "output_tokens": 6}}

    @instrument(prompt="p", client=sdk)
    def call(r: Any) -> Any:
        return r

    assert call(response) is response
    call(as_dict)
    first, second = items
    assert (first[TOKENS_IN], first[TOKENS_OUT], first[COST], first[MODEL]) == (
        12,
        34,
        0.0021,
        "gpt-4o-mini",
    )
    assert (second[TOKENS_IN], second[TOKENS_OUT], second[COST], second[MODEL]) == (
        5,
        6,
        None,
        "m2",
    )


def test_capture_is_opt_in(client: tuple[Client, list[tuple[Any, ...]]]) -> None:
    """Inputs and outputs are buffered only with capture=True."""
    sdk, items = client

    @instrument(prompt="p", client=sdk)
    def plain(text: str) -> str:
        return text

    @instrument(prompt="p", capture=True, attributes={"team": "x"}, client=sdk)
    def captured(text: str, lang: str = "en") -> str:
        return text * 2

    plain("a")
    captured("b", lang="fr")
    assert items[0][INPUT] is None
    assert items[0][OUTPUT] is None
    assert items[1][INPUT] == {"text": "b", "lang": "fr"}
    assert items[1][OUTPUT] == "bb"
    assert items[1][ATTRIBUTES] == {"team": "x"}


def test_input_chars_count_the_arguments_not_the_template(
    client: tuple[Client, list[tuple[Any, ...]]],
) -> None:
    """The input size counts the text the app passes in (nested in messages too), not the
    instance, the injected variant or the unit id; a callable or False replaces it."""
    sdk, items = client

    class Bot:
        @instrument(prompt="p", unit_id="user", inject="variant", client=sdk)
        def answer(
            self, messages: list[dict[str, str]], user: str, variant: PromptVariant | None = None
        ) -> str:
            return "ok"

    @instrument(prompt="p", client=sdk)
    def numbers(n: int) -> int:
        return n

    @instrument(prompt="p", input_chars=lambda text, **_: len(text.split()), client=sdk)
    def words(text: str, lang: str = "en") -> str:
        return text

    @instrument(prompt="p", input_chars=False, client=sdk)
    def silent(text: str) -> str:
        return text

    Bot().answer([{"role": "user", "content": "hello there"}], "alice-1234")
    numbers(3)
    words("one two three", lang="fr")
    silent("abc")
    assert [_size(i) for i in items] == [len("user") + len("hello there"), None, 3, None]


def test_parameter_typos_fail_at_decoration() -> None:
    """unit_id= and inject= naming a missing parameter raise when decorating."""
    with pytest.raises(TypeError, match="'usr' for unit_id"):

        @instrument(prompt="p", unit_id="usr")
        def call(user: str) -> None:
            return None

    with pytest.raises(TypeError, match="'variant' for inject"):

        @instrument(prompt="p", inject="variant")
        def call2(user: str) -> None:
            return None


def test_sdk_failure_never_reaches_app(client: tuple[Client, list[tuple[Any, ...]]]) -> None:
    """A broken unit-id callable is counted; the function still runs and returns."""
    sdk, _ = client

    @instrument(prompt="p", unit_id=lambda: 1 / 0, client=sdk)
    def call(x: int) -> int:
        return x

    assert call(7) == 7
    assert sdk.stats().errors == {"instrument": 1}


def test_without_bootstrap_counts_dropped_and_starts_nothing() -> None:
    """No Kafka address: events are counted as dropped and no thread starts."""
    sdk = Client(SdkConfig(bootstrap_servers=None, registry=False))
    before = threading.active_count()

    @instrument(prompt="p", client=sdk)
    def call() -> int:
        return 1

    for _ in range(5):
        call()
    stats = sdk.stats()
    assert threading.active_count() == before
    assert (stats.emitted, stats.dropped, stats.buffered) == (5, 5, 0)
    assert stats.dropped_by_reason["no_bootstrap"] == 5
    assert stats.consistent
    sdk.close(0.1)


async def test_concurrent_tasks_see_their_own_call(
    client: tuple[Client, list[tuple[Any, ...]]],
) -> None:
    """Concurrent asyncio tasks each read their own request id and unit."""
    sdk, items = client

    @instrument(prompt="p", client=sdk)
    async def call(tag: str) -> tuple[str, str | None]:
        await asyncio.sleep(0.01)
        return tag, promptd.current_request_id()

    async def task(tag: str) -> tuple[str, str | None, str | None]:
        promptd.set_unit_id(tag)
        got, inside = await call(tag)
        return got, inside, promptd.last_request_id()

    results = await asyncio.gather(*(task(f"t{i}") for i in range(20)))
    by_request = {i[REQUEST_ID]: i[UNIT_ID] for i in items}
    for tag, inside, after in results:
        assert inside == after
        assert by_request[inside] == tag
