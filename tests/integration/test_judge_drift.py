"""Judge drift through the real broker and daemon (issue 20): a rollout decided on an LLM
judge (served by a local OpenAI-compatible server), whose candidate the judge prefers and
people's feedback rejects, is paused by the judge-drift check and not promoted."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import aiohttp
import pytest

from promptd.events import new_event_id
from promptd.routing import Routing
from tests.conftest import wait_for
from tests.kafka_helpers import produce
from tests.optimize_fake_llm import serving

pytestmark = pytest.mark.integration

PROMPT = "support"
# Steps without a minimum time; the last test step completes (and promotes) at 300 judged
# calls per arm, which the drift check must beat; it tests from 20 paired calls per arm.
PROFILE = {
    "name": "drift",
    "steps": [{"weight": 0.5, "min_duration_s": 0, "min_samples_per_arm": 300}, {"weight": 1.0}],
    "min_samples_for_test": 20,
    "judge_drift_min_pairs": 20,
}


def judge(body: dict[str, Any]) -> str:
    """A gamed judge: 5 for the candidate's confident answers, 2 for the others."""
    answer = body["messages"][-1]["content"].split("Answer to evaluate:")[1]
    return "5" if "Certainly!" in answer else "2"


async def traffic(settings: Any, routing: Routing, users: range, rng: random.Random) -> None:
    """One call per user in the arm routing gives it, its output captured; people rate
    half the calls: the candidate's confident answers are worse (thumbs down 3 times in
    4), the baseline's are rated like the judge rates them (0.25 on average)."""
    metrics, feedback = [], []
    for user in users:
        unit = f"user-{user}"
        version, _ = routing.choose(unit)
        assert version is not None
        rid = new_event_id()
        candidate = version == routing.candidate_version
        output = "Certainly! The answer is 42." if candidate else "Maybe 42?"
        metrics.append(
            {"event_id": new_event_id(), "type": "metric", "ts": time.time(), "prompt": PROMPT,
             "variant": version, "model": "m", "request_id": rid, "unit_id": unit,
             "latency_ms": 20.0, "success": True, "input": {"q": "6 x 7?"}, "output": output}
        )  # fmt: skip
        if rng.random() < 0.5:
            score = float(rng.random() < 0.25) if candidate else rng.choice([0.0, 0.5])
            feedback.append(
                {"event_id": new_event_id(), "type": "feedback", "ts": time.time(),
                 "prompt": PROMPT, "variant": version, "request_id": rid, "score": score}
            )  # fmt: skip
    kafka = settings.kafka
    await produce(
        kafka.bootstrap_servers, kafka.metrics_topic, [json.dumps(m).encode() for m in metrics]
    )
    await produce(
        kafka.bootstrap_servers, kafka.feedback_topic, [json.dumps(f).encode() for f in feedback]
    )


async def test_a_candidate_the_judge_prefers_and_people_reject_is_paused(
    make_settings: Any, start_daemon: Any
) -> None:
    """The rollout's primary metric is the judge's score (the candidate looks far better
    on it); on calls people rated too, the judge likes the candidate much more than people
    do: the judge-drift check pauses the rollout, says why (decision, API state, metric),
    and the candidate is not promoted."""
    async with serving(judge) as fake:
        settings = make_settings(
            rollout={"tick_interval_s": 0.1, "profiles": {"drift": PROFILE}},
            evaluation={
                "evaluators": [
                    {"name": "helpful", "type": "judge", "rubric": "Is the answer right?",
                     "model": "openai/judge", "api_base": fake.api_base, "sample_rate": 1.0}
                ],
                "signals": [{"prompts": [PROMPT], "rollout": ["eval:helpful"]}],
                "outbox_interval_s": 0.1,
                "concurrency": 16,
            },
        )  # fmt: skip
        running = await start_daemon(settings)
        url = running.url
        async with aiohttp.ClientSession(url) as http:
            for template in ("Answer {q}", "Answer {q} confidently."):
                async with http.post(
                    f"/v1/prompts/{PROMPT}/versions", json={"template": template}
                ) as resp:
                    assert resp.status == 201
            body = {"prompt": PROMPT, "candidate_version": "v2", "profile": "drift"}
            async with http.post("/v1/rollouts", json=body) as resp:
                assert resp.status == 201, await resp.text()
                rollout_id = (await resp.json())["id"]
            async with http.get(f"/v1/prompts/{PROMPT}/routing") as resp:
                routing = Routing.model_validate(await resp.json())
            rng, users = random.Random(20), iter(range(0, 10**6, 40))

            async def paused() -> Any:
                async with http.get(f"/v1/rollouts/{rollout_id}") as resp:
                    state = await resp.json()
                if state["status"] == "running":
                    start = next(users)
                    await traffic(settings, routing, range(start, start + 40), rng)
                return state if state["status"] != "running" else None

            state = await wait_for(paused, timeout=60, interval=0.5)
            async with http.get("/metrics") as resp:
                metrics = await resp.text()
        await running.stop()  # before its judge's server stops
    assert state["status"] == "paused", state["decisions"][-3:]
    assert state["signals"] == ["eval:helpful"]
    last = state["decisions"][-1]
    assert last["kind"] == "pause"
    assert last["reason"].startswith("judge drift:")
    assert last["details"]["paused_by"] == "judge_drift"
    assert last["details"]["judge_drift"] > 0.3
    # The judge alone would have promoted it: far better on the primary metric.
    arms = state["arms"]
    assert arms["candidate"]["primary_mean"] > arms["baseline"]["primary_mean"] + 0.5
    assert arms["candidate"]["evaluator_minus_people"] > 0.5
    assert all(d["kind"] != "promote" for d in state["decisions"])
    assert (
        f'promptd_rollout_paused_by_check{{check="judge_drift",prompt="{PROMPT}"}} 1.0' in metrics
    )
