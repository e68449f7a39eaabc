"""Rollouts through the real daemon: late feedback across restarts, require_win, starvation
alerts, conflicting commands, name validation and the statistics of ended rollouts."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from promptd.events import new_event_id
from promptd.routing import Routing
from tests.conftest import wait_for
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _settings(
    make_settings: Any,
    profiles: dict[str, Any] | None = None,
    storage: dict[str, Any] | None = None,
    **rollout: Any,
) -> Any:
    return make_settings(
        http={"admin_token": TOKEN},
        rollout={"tick_interval_s": 0.1, "profiles": profiles or {}, **rollout},
        storage=storage or {},
    )


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, json=body, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def _prompt(http: aiohttp.ClientSession, url: str, name: str = "summarize") -> None:
    for template in ("Summarize {document}.", "Summarize {document} in one line."):
        status, body = await _call(
            http, "POST", f"{url}/v1/prompts/{name}/versions", {"template": template}
        )
        assert status == 201, body


async def _start(http: aiohttp.ClientSession, url: str, **extra: Any) -> dict[str, Any]:
    body = {"prompt": "summarize", "candidate_version": "v2"} | extra
    status, started = await _call(http, "POST", f"{url}/v1/rollouts", body)
    assert status == 201, started
    return dict(started)


async def _routing(http: aiohttp.ClientSession, url: str) -> Routing:
    status, body = await _call(http, "GET", f"{url}/v1/prompts/summarize/routing")
    assert status == 200
    return Routing.model_validate(body)


def _metric(routing: Routing, unit: str, request_id: str, ts: float) -> bytes:
    version, _ = routing.choose(unit)
    return json.dumps(
        {
            "event_id": new_event_id(),
            "type": "metric",
            "ts": ts,
            "prompt": "summarize",
            "variant": version,
            "model": "m",
            "request_id": request_id,
            "unit_id": unit,
            "latency_ms": 120.0,
            "success": True,
        }
    ).encode()


def _feedback(variant: str, request_id: str, score: float, ts: float) -> bytes:
    return json.dumps(
        {
            "event_id": new_event_id(),
            "type": "feedback",
            "ts": ts,
            "prompt": "summarize",
            "variant": variant,
            "request_id": request_id,
            "score": score,
            "kind": "thumbs",
        }
    ).encode()


async def _rollout(http: aiohttp.ClientSession, url: str, rid: str) -> dict[str, Any]:
    status, body = await _call(http, "GET", f"{url}/v1/rollouts/{rid}")
    assert status == 200, body
    return dict(body)


async def test_late_feedback_joins_its_call_across_restarts(
    make_settings, backend, start_daemon
) -> None:
    """Calls stored before a hard stop and their feedback stored after the restart are
    joined on request_id: the feedback counts in its call's arm, and a second restart
    (which replays stored events) counts exactly the same (on both storage backends)."""
    settings = _settings(make_settings, tick_interval_s=60, storage=backend)
    first = await start_daemon(settings)
    async with aiohttp.ClientSession() as http:
        await _prompt(http, first.url)
        rid = (await _start(http, first.url, profile="balanced"))["id"]
        routing = await _routing(http, first.url)
        now = time.time()
        calls = [(f"user-{i}", f"req-{i}") for i in range(300)]
        await produce(
            settings.kafka.bootstrap_servers,
            settings.kafka.metrics_topic,
            [_metric(routing, unit, req, now) for unit, req in calls],
        )

        async def stored() -> bool:
            arms = (await _rollout(http, first.url, rid))["arms"]
            return bool(arms["baseline"]["requests"] + arms["candidate"]["requests"] == 300)

        await wait_for(stored)
        await first.kill()

    second = await start_daemon(settings)
    arms_of = {req: routing.choose(unit)[0] for unit, req in calls}
    in_candidate = sum(1 for v in arms_of.values() if v == "v2")
    async with aiohttp.ClientSession() as http:
        # Feedback sent minutes later, claiming the wrong variant: the call's arm counts.
        await produce(
            settings.kafka.bootstrap_servers,
            settings.kafka.feedback_topic,
            [_feedback("v1", req, 1.0, now + 300) for _, req in calls]
            + [_feedback("v1", "req-unknown", 0.0, now + 300)],
        )

        async def joined() -> dict[str, Any] | None:
            body = await _rollout(http, second.url, rid)
            fb = body["feedback"]
            return body if fb["joined"] == 300 and fb["waiting"] == 1 else None

        body = await wait_for(joined)
        assert body["arms"]["candidate"]["primary_samples"] == in_candidate > 0
        assert body["arms"]["baseline"]["primary_samples"] == 300 - in_candidate
        await second.kill()

    third = await start_daemon(settings)
    async with aiohttp.ClientSession() as http:
        again = await _rollout(http, third.url, rid)
    assert again["feedback"]["joined"] == 300
    assert again["arms"] == body["arms"]


async def test_concurrent_promote_and_rollback_one_wins_the_other_gets_409(
    make_settings, start_daemon
) -> None:
    """Promote and rollback sent at the same time: exactly one answers 200, the other 409
    naming the state; the rollout ended once, as the winner said."""
    settings = _settings(make_settings, tick_interval_s=60)
    running = await start_daemon(settings)
    async with aiohttp.ClientSession() as http:
        await _prompt(http, running.url)
        winners = set()
        for round_ in range(6):
            version = f"c{round_}"
            status, body = await _call(
                http,
                "POST",
                f"{running.url}/v1/prompts/summarize/versions",
                {"template": f"Summarize {{document}} ({round_}).", "version": version},
            )
            assert status == 201, body
            rid = (await _start(http, running.url, candidate_version=version))["id"]
            urls = [f"{running.url}/v1/rollouts/{rid}/{a}" for a in ("promote", "rollback")]
            results = await asyncio.gather(*(_call(http, "POST", u, {}) for u in urls))
            assert sorted(status for status, _ in results) == [200, 409], results
            winner = next(body for status, body in results if status == 200)
            loser = next(body for status, body in results if status == 409)
            assert winner["status"] in loser["error"]
            winners.add(winner["status"])
            final = await _rollout(http, running.url, rid)
            assert final["status"] == winner["status"]
            ends = [d for d in final["decisions"] if d["kind"] in ("promote", "rollback")]
            assert len(ends) == 1
        assert winners <= {"promoted", "rolled_back"}


BAD_NAMES = [("nul", "a\x00b"), ("long", "p" * 5000), ("newline", "a\nb"), ("padded", " a ")]


@pytest.mark.parametrize(("label", "bad"), BAD_NAMES, ids=[b[0] for b in BAD_NAMES])
async def test_bad_names_are_refused_with_a_clear_message(
    make_settings, start_daemon, label: str, bad: str
) -> None:
    """A prompt name with NUL, a newline, edge whitespace or thousands of characters is
    refused in the path (422) and in bodies (400), with a message saying why; nothing is
    stored. Spaces, slashes and any script inside a name are fine."""
    from urllib.parse import quote

    running = await start_daemon(_settings(make_settings), ready=False)
    url = running.url
    async with aiohttp.ClientSession() as http:
        status, body = await _call(
            http, "POST", f"{url}/v1/prompts/{quote(bad, safe='')}/versions", {"template": "x"}
        )
        assert status == 422, body
        assert "prompt name" in body["error"]
        status, body = await _call(
            http, "POST", f"{url}/v1/prompts/ok/versions", {"template": "x", "version": bad}
        )
        assert status == 400, body
        assert body["error"].startswith("version: ")
        status, body = await _call(
            http, "POST", f"{url}/v1/rollouts", {"prompt": bad, "candidate_version": "v2"}
        )
        assert status == 400, body
        assert body["error"].startswith("prompt: ")
        status, body = await _call(http, "GET", f"{url}/v1/prompts")
        assert body["prompts"] == []
        fine = "support/summarize · résumé v2"
        status, body = await _call(
            http, "POST", f"{url}/v1/prompts/{quote(fine, safe='')}/versions", {"template": "x"}
        )
        assert (status, body["prompt"]) == (201, fine)


async def test_ended_rollout_keeps_its_statistics_across_restarts(
    make_settings, start_daemon
) -> None:
    """After an automatic rollback the view still has arms, statistics, winner and
    has_significant_result — also from a restarted daemon, which reads the snapshot."""
    settings = _settings(make_settings, time_scale=0.001)
    first = await start_daemon(settings)
    async with aiohttp.ClientSession() as http:
        await _prompt(http, first.url)
        rid = (await _start(http, first.url, profile="aggressive"))["id"]
        for wave in range(40):
            routing = await _routing(http, first.url)
            now = time.time()
            users = [(f"u{wave}-{i}", f"r{wave}-{i}") for i in range(400)]
            metrics = [_metric(routing, u, r, now) for u, r in users]
            feedback = []
            for i, (u, r) in enumerate(users):
                variant = routing.choose(u)[0] or "v1"
                good = i % 10 < (4 if variant == "v2" else 8)
                feedback.append(_feedback(variant, r, float(good), now))
            await produce(settings.kafka.bootstrap_servers, settings.kafka.metrics_topic, metrics)
            await produce(settings.kafka.bootstrap_servers, settings.kafka.feedback_topic, feedback)
            body = await _rollout(http, first.url, rid)
            if body["status"] != "running":
                break
            await asyncio.sleep(0.2)
        assert body["status"] == "rolled_back", body["decisions"][-3:]
        await first.stop()
    second = await start_daemon(settings)
    async with aiohttp.ClientSession() as http:
        after = await _rollout(http, second.url, rid)
    for view in (body, after):
        assert view["winner"] == "baseline"
        assert view["has_significant_result"] is True
        assert view["arms"]["candidate"]["primary_samples"] > 0
        assert view["statistics"]["primary_diff"] < 0
        assert view["weight"] == 0.0
    assert after["arms"] == body["arms"]
    assert after["statistics"] == body["statistics"]


QUICK = {
    "steps": [
        {"weight": 0.5, "min_duration_s": 0.2, "min_samples_per_arm": 50},
        {"weight": 1.0, "min_duration_s": 0, "min_samples_per_arm": 1},
    ],
    "win_max_duration_s": 1.0,
    "win_max_samples_per_arm": 100_000,
}


async def test_require_win_rollout_ends_as_no_improvement(make_settings, start_daemon) -> None:
    """An optimizer-style rollout (require_win) of an equal candidate survives a restart
    with require_win kept, then ends as no_improvement at the horizon: weight 0, the
    candidate retired, the active version kept, the decision recorded and counted."""
    settings = _settings(make_settings, profiles={"quick": QUICK}, tick_interval_s=0.1)
    first = await start_daemon(settings)
    async with aiohttp.ClientSession() as http:
        await _prompt(http, first.url)
    controller = first.daemon.components["rollouts"]
    row = await controller.start_rollout(
        "summarize", "v2", "quick", "success_rate", require_win=True
    )
    await first.kill()

    second = await start_daemon(settings)
    url = second.url
    async with aiohttp.ClientSession() as http:
        body = await _rollout(http, url, row.id)
        assert body["require_win"] is True
        assert body["state"]["require_win"] is True
        assert body["profile_settings"]["win_horizon"]["max_duration_s"] == 1.0
        routing = await _routing(http, url)
        now = time.time()
        await produce(
            settings.kafka.bootstrap_servers,
            settings.kafka.metrics_topic,
            [_metric(routing, f"u{i}", f"r{i}", now) for i in range(600)],
        )

        async def ended() -> dict[str, Any] | None:
            view = await _rollout(http, url, row.id)
            return view if view["status"] != "running" else None

        body = await wait_for(ended, timeout=30)
        assert body["status"] == "no_improvement", body["decisions"][-3:]
        assert body["weight"] == 0.0
        assert body["decisions"][-1]["kind"] == "no_improvement"
        assert "no significant win" in body["decisions"][-1]["reason"]
        routing = await _routing(http, url)
        assert (routing.active_version, routing.candidate_version, routing.weight) == (
            "v1",
            None,
            0.0,
        )
        _, versions = await _call(http, "GET", f"{url}/v1/prompts/summarize/versions")
        assert [v["status"] for v in versions["versions"]] == ["active", "retired"]
        async with http.get(f"{url}/metrics") as resp:
            text = await resp.text()
    assert 'promptd_rollout_decisions_total{kind="no_improvement",prompt="summarize"} 1.0' in text


STARVING = {
    "steps": [
        {"weight": 0.5, "min_duration_s": 0.0, "min_samples_per_arm": 10_000},
        {"weight": 1.0, "min_duration_s": 0, "min_samples_per_arm": 1},
    ],
    "starvation_grace_s": 0.5,
    "starvation_action": "hold",
}


async def test_starved_rollout_raises_an_alert_metric_and_state(
    make_settings, start_daemon
) -> None:
    """A rollout without traffic past its grace period shows starvation.starved, sets
    promptd_rollout_starved to 1 and sends the rollout_starved alert to the alert sinks
    (here the Kafka alerts topic); it keeps holding."""
    settings = _settings(make_settings, profiles={"starving": STARVING})
    running = await start_daemon(settings)
    async with aiohttp.ClientSession() as http:
        await _prompt(http, running.url)
        rid = (await _start(http, running.url, profile="starving"))["id"]

        async def starved() -> dict[str, Any] | None:
            view = await _rollout(http, running.url, rid)
            return view if view["starvation"]["starved"] else None

        body = await wait_for(starved, timeout=20)
        assert body["status"] == "running"
        assert body["starvation"]["starving_for_s"] >= 0.5
        async with http.get(f"{running.url}/metrics") as resp:
            text = await resp.text()
        assert 'promptd_rollout_starved{prompt="summarize"} 1.0' in text
    records = await read_all(settings.kafka.bootstrap_servers, settings.kafka.alerts_topic, 1)
    alerts = [json.loads(r.value) for r in records]
    fired = [a for a in alerts if a["rule"] == "rollout_starved"]
    assert fired, alerts
    assert fired[0]["state"] == "firing"
    assert fired[0]["labels"]["rollout_id"] == rid
    assert "starved for" in fired[0]["reason"]
