"""The SDK warms routing at start: the first call already uses the daemon's routed version."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import promptd
from promptd.daemon.settings import Settings
from promptd.replacement.registry import NewVersion

pytestmark = pytest.mark.integration


@pytest.fixture
def sdk() -> Iterator[None]:
    """The default SDK client is shut down after the test."""
    yield
    promptd.shutdown(2.0)


async def _daemon_with_active_v2(
    make_settings: Callable[..., Settings], start_daemon: Callable[..., Any]
) -> tuple[str, str]:
    """A running daemon whose prompt's active version is v2; returns (url, prompt)."""
    running = await start_daemon(make_settings(), ready=False)
    prompt = f"warm-{uuid.uuid4().hex[:8]}"
    registry = running.daemon.components["registry"]
    await registry.register(prompt, NewVersion(template="one {x}", version="v1"))
    await registry.register(prompt, NewVersion(template="two {x}", version="v2", activate=True))
    return running.url, prompt


def _decorated(prompt: str, served: list[str]) -> Callable[[], str]:
    @promptd.instrument(prompt=prompt, version="v0", template="zero {x}", inject="variant")
    def call(variant: Any = None) -> str:
        served.append(variant.version)
        return str(variant.format(x=1))

    return call


async def test_configure_with_prompts_warms_routing(
    make_settings: Callable[..., Settings], start_daemon: Callable[..., Any], sdk: None
) -> None:
    """configure(prompts=[...]) returns with the routing fetched: call one uses v2."""
    url, prompt = await _daemon_with_active_v2(make_settings, start_daemon)
    served: list[str] = []

    def app() -> None:  # a sync app, in its own thread (the daemon runs in this loop)
        promptd.configure(daemon_url=url, prompts=[prompt], registry=CollectorRegistry())
        call = _decorated(prompt, served)
        assert call() == "two 1"

    await asyncio.to_thread(app)
    assert served == ["v2"]


async def test_start_warms_every_decorated_prompt(
    make_settings: Callable[..., Settings], start_daemon: Callable[..., Any], sdk: None
) -> None:
    """promptd.start() fetches the routing of decorated prompts before their first call."""
    url, prompt = await _daemon_with_active_v2(make_settings, start_daemon)
    served: list[str] = []

    def app() -> bool:
        call = _decorated(prompt, served)  # decorated at import, before configure
        promptd.configure(daemon_url=url, registry=CollectorRegistry())
        warm = promptd.start()
        call()
        return warm

    assert await asyncio.to_thread(app)
    assert served == ["v2"]


async def test_astart_warms_without_blocking_the_loop(
    make_settings: Callable[..., Settings], start_daemon: Callable[..., Any], sdk: None
) -> None:
    """In async code, await promptd.astart() warms the routing while the loop keeps
    running (here the loop also serves the daemon's HTTP API)."""
    url, prompt = await _daemon_with_active_v2(make_settings, start_daemon)
    served: list[str] = []
    call = _decorated(prompt, served)
    promptd.configure(daemon_url=url, registry=CollectorRegistry())
    assert await promptd.astart(timeout_s=10)
    call()
    assert served == ["v2"]


async def test_start_returns_false_when_the_daemon_is_unreachable(sdk: None) -> None:
    """start() is bounded: with no daemon it returns False within the timeout, and calls
    use the decorator's default."""
    from promptd.daemon.broker import free_port

    served: list[str] = []
    prompt = f"warm-{uuid.uuid4().hex[:8]}"

    def app() -> bool:
        call = _decorated(prompt, served)
        promptd.configure(
            daemon_url=f"http://127.0.0.1:{free_port()}", registry=CollectorRegistry()
        )
        warm = promptd.start(timeout_s=3)
        call()
        return warm

    loop = asyncio.get_running_loop()
    began = loop.time()
    assert not await asyncio.to_thread(app)
    assert loop.time() - began < 3
    assert served == ["v0"]


async def test_first_call_is_routed_without_a_warm_up(
    make_settings: Callable[..., Settings], start_daemon: Callable[..., Any], sdk: None
) -> None:
    """Without start() or prompts=, a prompt's first call waits for its routing (once)
    and is served the active version, not the decorator's default: in a sync app and in
    an async function alike. With route_first_call=False it is not held back."""
    url, prompt = await _daemon_with_active_v2(make_settings, start_daemon)
    served: list[str] = []

    def sync_app() -> None:
        promptd.configure(daemon_url=url, registry=CollectorRegistry())
        call = _decorated(prompt, served)
        call()
        call()

    await asyncio.to_thread(sync_app)
    assert served == ["v2", "v2"]

    promptd.configure(daemon_url=url, registry=CollectorRegistry())

    @promptd.instrument(prompt=prompt, version="v0", template="zero {x}", inject="variant")
    async def acall(variant: Any = None) -> None:
        served.append(variant.version)

    await acall()
    assert served[-1] == "v2"

    promptd.configure(daemon_url=url, registry=CollectorRegistry(), route_first_call=False)
    await acall()
    assert served[-1] == "v0"
