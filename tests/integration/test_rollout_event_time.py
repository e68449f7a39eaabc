"""A rollout's per-step figures through the real daemon and broker do not change when a
restart rebuilds them from storage, whatever the calls' timestamps (issue 17)."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from tests.conftest import wait_for
from tests.integration.test_rollouts_v2 import (
    TOKEN,
    _call,
    _metric,
    _prompt,
    _routing,
    _start,
)
from tests.kafka_helpers import produce

pytestmark = pytest.mark.integration

YEAR = 365 * 86400.0
# Step 0 completes with 30 calls per arm; no test can reject (too few samples for any),
# and step 1 waits for more calls than the test sends.
PROFILE = {
    "steps": [
        {"weight": 0.5, "min_duration_s": 0, "min_samples_per_arm": 30},
        {"weight": 0.75, "min_duration_s": 0, "min_samples_per_arm": 100_000},
        {"weight": 1.0},
    ],
    "min_samples_for_test": 1_000_000,
    "srm_min_expected": 1_000_000,
}


async def _step_figures(http: aiohttp.ClientSession, url: str, rid: str) -> dict[str, Any]:
    """The rollout's step, arms and current-step samples once a tick has judged it."""

    async def judged() -> dict[str, Any] | None:
        _, body = await _call(http, "GET", f"{url}/v1/rollouts/{rid}")
        stats, last = body["statistics"] or {}, body["decisions"][-1]
        # The advance carries step 0's figures; the hold after it those of step 1.
        if (last["kind"], last["step"]) != ("hold", 1) or "step_n_baseline" not in stats:
            return None
        return {
            "step": body["step"],
            "arms": {arm: body["arms"][arm]["requests"] for arm in ("baseline", "candidate")},
            "step_n": (stats["step_n_baseline"], stats["step_n_candidate"]),
        }

    figures: dict[str, Any] = await wait_for(judged)
    return figures


async def test_calls_stamped_ahead_do_not_move_to_a_later_step_on_restart(
    make_settings: Any, start_daemon: Any
) -> None:
    """30 calls stamped 3 h ahead and 2 stamped ten years ahead, stored during step 0,
    are left out of the rollout (not counted in any arm), and the figures of step 1 are
    the same before and after a hard restart that rebuilds them from storage."""
    settings = make_settings(
        http={"admin_token": TOKEN},
        rollout={"tick_interval_s": 0.1, "profiles": {"fast": PROFILE}},
    )
    first = await start_daemon(settings)
    kafka = settings.kafka
    async with aiohttp.ClientSession() as http:
        await _prompt(http, first.url)
        started = await _start(http, first.url, profile="fast", primary_metric="success_rate")
        rid = started["id"]
        routing = await _routing(http, first.url)
        now = time.time()
        ahead = [_metric(routing, f"u{i}", f"ahead-{i}", now + 3 * 3600) for i in range(30)]
        ahead += [_metric(routing, f"v{i}", f"years-{i}", now + 10 * YEAR) for i in range(2)]
        on_time = [_metric(routing, f"w{i}", f"call-{i}", now) for i in range(120)]
        await produce(kafka.bootstrap_servers, kafka.metrics_topic, ahead + on_time)
        live = await _step_figures(http, first.url, rid)
        _, view = await _call(http, "GET", f"{first.url}/v1/rollouts/{rid}")
        await first.kill()

    second = await start_daemon(settings)
    async with aiohttp.ClientSession() as http:
        assert await _step_figures(http, second.url, rid) == live
    assert sum(live["arms"].values()) == 120
    assert view["calls"] == {"future": 32}
