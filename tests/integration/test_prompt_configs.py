"""Configuration versions (chat messages, model, parameters) through the registry, the
daemon's routing and the SDK."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

import promptd
from promptd.daemon.settings import Settings
from promptd.replacement.registry import NewVersion, PlaceholderMismatch, Registry

pytestmark = pytest.mark.integration

CONFIG: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "You find cities for {audience}."},
        {"role": "user", "content": "Message: {text}"},
    ],
    "model": "openai/gpt-4o-mini",
    "params": {"temperature": 0.2, "max_tokens": 64},
    "output_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture
def sdk() -> Iterator[None]:
    """The default SDK client is shut down after the test."""
    yield
    promptd.shutdown(2.0)


def test_configurations_are_validated() -> None:
    """Either a template or a config; the last message is the user's; known params only."""
    with pytest.raises(ValidationError, match="either 'template' or 'config'"):
        NewVersion.model_validate({"template": "x {a}", "config": CONFIG})
    with pytest.raises(ValidationError, match="either 'template' or 'config'"):
        NewVersion.model_validate({})
    last_system = {"messages": [{"role": "system", "content": "x"}]}
    with pytest.raises(ValidationError, match="last message must be the user's turn"):
        NewVersion.model_validate({"config": last_system})
    odd = {**CONFIG, "params": {"frequency": 1}}
    with pytest.raises(ValidationError, match="unknown params"):
        NewVersion.model_validate({"config": odd})
    with pytest.raises(ValidationError):
        NewVersion.model_validate({"config": {"messages": [{"role": "robot", "content": "x"}]}})


async def test_config_versions_in_registry_routing_and_sdk(
    make_settings: Callable[..., Settings], start_daemon: Callable[..., Any], sdk: None
) -> None:
    """A configuration version keeps its messages, model and parameters; placeholders are
    checked over every message; routing carries it and the SDK renders its messages,
    refusing to format it as one string."""
    running = await start_daemon(make_settings(), ready=False)
    registry: Registry = running.daemon.components["registry"]
    prompt = f"cfg-{uuid.uuid4().hex[:8]}"
    first = await registry.register(prompt, NewVersion.model_validate({"config": CONFIG}))
    assert first.placeholders == ["audience", "text"]
    assert first.config is not None
    assert first.config["params"] == {"temperature": 0.2, "max_tokens": 64}
    assert first.template.startswith("[system]\nYou find cities for {audience}.")
    lost = {**CONFIG, "messages": [{"role": "user", "content": "Message: {text}"}]}
    with pytest.raises(PlaceholderMismatch):
        await registry.register(prompt, NewVersion.model_validate({"config": lost}))
    async with aiohttp.ClientSession(running.url) as http:
        async with http.post(f"/v1/prompts/{prompt}/versions", json={"config": CONFIG}) as resp:
            assert resp.status == 409  # the same configuration again
        async with http.get(f"/v1/prompts/{prompt}/routing") as resp:
            routing = await resp.json()
    assert routing["active_config"]["model"] == "openai/gpt-4o-mini"

    def app() -> tuple[Any, list[dict[str, str]]]:
        promptd.configure(daemon_url=running.url, prompts=[prompt], registry=CollectorRegistry())
        seen: list[Any] = []

        @promptd.instrument(prompt=prompt, version="v0", template="{text}", inject="variant")
        def call(text: str, variant: Any = None) -> str:
            seen.append(variant)
            return "Lyon"

        call("ship to Lyon")
        variant = seen[0]
        return variant, variant.messages(audience="couriers", text="ship to Lyon")

    variant, messages = await asyncio.to_thread(app)
    assert messages == [
        {"role": "system", "content": "You find cities for couriers."},
        {"role": "user", "content": "Message: ship to Lyon"},
    ]
    assert (variant.model, variant.params) == ("openai/gpt-4o-mini", CONFIG["params"])
    assert variant.output_schema == CONFIG["output_schema"]
    with pytest.raises(ValueError, match="chat configuration"):
        variant.format(text="x")
