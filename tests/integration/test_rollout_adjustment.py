"""The regression adjustment (CUPED) end to end: the SDK counts each call's input size,
the daemon stores it, a starting rollout reads its units' history from the stored events,
and the rollout's tests are adjusted on both (real broker, daemon and SDK)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

import promptd
from promptd.daemon.settings import Settings
from promptd.routing import Routing
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USERS = 40


def _size(user: int, call: int) -> int:
    """Users send documents of their own typical size, each call around it."""
    return (200 + 100 * user) * (1 + call % 2)


def _score(user: int) -> float:
    """Each user rates every answer alike: the history predicts all of it."""
    return (user % 5) / 4


async def _call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> Any:
    async with http.request(method, url, json=body, headers=AUTH) as resp:
        assert resp.status in (200, 201), await resp.text()
        return await resp.json()


def _instrumented() -> dict[str, Callable[[str, str], Awaitable[str]]]:
    """One decorated function per version; a call takes longer the longer its document."""

    def make(version: str) -> Callable[[str, str], Awaitable[str]]:
        @promptd.instrument(prompt="summarize", model="m", version=version, unit_id="user")
        async def summarize(document: str, user: str) -> str:
            await asyncio.sleep(len(document) / 400_000)
            return document[:10]

        return summarize

    return {"v1": make("v1"), "v2": make("v2")}


async def _calls(
    functions: dict[str, Callable[[str, str], Awaitable[str]]],
    routing: Routing | None,
    calls_per_user: int,
) -> None:
    """Every user's calls (the variant its routing gives it), each with its feedback."""
    for call in range(calls_per_user):
        for user in range(USERS):
            unit = f"user-{user}"
            version = routing.choose(unit)[0] if routing is not None else "v1"
            await functions[version]("x" * _size(user, call), unit)
            request_id = promptd.last_request_id()
            assert request_id is not None
            await promptd.afeedback(request_id, _score(user), kind="rating")
    assert await promptd.aflush(10)


async def test_a_rollout_is_adjusted_on_history_and_input_size(
    make_settings: Callable[..., Settings],
    start_daemon: Callable[..., Any],
    sdk_for: Callable[[Settings], promptd.sdk.Client],
) -> None:
    """Calls before the rollout give every user a history; the SDK's input_chars is the
    document's length (not the unit id's); the rollout shows the 40 units' history and
    removes nearly all of the feedback's variance (each user rates alike) and part of the
    latency's (it grows with the input); a restarted daemon uses the saved history."""
    settings = make_settings(http={"admin_token": TOKEN}, rollout={"tick_interval_s": 0.1})
    running = await start_daemon(settings)
    sdk_for(settings)
    functions = _instrumented()
    repo = running.daemon.repo
    async with aiohttp.ClientSession() as http:
        for template in ("Summarize {document}.", "Summarize {document} in one line."):
            await _call(
                http, "POST", f"{running.url}/v1/prompts/summarize/versions", {"template": template}
            )
        await _calls(functions, None, 1)

        async def stored(n: int) -> bool:
            return bool(await repo.count_events() == (n, n))

        await wait_for(lambda: stored(USERS), timeout=15)
        async with repo.db.reader.execute(
            "SELECT unit_id, input_chars FROM metric_events ORDER BY id"
        ) as cur:
            sizes = [tuple(r) for r in await cur.fetchall()]
        assert sizes == [(f"user-{u}", _size(u, 0)) for u in range(USERS)]

        body = {
            "prompt": "summarize",
            "candidate_version": "v2",
            "primary_metric": "feedback_score",
            "experiment": {"candidate_share": 0.5, "min_samples_per_arm": 10_000},
        }
        rid = (await _call(http, "POST", f"{running.url}/v1/rollouts", body))["id"]
        routing = Routing.model_validate(
            await _call(http, "GET", f"{running.url}/v1/prompts/summarize/routing")
        )
        await _calls(functions, routing, 2)
        await wait_for(lambda: stored(3 * USERS), timeout=15)

        async def all_in() -> bool:
            arms = (await _call(http, "GET", f"{running.url}/v1/rollouts/{rid}"))["arms"]
            samples = arms["candidate"]["primary_samples"] + arms["baseline"]["primary_samples"]
            return bool(samples == 2 * USERS and arms["candidate"]["requests"] > 0)

        await wait_for(all_in, timeout=20)
        await running.daemon.components["rollouts"].tick()  # statistics on all of it
        view = await _call(http, "GET", f"{running.url}/v1/rollouts/{rid}")
        adjustment = view["adjustment"]
        assert adjustment["enabled"]
        assert adjustment["history"]["units"] == USERS
        assert adjustment["history"]["units_with"]["feedback_score"] == USERS
        assert adjustment["metrics"]["primary"]["covariates"] == ["history"]
        assert adjustment["metrics"]["primary"]["variance_reduction"] > 0.9
        assert adjustment["metrics"]["primary"]["theta"]["history"] == pytest.approx(1.0, abs=0.05)
        latency = adjustment["metrics"]["log_latency"]
        assert latency["covariates"] == ["history", "log_input_chars"]
        assert latency["variance_reduction"] > 0.3
        assert latency["theta"]["log_input_chars"] > 0
        await running.kill()

    with sqlite3.connect(settings.storage.database_path) as conn:
        (saved,) = conn.execute(
            "SELECT COUNT(*) FROM snapshots WHERE name = ?", (f"rollout:{rid}:history",)
        ).fetchone()
    assert saved == 1
    again = await start_daemon(settings)
    async with aiohttp.ClientSession() as http:
        restarted = await _call(http, "GET", f"{again.url}/v1/rollouts/{rid}")
    assert restarted["adjustment"]["history"] == adjustment["history"]
    assert restarted["arms"] == view["arms"]
