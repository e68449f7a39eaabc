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
        # The first call waits for routing (2 s by default); a loaded machine may take
        # longer, and what is tested here is the rendering, not that bound.
        promptd.configure(
            daemon_url=running.url,
            prompts=[prompt],
            registry=CollectorRegistry(),
            routing_timeout_s=30.0,
        )
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


async def test_cli_register_messages_name_the_key_and_the_flag(
    make_settings: Callable[..., Settings], start_daemon: Callable[..., Any], tmp_path: Any
) -> None:
    """`prompts register NAME --chat FILE`: a misspelled [[message]] table is named with the
    key meant; a placeholder change is refused with the CLI's --force (not force=true), and
    --force accepts it."""
    import argparse

    from promptd.daemon.cli.common import CommandError
    from promptd.daemon.cli.prompts import prompts_command

    settings = make_settings()
    await start_daemon(settings, ready=False)
    prompt = f"cli-{uuid.uuid4().hex[:8]}"
    typo = tmp_path / "typo.toml"
    typo.write_text('[[message]]\nrole = "user"\ncontent = "Message: {text}"\n')
    good = tmp_path / "extract.toml"
    good.write_text('[[messages]]\nrole = "user"\ncontent = "Message: {text}"\n')
    other = tmp_path / "other.toml"
    other.write_text('[[messages]]\nrole = "user"\ncontent = "Text: {body}"\n')

    def register(chat: Any, force: bool = False) -> int:
        args = argparse.Namespace(
            json=False,
            prompts_command="register",
            prompt=prompt,
            template=None,
            file=None,
            chat=chat,
            version=None,
            activate=False,
            force=force,
            profile=None,
        )
        return prompts_command(args, settings)

    with pytest.raises(CommandError) as typo_error:
        await asyncio.to_thread(register, typo)
    assert "config: unknown key 'message' (did you mean 'messages'?" in str(typo_error.value)
    assert "Value error" not in str(typo_error.value)
    assert await asyncio.to_thread(register, good) == 0
    with pytest.raises(CommandError) as changed:
        await asyncio.to_thread(register, other)
    assert "register with --force to accept" in str(changed.value)
    assert "force=true" not in str(changed.value)
    assert await asyncio.to_thread(register, other, True) == 0
