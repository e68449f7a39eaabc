"""The pipeline loop end to end: an app with two chained prompts, instrumented with the
SDK (``promptd.episode()``, feedback on the episode), through the real broker into the
real daemon, whose optimizer (litellm over HTTP to the scripted model) optimizes the
pipeline on its episodes and hands the result to one coordinated rollout that the
episode feedback of the same app promotes by itself."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

import promptd
from promptd.monitoring.triggers import OptimizationTrigger
from promptd.sdk import PromptVariant
from tests.conftest import wait_for
from tests.optimize_fake_llm import FakeLLM, serving
from tests.optimize_pipeline_task import (
    ANSWER,
    COUNTRIES,
    EXTRACT,
    PIPELINE,
    model_answer,
    responder,
)

pytestmark = pytest.mark.integration

TOKEN = "pipeline-loop-token-01234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GEO = PIPELINE.to_dict()
# One tested step at 50 %: promotes on a significant win once 40 episodes per arm are in.
QUICK = {
    "steps": [{"weight": 0.5, "min_duration_s": 1.0, "min_samples_per_arm": 40}],
    "min_samples_for_test": 40,
    "win_max_duration_s": 300.0,
}


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    """The scripted model and proposer of the two-step task."""
    async with serving(responder) as server:
        yield server


def _settings(make_settings: Any, fake: FakeLLM) -> Any:
    model = {"model": "openai/test-model", "api_base": fake.api_base, "temperature": 0.0}
    return make_settings(
        # The app's SDK refreshes routing every 0.1 s; the daemon assumes SDKs may take up
        # to 2 × 1 s + 1 s to see a change (the settle window), which leaves room for a
        # busy test machine.
        http={"admin_token": TOKEN, "routing_ttl_s": 1.0},
        # No monitor: the one trigger of this test is the one it sends.
        monitoring={"enabled": False},
        rollout={"tick_interval_s": 0.1, "profiles": {"quick": QUICK}, "default_profile": "quick"},
        optimization={
            "strategies": ["instruction"],
            "proposer": model,
            "evaluation": {"model": model, "metric": "token_f1", "bootstrap_samples": 1000},
            "instruction": {"n_candidates": 2, "depth": 2},
            "max_llm_calls": 5000,
            "retry_backoff_s": 0.01,
            "schedule_check_interval_s": 3600,
        },
    )


class App:
    """The production app: find the city of a message, then answer with its country.
    Its model is the scripted one; users give thumbs on the final answer (mostly up
    when it is the country) and the true country as a correction, on the episode."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

        @promptd.instrument(prompt="extract", model="test-model", inject="variant", capture=True)
        def extract(text: str, variant: PromptVariant | None = None) -> str:
            assert variant is not None
            return model_answer(variant.format(text=text))

        @promptd.instrument(prompt="answer", model="test-model", inject="variant", capture=True)
        def answer(notes: str, variant: PromptVariant | None = None) -> str:
            assert variant is not None
            return model_answer(variant.format(notes=notes))

        self.extract, self.answer = extract, answer

    def run(self, n: int) -> None:
        """``n`` pipeline runs, each in its own episode (routed by it), with feedback."""
        cities = list(COUNTRIES)
        for i in range(n):
            city = self.rng.choice(cities)
            with promptd.episode() as ep:
                final = self.answer(self.extract(f"Ship order {i} to {city} soon."))
            good = self.rng.random() < (0.9 if final.strip() == COUNTRIES[city] else 0.2)
            promptd.feedback(
                score=float(good), kind="thumbs", correction=COUNTRIES[city], episode_id=ep.id
            )
        assert promptd.flush(10)


async def _call(http: aiohttp.ClientSession, method: str, path: str, body: Any = None) -> Any:
    async with http.request(method, path, json=body, headers=AUTH) as resp:
        assert resp.status < 300, await resp.text()
        return await resp.json()


async def _stored(daemon: Any, episodes: int) -> bool:
    calls, feedback = await daemon.repo.count_events()
    return bool(calls >= 2 * episodes and feedback >= episodes)


async def test_an_apps_pipeline_is_optimized_rolled_out_as_one_variant_and_promoted(
    make_settings: Any, start_daemon: Any, fake_llm: FakeLLM
) -> None:
    """Production episodes of the active pipeline (chatty extraction, the answer repeats
    it: mostly thumbs down) and a trigger for one step: the optimizer optimizes the
    pipeline, registers new versions of both steps and starts one coordinated rollout
    requiring a win; the app, routed by episode, serves either the whole new pipeline
    or the whole old one, and its episode feedback promotes both steps together."""
    settings = _settings(make_settings, fake_llm)
    running = await start_daemon(settings)
    daemon = running.daemon
    async with aiohttp.ClientSession(running.url) as http:
        await _call(http, "POST", "/v1/prompts/extract/versions", {"template": EXTRACT})
        await _call(http, "POST", "/v1/prompts/answer/versions", {"template": ANSWER})
        await _call(http, "POST", "/v1/pipelines", GEO)
        # In a thread: configure() warms the routing from this loop's daemon.
        await asyncio.to_thread(
            promptd.configure,
            bootstrap_servers=settings.kafka.bootstrap_servers,
            metrics_topic=settings.kafka.metrics_topic,
            feedback_topic=settings.kafka.feedback_topic,
            daemon_url=running.url,
            prompts=["extract", "answer"],
            routing_ttl_s=0.1,
            registry=CollectorRegistry(),
            poll_interval_s=0.01,
        )
        try:
            app = App(seed=7)
            await asyncio.to_thread(app.run, 150)
            await wait_for(lambda: _stored(daemon, 150), timeout=30)

            queue = daemon.components["optimization_triggers"]
            queue.put(OptimizationTrigger("answer", "degradation", time.time(), "thumbs down"))
            runner = daemon.components["optimizer"]

            async def finished() -> dict[str, Any] | None:
                runs = await runner.list_runs()
                return runs[0] if runs and runs[0]["status"] != "running" else None

            run = await wait_for(finished, timeout=60)
            assert (run["status"], run["outcome"]) == ("completed", "deployed"), run["error"]
            assert run["prompt"] == "geo"
            rid = run["rollout_id"]
            rollout = await _call(http, "GET", f"/v1/rollouts/{rid}")
            assert (rollout["pipeline"], rollout["require_win"]) == ("geo", True)
            candidates = {m["prompt"]: m["candidate"] for m in rollout["members"]}
            assert set(candidates) == {"extract", "answer"}
            assert all(candidates.values()), candidates  # both steps changed

            total = 150
            for _ in range(60):
                await asyncio.to_thread(app.run, 50)
                total += 50
                await asyncio.sleep(0.2)
                rollout = await _call(http, "GET", f"/v1/rollouts/{rid}")
                if rollout["status"] != "running":
                    break
        finally:
            promptd.shutdown(5.0)
        assert rollout["status"] == "promoted", rollout["decisions"][-3:]
        assert "significantly better" in rollout["decisions"][-1]["reason"]
        arms = rollout["arms"]
        assert arms["candidate"]["primary_mean"] > arms["baseline"]["primary_mean"] + 0.3
        for prompt, version in candidates.items():
            info = await _call(http, "GET", f"/v1/prompts/{prompt}")
            assert info["active_version"] == version
    # Routed by episode, the app served whole pipelines: once its SDK had fetched the
    # rollout's routing of both steps, no episode mixed old and new versions.
    async with daemon.db.reader.execute(
        "SELECT max(first) FROM (SELECT min(ts) AS first FROM metric_events "
        "WHERE variant != 'v1' GROUP BY prompt)"
    ) as cur:
        row = await cur.fetchone()
    async with daemon.db.reader.execute(
        "SELECT group_concat(prompt || '=' || variant) FROM metric_events "
        "GROUP BY episode_id HAVING min(ts) >= ?",
        (row[0],),
    ) as cur:
        episodes = [frozenset(str(r[0]).split(",")) for r in await cur.fetchall()]
    whole = {
        frozenset({"extract=v1", "answer=v1"}),
        frozenset(f"{p}={v}" for p, v in candidates.items()),
    }
    assert len(episodes) >= 50
    assert {e for e in episodes if e not in whole} == set()
    assert whole <= set(episodes)
