"""Coordinated pipeline rollouts through the real daemon: broker, SQLite, HTTP and CLI.

A pipeline variant whose second step is worse is rolled back as a whole (both steps back
to their old versions) by the A/B test on episode feedback, and single-prompt rollouts
that overlap it are refused while it is live."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

import aiohttp
import pytest

from promptd.daemon.cli.pipelines import pipelines_command
from promptd.daemon.cli.prompts import rollout_command
from promptd.events import new_event_id
from promptd.replacement.profiles import get_profile
from promptd.routing import Routing
from tests.conftest import wait_for
from tests.kafka_helpers import produce, read_all
from tests.optimize_pipeline_task import PIPELINE

pytestmark = pytest.mark.integration

TOKEN = "pipeline-rollout-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GEO = PIPELINE.to_dict()


def _settings(make_settings: Any) -> Any:
    # A short routing TTL keeps the settle window after each step start short (2 TTL + 1 s).
    # "aggressive" with starvation_action = hold: scaled by time_scale its grace is 1.8 s,
    # which a loaded machine's slower waves of episodes can exceed; these tests are about
    # the A/B decisions, not about starvation (tested in the state machine's own tests).
    held = get_profile("aggressive").model_dump() | {"starvation_action": "hold"}
    return make_settings(
        http={"admin_token": TOKEN, "routing_ttl_s": 0.1},
        rollout={"tick_interval_s": 0.1, "time_scale": 0.001, "profiles": {"aggressive": held}},
    )


async def _call(
    http: aiohttp.ClientSession, method: str, path: str, body: Any = None, auth: bool = True
) -> tuple[int, Any]:
    async with http.request(method, path, json=body, headers=AUTH if auth else {}) as resp:
        return resp.status, await resp.json()


async def _setup(http: aiohttp.ClientSession) -> None:
    """extract and answer with v1 active and a v2 each, in pipeline geo."""
    for prompt, placeholder in (("extract", "text"), ("answer", "notes")):
        for wording in ("Read", "Read carefully"):
            body = {"template": f"{wording}.\n{placeholder.title()}: {{{placeholder}}}"}
            status, _ = await _call(http, "POST", f"/v1/prompts/{prompt}/versions", body)
            assert status == 201
    status, _ = await _call(http, "POST", "/v1/pipelines", GEO)
    assert status == 201


async def _routings(http: aiohttp.ClientSession) -> dict[str, Routing]:
    out = {}
    for prompt in ("extract", "answer"):
        status, body = await _call(http, "GET", f"/v1/prompts/{prompt}/routing", auth=False)
        assert status == 200
        out[prompt] = Routing.model_validate(body)
    return out


def _event(**fields: Any) -> bytes:
    return json.dumps({"event_id": new_event_id(), "ts": time.time(), **fields}).encode()


async def _episodes(
    settings: Any, routings: dict[str, Routing], users: range, p: dict[str, float], seed: int
) -> None:
    """One pipeline run per user (extract then answer, each routed by the user) and one
    thumbs feedback on the whole episode, good with probability ``p[answer's version]``."""
    rng = random.Random(seed)
    metrics, feedback = [], []
    for user in users:
        unit, episode = f"user-{user}", new_event_id()
        served = {}
        for prompt, routing in routings.items():
            version, _ = routing.choose(unit)
            assert version is not None
            served[prompt] = version
            metrics.append(
                _event(
                    type="metric",
                    prompt=prompt,
                    variant=version,
                    model="m",
                    request_id=new_event_id(),
                    unit_id=unit,
                    episode_id=episode,
                    latency_ms=rng.lognormvariate(5, 0.3),
                    success=True,
                )
            )
        score = float(rng.random() < p[served["answer"]])
        feedback.append(_event(type="feedback", episode_id=episode, score=score, kind="thumbs"))
    bootstrap = settings.kafka.bootstrap_servers
    await produce(bootstrap, settings.kafka.metrics_topic, metrics)
    await produce(bootstrap, settings.kafka.feedback_topic, feedback)


async def test_a_pipeline_whose_second_step_is_worse_is_rolled_back_as_a_whole(
    make_settings: Any, start_daemon: Any
) -> None:
    """Started with the CLI, the rollout routes both steps with one salt and weight;
    single-prompt rollouts of either step are refused (409) while it is live; episode
    feedback shows the variant worse (its answer step is), and the controller rolls back
    both steps at once: both keep v1, both v2 are marked rolled back, routing of both
    returns to weight 0 (HTTP and the routing topic), and the list shows the pipeline."""
    settings = _settings(make_settings)
    bootstrap = settings.kafka.bootstrap_servers
    running = await start_daemon(settings)
    async with aiohttp.ClientSession(running.url) as http:
        await _setup(http)
        args = argparse.Namespace(
            json=True,
            pipelines_command="rollout",
            name="geo",
            candidate=["extract=v2", "answer=v2"],
            profile="aggressive",
            metric=None,
            require_win=False,
        )
        assert await asyncio.to_thread(pipelines_command, args, settings) == 0
        status, listed = await _call(http, "GET", "/v1/rollouts", auth=False)
        [started] = listed["rollouts"]
        rid = started["id"]
        assert (started["pipeline"], started["status"], started["weight"]) == (
            "geo",
            "running",
            0.25,
        )
        assert started["members"] == [
            {"prompt": "extract", "baseline": "v1", "candidate": "v2"},
            {"prompt": "answer", "baseline": "v1", "candidate": "v2"},
        ]
        routings = await _routings(http)
        assert routings["extract"].salt == routings["answer"].salt != ""
        assert {r.rollout_id for r in routings.values()} == {rid}

        for prompt in ("answer", "extract"):
            body = {"prompt": prompt, "candidate_version": "v2"}
            status, refused = await _call(http, "POST", "/v1/rollouts", body)
            assert status == 409, refused
            assert f"is in the live rollout {rid} of pipeline 'geo'" in refused["error"]
        again = {"candidates": {"answer": "v2"}}
        status, refused = await _call(http, "POST", "/v1/pipelines/geo/rollouts", again)
        assert status == 409, refused

        p = {"v1": 0.8, "v2": 0.3}
        for wave in range(40):
            await _episodes(settings, routings, range(wave * 300, wave * 300 + 300), p, wave)
            status, body = await _call(http, "GET", f"/v1/rollouts/{rid}", auth=False)
            if body["status"] != "running":
                break
            await asyncio.sleep(0.2)
            routings = await _routings(http)
        assert body["status"] == "rolled_back", body["decisions"][-3:]
        assert body["decisions"][-1]["kind"] == "rollback"
        assert "feedback_score significantly worse" in body["decisions"][-1]["reason"]
        assert body["arms"]["candidate"]["primary_mean"] < body["arms"]["baseline"]["primary_mean"]

        for prompt in ("extract", "answer"):
            status, info = await _call(http, "GET", f"/v1/prompts/{prompt}", auth=False)
            assert info["active_version"] == "v1"
            assert (info["routing"]["weight"], info["routing"]["candidate_version"]) == (0.0, None)
            status, versions = await _call(
                http, "GET", f"/v1/prompts/{prompt}/versions", auth=False
            )
            assert [v["status"] for v in versions["versions"]] == ["active", "rolled_back"]
        status, listed = await _call(http, "GET", "/v1/rollouts", auth=False)
        assert [(r["id"], r["pipeline"], r["status"]) for r in listed["rollouts"]] == [
            (rid, "geo", "rolled_back")
        ]
        # The routing topic's latest record of each step says the same (read for 2 s).
        records = await read_all(bootstrap, settings.kafka.routing_topic, 10_000, timeout=2.0)
        last = {}
        for record in records:
            routing = Routing.model_validate_json(record.value)
            last[routing.prompt] = routing
        assert {p: (r.weight, r.rollout_id) for p, r in last.items()} == {
            "extract": (0.0, None),
            "answer": (0.0, None),
        }
        # Free again: a single-prompt rollout of a step may start now.
        body = {"template": "Answer.\nNotes: {notes}"}
        status, v3 = await _call(http, "POST", "/v1/prompts/answer/versions", body)
        assert status == 201
        body = {"prompt": "answer", "candidate_version": v3["version"]}
        status, single = await _call(http, "POST", "/v1/rollouts", body)
        assert status == 201, single
        assert (single["pipeline"], single["members"]) == (None, [])


async def test_the_route_checks_its_body_and_promote_moves_every_step(
    make_settings: Any, start_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """POST /v1/pipelines/{name}/rollouts: 401 without the token, 400 for a malformed
    body, 404 for an unknown pipeline or version, 422 for a prompt that is not a step;
    201 starts it; `promptd rollout status` shows the pipeline and its steps; a manual
    promote of the rollout makes every candidate active."""
    settings = _settings(make_settings)
    running = await start_daemon(settings, ready=False)
    async with aiohttp.ClientSession(running.url) as http:
        await _setup(http)
        body: dict[str, Any] = {"candidates": {"answer": "v2"}}
        status, _ = await _call(http, "POST", "/v1/pipelines/geo/rollouts", body, auth=False)
        assert status == 401
        for bad, code, fragment in (
            ({"candidates": {}}, 400, "candidates"),
            ({"candidates": {"answer": "v2"}, "extra": 1}, 400, "extra"),
            ({"candidates": {"answer": "v2"}, "primary_metric": "vibes"}, 400, "primary_metric"),
            ({"candidates": {"answer": "v9"}}, 404, "v9"),
            ({"candidates": {"nope": "v2"}}, 422, "'nope' is not a step of pipeline 'geo'"),
            ({"candidates": {"answer": "v1"}}, 409, "already the active version"),
        ):
            status, refused = await _call(http, "POST", "/v1/pipelines/geo/rollouts", bad)
            assert status == code, (bad, refused)
            assert fragment in refused["error"]
        status, refused = await _call(http, "POST", "/v1/pipelines/nope/rollouts", body)
        assert status == 404
        assert "pipeline 'nope'" in refused["error"]

        body = {"candidates": {"extract": "v2", "answer": "v2"}, "require_win": True}
        status, started = await _call(http, "POST", "/v1/pipelines/geo/rollouts", body)
        assert status == 201, started
        assert (started["pipeline"], started["require_win"]) == ("geo", True)
        capsys.readouterr()
        args = argparse.Namespace(json=False, rollout_command="status", rollout_id=None)
        assert await asyncio.to_thread(rollout_command, args, settings) == 0
        args = argparse.Namespace(json=False, rollout_command="status", rollout_id=started["id"])
        assert await asyncio.to_thread(rollout_command, args, settings) == 0
        out = capsys.readouterr().out
        assert (
            f"{started['id']}  pipeline geo extract v1 → v2 running: step 1, 10% of units on "
            "the candidate"
        ) in out
        rows = [line.split() for line in out.splitlines()[1:]]
        assert ["pipeline", "geo"] in rows
        assert [r for r in rows if r[0] in ("extract", "answer")] == [
            ["extract", "v1", "→", "v2"],
            ["answer", "v1", "→", "v2"],
        ]
        status, promoted = await _call(http, "POST", f"/v1/rollouts/{started['id']}/promote", {})
        assert status == 200, promoted
        assert promoted["status"] == "promoted"
        for prompt in ("extract", "answer"):
            status, info = await _call(http, "GET", f"/v1/prompts/{prompt}", auth=False)
            assert info["active_version"] == "v2"
            assert info["routing"]["rollout_id"] is None


async def test_a_pipeline_rollout_resumes_after_a_hard_stop(
    make_settings: Any, start_daemon: Any
) -> None:
    """A daemon killed during a pipeline rollout (one step changed, one unchanged) resumes
    it with the same salt, step and weight on every step's routing, and rebuilds the same
    aggregates from the stored episodes."""
    settings = make_settings(
        http={"admin_token": TOKEN, "routing_ttl_s": 0.1},
        # Slow steps: the rollout stays in its first step through the restart.
        rollout={"tick_interval_s": 0.1, "snapshot_interval_s": 0.0},
    )
    first = await start_daemon(settings)
    async with aiohttp.ClientSession(first.url) as http:
        await _setup(http)
        body = {"candidates": {"answer": "v2"}, "profile": "aggressive"}
        status, started = await _call(http, "POST", "/v1/pipelines/geo/rollouts", body)
        assert status == 201, started
        rid = started["id"]
        routings = await _routings(http)
        assert routings["extract"].candidate_version is None
        assert routings["extract"].weight == routings["answer"].weight == 0.25
        await asyncio.sleep(1.5)  # past the settle window (2 × 0.1 s + 1 s)
        await _episodes(settings, routings, range(400), {"v1": 0.6, "v2": 0.6}, 1)

        async def all_in() -> Any:
            _, view = await _call(http, "GET", f"/v1/rollouts/{rid}", auth=False)
            arms = view["arms"]
            done = arms["baseline"]["primary_samples"] + arms["candidate"]["primary_samples"]
            return view if done == 400 else None

        before = await wait_for(all_in, timeout=20)
    await first.kill()

    second = await start_daemon(settings)
    async with aiohttp.ClientSession(second.url) as http:
        _, after = await _call(http, "GET", f"/v1/rollouts/{rid}", auth=False)
        routings = await _routings(http)
    assert (after["status"], after["step"], after["salt"]) == ("running", 0, before["salt"])
    assert after["arms"] == before["arms"]
    assert after["arms"]["candidate"]["requests"] > 100  # both steps' calls of the arm
    for routing in routings.values():
        assert (routing.rollout_id, routing.salt, routing.weight) == (rid, before["salt"], 0.25)
    assert routings["answer"].candidate_version == "v2"
