"""Rollouts through the real daemon: registry, routing, automatic rollback, restart, auth."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import aiohttp
import pytest

from promptd.events import new_event_id
from promptd.routing import Routing
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _settings(make_settings: Any, **over: Any) -> Any:
    return make_settings(
        http={"admin_token": TOKEN},
        rollout={"tick_interval_s": 0.1, "time_scale": 0.001, **over.pop("rollout", {})},
        **over,
    )


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None, auth: bool = True
) -> tuple[int, Any]:
    async with http.request(method, url, json=body, headers=AUTH if auth else {}) as resp:
        return resp.status, await resp.json()


async def _traffic(
    settings: Any, routing: Routing, users: range, p_base: float, p_cand: float, seed: int
) -> None:
    """One call and one thumbs feedback per user, arms chosen by sticky routing."""
    rng = random.Random(seed)
    now = time.time()
    metrics, feedback = [], []
    for user in users:
        unit = f"user-{user}"
        version, _ = routing.choose(unit)
        assert version is not None
        request_id = new_event_id()
        p = p_cand if version == routing.candidate_version else p_base
        metrics.append(
            json.dumps(
                {
                    "event_id": new_event_id(),
                    "type": "metric",
                    "ts": now,
                    "prompt": routing.prompt,
                    "variant": version,
                    "model": "m",
                    "request_id": request_id,
                    "unit_id": unit,
                    "latency_ms": rng.lognormvariate(5, 0.3),
                    "success": True,
                }
            ).encode()
        )
        feedback.append(
            json.dumps(
                {
                    "event_id": new_event_id(),
                    "type": "feedback",
                    "ts": now,
                    "prompt": routing.prompt,
                    "variant": version,
                    "request_id": request_id,
                    "score": float(rng.random() < p),
                    "kind": "thumbs",
                }
            ).encode()
        )
    bootstrap = settings.kafka.bootstrap_servers
    await produce(bootstrap, settings.kafka.metrics_topic, metrics)
    await produce(bootstrap, settings.kafka.feedback_topic, feedback)


async def _setup_prompt(http: aiohttp.ClientSession, url: str) -> None:
    status, _ = await _call(
        http, "POST", f"{url}/v1/prompts/summarize/versions", {"template": "Summarize {document}."}
    )
    assert status == 201
    status, v2 = await _call(
        http,
        "POST",
        f"{url}/v1/prompts/summarize/versions",
        {"template": "Summarize {document} in one line."},
    )
    assert status == 201
    assert v2["status"] == "candidate"


async def _routing(http: aiohttp.ClientSession, url: str) -> Routing:
    status, body = await _call(http, "GET", f"{url}/v1/prompts/summarize/routing", auth=False)
    assert status == 200
    return Routing.model_validate(body)


async def test_worse_candidate_is_rolled_back_automatically(make_settings, start_daemon) -> None:
    """A clearly worse candidate is rolled back by the controller; routing weight returns to 0,
    the routing topic carries the change, and the registry marks the version rolled back."""
    settings = _settings(make_settings)
    running = await start_daemon(settings)
    url = running.url
    async with aiohttp.ClientSession() as http:
        await _setup_prompt(http, url)
        status, started = await _call(
            http,
            "POST",
            f"{url}/v1/rollouts",
            {"prompt": "summarize", "candidate_version": "v2", "profile": "aggressive"},
        )
        assert status == 201, started
        rollout_id = started["id"]
        assert started["weight"] == 0.25
        routing = await _routing(http, url)
        assert (routing.candidate_version, routing.weight) == ("v2", 0.25)
        assert routing.salt

        for wave in range(40):
            await _traffic(settings, routing, range(wave * 400, wave * 400 + 400), 0.8, 0.4, wave)
            status, body = await _call(http, "GET", f"{url}/v1/rollouts/{rollout_id}", auth=False)
            if body["status"] == "rolled_back":
                break
            routing = await _routing(http, url)
        assert body["status"] == "rolled_back", body["decisions"][-3:]
        assert body["weight"] == 0.0
        assert body["decisions"][-1]["kind"] == "rollback"
        assert (
            "primary" in body["decisions"][-1]["reason"]
            or "worse" in body["decisions"][-1]["reason"]
        )

        routing = await _routing(http, url)
        assert routing.weight == 0.0
        assert routing.candidate_version is None
        assert routing.active_version == "v1"
        _, versions = await _call(http, "GET", f"{url}/v1/prompts/summarize/versions", auth=False)
        assert [v["status"] for v in versions["versions"]] == ["active", "rolled_back"]

    records = await read_all(settings.kafka.bootstrap_servers, settings.kafka.routing_topic, 2)
    latest = Routing.model_validate_json(records[-1].value)
    assert records[-1].key == b"summarize"
    assert latest.weight == 0.0
    metrics_text = await _metrics(url)
    assert 'promptd_rollout_decisions_total{kind="rollback",prompt="summarize"} 1.0' in metrics_text


async def _metrics(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        return await resp.text()


async def test_rollout_resumes_at_same_step_weight_and_salt_after_hard_stop(
    make_settings, backend, start_daemon
) -> None:
    """A daemon stopped without its shutdown path resumes each rollout where it was (on
    both storage backends)."""
    settings = _settings(
        make_settings,
        rollout={"tick_interval_s": 0.05, "time_scale": 0.0001},
        storage=backend,
    )
    first = await start_daemon(settings)
    async with aiohttp.ClientSession() as http:
        await _setup_prompt(http, first.url)
        status, started = await _call(
            http,
            "POST",
            f"{first.url}/v1/rollouts",
            {"prompt": "summarize", "candidate_version": "v2", "profile": "balanced"},
        )
        assert status == 201
        rid = started["id"]
        routing = await _routing(http, first.url)
        users = 0
        for wave in range(30):
            await _traffic(settings, routing, range(users, users + 300), 0.8, 0.8, wave)
            users += 300
            _, body = await _call(http, "GET", f"{first.url}/v1/rollouts/{rid}", auth=False)
            if body["step"] >= 1:
                break
            routing = await _routing(http, first.url)
        assert body["step"] >= 1, body["decisions"][-3:]
        await first.kill()
        before = body

    second = await start_daemon(settings)
    async with aiohttp.ClientSession() as http:
        _, after = await _call(http, "GET", f"{second.url}/v1/rollouts/{rid}", auth=False)
        routing = await _routing(http, second.url)
    # The killed daemon may have persisted one more transition after our last read.
    assert after["step"] in (before["step"], before["step"] + 1)
    assert after["salt"] == before["salt"]
    assert routing.salt == before["salt"]
    assert routing.weight == after["weight"]
    assert after["status"] in ("running", "promoted")
    kinds = [d["kind"] for d in after["decisions"]]
    assert kinds.count("start") == 1
    steps = [d["step"] for d in after["decisions"] if d["kind"] == "advance"]
    assert steps == sorted(set(steps)), "a transition was applied twice"


async def test_manual_commands_and_conflicts(make_settings, start_daemon) -> None:
    """Pause/resume/promote win over the controller; a second rollout is refused with 409;
    promotion makes the candidate active with the old version kept as the retired backup."""
    settings = _settings(make_settings, rollout={"tick_interval_s": 60})
    running = await start_daemon(settings)
    url = running.url
    async with aiohttp.ClientSession() as http:
        await _setup_prompt(http, url)
        _, started = await _call(
            http, "POST", f"{url}/v1/rollouts", {"prompt": "summarize", "candidate_version": "v2"}
        )
        rid = started["id"]
        status, body = await _call(
            http, "POST", f"{url}/v1/rollouts", {"prompt": "summarize", "candidate_version": "v2"}
        )
        assert status == 409
        assert "live rollout" in body["error"]
        status, body = await _call(http, "POST", f"{url}/v1/rollouts/{rid}/pause", {"reason": "x"})
        assert (status, body["status"]) == (200, "paused")
        status, body = await _call(http, "POST", f"{url}/v1/rollouts/{rid}/pause")
        assert status == 409
        status, body = await _call(http, "POST", f"{url}/v1/rollouts/{rid}/resume")
        assert body["status"] == "running"
        status, body = await _call(http, "POST", f"{url}/v1/rollouts/{rid}/promote")
        assert (status, body["status"]) == (200, "promoted")
        routing = await _routing(http, url)
        assert (routing.active_version, routing.candidate_version) == ("v2", None)
        _, versions = await _call(http, "GET", f"{url}/v1/prompts/summarize/versions", auth=False)
        assert [v["status"] for v in versions["versions"]] == ["retired", "active"]
        status, body = await _call(
            http, "POST", f"{url}/v1/prompts/summarize/restore", {"version": "v1"}
        )
        assert (status, body["status"]) == (200, "active")
        status, body = await _call(http, "POST", f"{url}/v1/rollouts/{rid}/rollback")
        assert status == 409
        status, body = await _call(
            http, "POST", f"{url}/v1/rollouts", {"prompt": "summarize", "candidate_version": "v9"}
        )
        assert status == 404
        status, body = await _call(
            http,
            "POST",
            f"{url}/v1/rollouts",
            {"prompt": "summarize", "candidate_version": "v2", "profile": "yolo"},
        )
        assert status == 400
        assert "unknown rollout profile" in body["error"]


MUTATING = [
    ("POST", "/v1/prompts/p/versions", {"template": "x"}),
    ("POST", "/v1/prompts/p/restore", {"version": "v1"}),
    ("POST", "/v1/rollouts", {"prompt": "p", "candidate_version": "v2"}),
    ("POST", "/v1/rollouts/ro-1/promote", {}),
    ("POST", "/v1/rollouts/ro-1/rollback", {}),
    ("POST", "/v1/rollouts/ro-1/pause", {}),
    ("POST", "/v1/rollouts/ro-1/resume", {}),
]


async def test_mutating_routes_need_the_admin_token(make_settings, start_daemon) -> None:
    """Every mutating route answers 401 without a token and with a wrong one; the answer
    names PROMPTD_ADMIN_TOKEN and tells a missing token from a wrong one."""
    running = await start_daemon(_settings(make_settings), ready=False)
    async with aiohttp.ClientSession() as http:
        for method, path, body in MUTATING:
            for headers, says in (
                ({}, "needs the daemon's admin token"),
                ({"Authorization": "Bearer wrong-token-0123456789"}, "wrong admin token"),
                ({"Authorization": TOKEN}, "is not 'Bearer …'"),
            ):
                async with http.request(
                    method, running.url + path, json=body, headers=headers
                ) as resp:
                    assert resp.status == 401, (path, headers)
                    error = (await resp.json())["error"]
                    assert says in error, error
                    assert "PROMPTD_ADMIN_TOKEN" in error
        status, _ = await _call(http, "GET", running.url + "/v1/rollouts", auth=False)
        assert status == 200


async def test_fixed_split_experiment_promotes_a_significant_winner(
    make_settings, start_daemon
) -> None:
    """An 80/20 experiment is a one-step rollout: it holds until the candidate is
    significantly better, then promotes it; the view reports the winner."""
    settings = _settings(make_settings)
    running = await start_daemon(settings)
    url = running.url
    async with aiohttp.ClientSession() as http:
        await _setup_prompt(http, url)
        status, started = await _call(
            http,
            "POST",
            f"{url}/v1/rollouts",
            {
                "prompt": "summarize",
                "candidate_version": "v2",
                "experiment": {
                    "candidate_share": 0.2,
                    "min_samples_per_arm": 100,
                    "alpha": 0.05,
                    "min_duration_s": 0,
                },
            },
        )
        assert status == 201, started
        assert started["weight"] == 0.2
        assert started["winner"] is None
        routing = await _routing(http, url)
        for wave in range(40):
            await _traffic(settings, routing, range(wave * 500, wave * 500 + 500), 0.5, 0.9, wave)
            _, body = await _call(http, "GET", f"{url}/v1/rollouts/{started['id']}", auth=False)
            if body["status"] != "running":
                break
        assert body["status"] == "promoted", body["decisions"][-3:]
        routing = await _routing(http, url)
        assert routing.active_version == "v2"


def test_non_loopback_bind_without_token_is_refused(make_settings) -> None:
    """Mutating endpoints are never exposed to the network without an admin token."""
    from promptd.daemon.app import ConfigurationError, Daemon

    with pytest.raises(ConfigurationError, match="PROMPTD_ADMIN_TOKEN"):
        Daemon(make_settings(http={"host": "0.0.0.0"}))
