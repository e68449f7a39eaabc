"""Pipelines through the real daemon's HTTP API and the CLI."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from promptd.daemon.cli.common import CommandError
from promptd.daemon.cli.pipelines import pipelines_command
from promptd.replacement.registry import NewVersion

pytestmark = pytest.mark.integration

TOKEN = "pipeline-admin-token-01"
GEO = {
    "name": "geo",
    "steps": [
        {"prompt": "extract", "bindings": {"text": "input.text"}},
        {"prompt": "answer", "bindings": {"notes": "extract.output"}},
    ],
}


async def test_pipelines_are_checked_registered_and_listed(
    make_settings: Any, start_daemon: Any
) -> None:
    """Registration needs the token, refuses definitions that do not fit the registry
    (422, naming why) and prompts already in another pipeline (409); GET shows them."""
    running = await start_daemon(make_settings(http={"admin_token": TOKEN}), ready=False)
    registry = running.daemon.components["registry"]
    await registry.register("extract", NewVersion(template="Read.\nMessage: {text}"))
    await registry.register("answer", NewVersion(template="Answer.\nNotes: {notes}"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    wrong_binding = {**GEO, "steps": [GEO["steps"][0], {"prompt": "answer", "bindings": {}}]}
    unknown = {**GEO, "steps": [*GEO["steps"], {"prompt": "nope", "bindings": {}}]}
    backwards = {**GEO, "steps": list(reversed(GEO["steps"]))}
    async with aiohttp.ClientSession(running.url) as http:
        async with http.post("/v1/pipelines", json=GEO) as resp:
            assert resp.status == 401
        for body, fragment in (
            (wrong_binding, "must name exactly the placeholders"),
            (unknown, "no such prompt"),
            (backwards, "not an earlier step"),
        ):
            async with http.post("/v1/pipelines", json=body, headers=auth) as resp:
                assert resp.status == 422, await resp.text()
                assert fragment in (await resp.json())["error"]
        async with http.post("/v1/pipelines", json=GEO, headers=auth) as resp:
            assert resp.status == 201
            assert await resp.json() == GEO
        other = {**GEO, "name": "other"}
        async with http.post("/v1/pipelines", json=other, headers=auth) as resp:
            assert resp.status == 409
            assert "already belongs to pipeline 'geo'" in (await resp.json())["error"]
        async with http.get("/v1/pipelines") as resp:
            assert (await resp.json())["pipelines"] == [GEO]
        async with http.get("/v1/pipelines/geo") as resp:
            assert await resp.json() == GEO
        async with http.get("/v1/pipelines/nope") as resp:
            assert resp.status == 404
    pipelines = running.daemon.components["pipelines"]
    assert await pipelines.related("extract") == {"answer"}
    assert await pipelines.related("answer") == {"extract"}


async def test_cli_registers_a_pipeline_from_toml(
    make_settings: Any, start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`promptd pipelines register FILE.toml` registers it; `list` and `show` print it; a
    broken file is one clear error."""
    settings = make_settings(http={"admin_token": TOKEN})
    running = await start_daemon(settings, ready=False)
    registry = running.daemon.components["registry"]
    await registry.register("extract", NewVersion(template="Read.\nMessage: {text}"))
    await registry.register("answer", NewVersion(template="Answer.\nNotes: {notes}"))
    path = tmp_path / "geo.toml"
    path.write_text(
        'name = "geo"\n'
        '[[steps]]\nprompt = "extract"\nbindings = { text = "input.text" }\n'
        '[[steps]]\nprompt = "answer"\nbindings = { notes = "extract.output" }\n'
    )

    def run(**kw: Any) -> int:
        args = argparse.Namespace(json=False, **kw)
        return pipelines_command(args, settings)

    assert await asyncio.to_thread(run, pipelines_command="register", file=path) == 0
    assert await asyncio.to_thread(run, pipelines_command="list") == 0
    assert await asyncio.to_thread(run, pipelines_command="show", name="geo") == 0
    out = capsys.readouterr().out
    assert "geo: extract -> answer" in out
    assert "notes <- extract.output" in out
    broken = tmp_path / "broken.toml"
    broken.write_text("name = ")
    with pytest.raises(CommandError, match=r"broken\.toml: not valid TOML"):
        await asyncio.to_thread(run, pipelines_command="register", file=broken)


async def test_a_pipeline_is_not_redefined_while_its_coordinated_rollout_is_live(
    make_settings: Any, start_daemon: Any
) -> None:
    """While a coordinated rollout of a pipeline is live, redefining the pipeline is a 409
    naming the rollout (its candidates were tested as that pipeline) and changes nothing;
    once the rollout has ended the redefinition goes through."""
    running = await start_daemon(make_settings(http={"admin_token": TOKEN}))
    registry = running.daemon.components["registry"]
    for version in ("v1", "v2"):
        await registry.register("extract", NewVersion(template=f"Read {version}.\nM: {{text}}"))
        await registry.register("answer", NewVersion(template=f"Answer {version}.\nN: {{notes}}"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    rewired = {
        **GEO,
        "steps": [GEO["steps"][0], {"prompt": "answer", "bindings": {"notes": "input.text"}}],
    }
    async with aiohttp.ClientSession(running.url) as http:
        async with http.post("/v1/pipelines", json=GEO, headers=auth) as resp:
            assert resp.status == 201
        body = {"candidates": {"extract": "v2", "answer": "v2"}}
        async with http.post("/v1/pipelines/geo/rollouts", json=body, headers=auth) as resp:
            assert resp.status == 201, await resp.text()
            rollout = (await resp.json())["id"]
        async with http.post("/v1/pipelines", json=rewired, headers=auth) as resp:
            assert resp.status == 409
            error = (await resp.json())["error"]
        assert rollout in error
        assert "live" in error
        async with http.get("/v1/pipelines/geo") as resp:
            assert await resp.json() == GEO
        async with http.post(f"/v1/rollouts/{rollout}/rollback", json={}, headers=auth) as resp:
            assert resp.status == 200, await resp.text()
        async with http.post("/v1/pipelines", json=rewired, headers=auth) as resp:
            assert resp.status == 201, await resp.text()


async def test_a_chat_configuration_step_is_bound_by_its_message_placeholders(
    make_settings: Any, start_daemon: Any
) -> None:
    """A step whose active version is a chat configuration with params (max_tokens, ...)
    is bound by the placeholders of its messages only, also after a new configuration
    with other params became active and the pipeline is redefined."""
    running = await start_daemon(make_settings(http={"admin_token": TOKEN}), ready=False)
    registry = running.daemon.components["registry"]

    def config(max_tokens: int) -> dict[str, Any]:
        return {
            "model": "openai/gpt-4o-mini",
            "params": {"temperature": 0.0, "max_tokens": max_tokens},
            "messages": [
                {"role": "system", "content": "Extract the city."},
                {"role": "user", "content": "Message: {text}"},
            ],
        }

    await registry.register("extract", NewVersion.model_validate({"config": config(128)}))
    await registry.register("answer", NewVersion(template="Answer.\nNotes: {notes}"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(running.url) as http:
        async with http.post("/v1/pipelines", json=GEO, headers=auth) as resp:
            assert resp.status == 201, await resp.text()
        promoted = NewVersion.model_validate({"config": config(256), "activate": True})
        await registry.register("extract", promoted)
        async with http.post("/v1/pipelines", json=GEO, headers=auth) as resp:
            assert resp.status == 201, await resp.text()
