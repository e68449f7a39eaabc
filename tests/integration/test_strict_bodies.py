"""Booleans in request bodies through the real daemon: ``"yes"`` is a 400 naming the field,
and nothing is done."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from promptd.replacement.registry import NewVersion
from tests.integration.test_pipelines_api import GEO

pytestmark = pytest.mark.integration

TOKEN = "strict-admin-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_a_string_for_a_boolean_is_refused_by_every_route(
    make_settings: Any, start_daemon: Any
) -> None:
    """``"require_win": "yes"`` (rollouts, pipeline rollouts) and ``"activate": "yes"``
    (versions) are refused with 400 and a message naming the field; no rollout starts and
    no version is registered."""
    running = await start_daemon(make_settings(http={"admin_token": TOKEN}))
    registry = running.daemon.components["registry"]
    for version in ("v1", "v2"):
        await registry.register("extract", NewVersion(template=f"Read {version}.\nM: {{text}}"))
        await registry.register("answer", NewVersion(template=f"Answer {version}.\nN: {{notes}}"))
    async with aiohttp.ClientSession(running.url) as http:
        async with http.post("/v1/pipelines", json=GEO, headers=AUTH) as resp:
            assert resp.status == 201
        cases = [
            (
                "/v1/rollouts",
                {"prompt": "extract", "candidate_version": "v2", "require_win": "yes"},
            ),
            (
                "/v1/pipelines/geo/rollouts",
                {"candidates": {"extract": "v2", "answer": "v2"}, "require_win": "yes"},
            ),
            ("/v1/prompts/extract/versions", {"template": "Read.\nM: {text}", "activate": "yes"}),
        ]
        for path, body in cases:
            async with http.post(path, json=body, headers=AUTH) as resp:
                assert resp.status == 400, (path, await resp.text())
                error = (await resp.json())["error"]
            field = "require_win" if "require_win" in body else "activate"
            assert error.startswith(f"{field}: Input should be a valid boolean"), error
        async with http.get("/v1/rollouts") as resp:
            assert (await resp.json())["rollouts"] == []
    assert [v.version for v in await registry.versions("extract")] == ["v1", "v2"]
