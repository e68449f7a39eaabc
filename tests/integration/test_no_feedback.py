"""An app that sends no feedback at all, end to end (issue 20): an SDK app through the
real broker into the real daemon; a code check and an LLM judge (served by a local
OpenAI-compatible server, litellm's real HTTP path) score sampled calls; the monitor
detects the quality drop from the judge's scores, the optimizer builds a candidate from
the examples the judge rated well, and the candidate's rollout is decided on the judge's
scores and promoted."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

import promptd
from promptd.evaluation.config import DECISIONS
from promptd.sdk import PromptVariant
from tests.conftest import wait_for
from tests.optimize_fake_llm import serving

pytestmark = pytest.mark.integration

PROMPT = "support"
TEMPLATE = "Answer the customer's question about their order.\n\nQuestion: {question}"
POLITE = "glad to help"
SIGNAL = "eval:helpful"
# One tested step at 50 %, deciding from 30 judged calls per arm.
QUICK = {
    "steps": [{"weight": 0.5, "min_duration_s": 0, "min_samples_per_arm": 30}],
    "min_samples_for_test": 30,
}


def judge(body: dict[str, Any]) -> str:
    """The judge's rubric, scripted: polite answers 4 or 5, curt ones 1 or 2 (by the
    order number: a judge's scores vary)."""
    answer = body["messages"][-1]["content"].split("Answer to evaluate:")[1]
    odd = int(re.findall(r"\d+", answer)[0]) % 2
    return f"{(5 if POLITE in answer else 2) - odd} - {'polite' if POLITE in answer else 'curt'}"


class App:
    """The production app, instrumented with the SDK, sending no feedback. Its model
    answers politely until the provider changes it (``degraded``); from then on only
    when the prompt shows it polite examples."""

    def __init__(self) -> None:
        self.rng = random.Random(20)
        self.degraded = False

        @promptd.instrument(prompt=PROMPT, model="m", inject="variant", capture=True)
        def answer(question: str, user: str, variant: PromptVariant | None = None) -> str:
            assert variant is not None
            text = variant.format(question=question)
            order = question.split()[3]
            if not self.degraded or POLITE in text:
                return f"Order {order} ships on Monday, {POLITE}."
            return f"Order {order}: Monday."

        self.answer = answer

    def calls(self, n: int) -> None:
        """``n`` calls of random users."""
        for _ in range(n):
            user = f"user-{self.rng.randrange(10_000)}"
            self.answer(f"When does order {self.rng.randrange(1000)} ship?", user=user)


def _settings(make_settings: Callable[..., Any], api_base: str) -> Any:
    judge_settings = {
        "name": "helpful",
        "type": "judge",
        "rubric": "Is the answer precise and polite?",
        "model": "openai/judge",
        "api_base": api_base,
        "only_if": ["cites_order"],
        "sample_rate": 0.5,
        "retries": 0,
    }
    return make_settings(
        http={"routing_ttl_s": 1.0},
        evaluation={
            "evaluators": [
                {"name": "cites_order", "type": "regex", "pattern": r"\d", "sample_rate": 1.0},
                judge_settings,
            ],
            # The judge drives every decision of the prompt.
            "signals": [{"prompts": [PROMPT], **{decision: [SIGNAL] for decision in DECISIONS}}],
            "outbox_interval_s": 0.1,
            "concurrency": 8,
        },
        monitoring={
            "tiers": [
                {"bucket_seconds": 1, "retention_seconds": 60},
                {"bucket_seconds": 10, "retention_seconds": 600},
            ],
            "evaluation_interval_s": 0.2,
            "default_degradation_rule": False,
            "feedback_volume_threshold": 1_000_000_000,
            "rules": [
                {"name": "quality_drop", "metric": "feedback_mean", "kind": "relative",
                 "window": "3s", "baseline_window": "60s", "drop": 0.2, "min_samples": 20,
                 "for": "0s", "group_by": "prompt"}
            ],
        },
        rollout={"tick_interval_s": 0.1, "profiles": {"quick": QUICK}},
        optimization={
            "strategies": ["fewshot"],
            "without_evaluation": "conservative_rollout",
            "conservative_profile": "quick",
            "fewshot": {"max_demos": 3, "min_score": 0.8},
            "schedule_check_interval_s": 3600,
        },
    )  # fmt: skip


async def _json(http: aiohttp.ClientSession, path: str) -> Any:
    async with http.get(path) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_an_app_without_feedback_is_monitored_optimized_and_rolled_out_on_evaluations(
    make_settings: Callable[..., Any], start_daemon: Callable[..., Any]
) -> None:
    """No feedback from the app: the judge's scores (behind the code check) drive the
    degradation alert, the optimizer's example scores (its demonstrations are the answers
    the judge liked) and the rollout's primary metric, which promotes the candidate."""
    async with serving(judge) as fake:
        settings = _settings(make_settings, fake.api_base)
        running = await start_daemon(settings)
        daemon = running.daemon
        async with aiohttp.ClientSession(running.url) as http:
            async with http.post(
                f"/v1/prompts/{PROMPT}/versions", json={"template": TEMPLATE}
            ) as resp:
                assert resp.status == 201, await resp.text()
            await asyncio.to_thread(
                promptd.configure,
                bootstrap_servers=settings.kafka.bootstrap_servers,
                metrics_topic=settings.kafka.metrics_topic,
                feedback_topic=settings.kafka.feedback_topic,
                daemon_url=running.url,
                prompts=[PROMPT],
                routing_ttl_s=0.1,
                registry=CollectorRegistry(),
                poll_interval_s=0.01,
            )
            app = App()
            stop = asyncio.Event()

            async def traffic() -> None:
                while not stop.is_set():
                    await asyncio.to_thread(app.calls, 5)
                    await asyncio.sleep(0.1)

            sender = asyncio.create_task(traffic())
            try:
                await wait_for(lambda: _judged(daemon, 60), timeout=30)
                app.degraded = True
                alert = await wait_for(lambda: _fired(http), timeout=30)
                runner = daemon.components["optimizer"]
                run = await wait_for(lambda: _finished(runner), timeout=30)
                rollout_id = run["rollout_id"]
                assert rollout_id, run

                async def decided() -> Any:
                    state = await _json(http, f"/v1/rollouts/{rollout_id}")
                    return state if state["status"] != "running" else None

                state = await wait_for(decided, timeout=60, interval=0.2)
            finally:
                stop.set()
                await sender
                await asyncio.to_thread(promptd.shutdown, 5.0)
            versions = (await _json(http, f"/v1/prompts/{PROMPT}/versions"))["versions"]
            prompt = await _json(http, f"/v1/prompts/{PROMPT}")
            stats = await _json(http, f"/v1/prompts/{PROMPT}/stats")
            async with daemon.db.reader.execute(
                "SELECT DISTINCT source FROM feedback_events"
            ) as cur:
                sources = {row[0] for row in await cur.fetchall()}
        await running.stop()  # before its judge's server stops
    assert alert["labels"]["prompt"] == PROMPT
    assert alert["value"] <= 0.8 * alert["baseline"]
    assert run["trigger_kind"] == "degradation"
    assert (run["status"], run["outcome"]) == ("completed", "deployed"), run
    # The demonstrations are answers the judge rated well: the polite ones.
    [candidate] = [v for v in versions if v["version"] == run["deployed_version"]]
    assert candidate["template"].count(POLITE) >= 2, candidate["template"]
    assert "Monday.\n" not in candidate["template"]
    assert state["status"] == "promoted", state["decisions"][-3:]
    assert prompt["active_version"] == candidate["version"]
    assert state["signals"] == [SIGNAL]
    assert "significantly better" in state["decisions"][-1]["reason"]
    arms = state["arms"]
    assert arms["candidate"]["primary_mean"] > arms["baseline"]["primary_mean"] + 0.5
    assert stats["feedback_signals"] == [SIGNAL]
    assert sources == {"eval:cites_order", SIGNAL}  # nothing from people


async def _judged(daemon: Any, n: int) -> bool:
    async with daemon.db.reader.execute(
        "SELECT count(*) FROM feedback_events WHERE source = ?", (SIGNAL,)
    ) as cur:
        row = await cur.fetchone()
    return bool(row[0] >= n)


async def _fired(http: aiohttp.ClientSession) -> Any:
    body = await _json(http, "/v1/alerts")
    firing = [a for a in body["active"] if a["rule"] == "quality_drop" and a["state"] == "firing"]
    return firing[0] if firing else None


async def _finished(runner: Any) -> dict[str, Any] | None:
    runs = await runner.list_runs()
    return runs[0] if runs and runs[0]["status"] != "running" else None
