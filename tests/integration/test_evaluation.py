"""Online evaluation through the real broker, daemon and SQLite file, with the judge served
by a local OpenAI-compatible server (litellm's real HTTP path)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import structlog
from scipy import stats

from promptd.events import new_event_id
from tests.conftest import wait_for
from tests.kafka_helpers import produce
from tests.optimize_fake_llm import FakeLLM

pytestmark = pytest.mark.integration

PROMPT = "support"


def metric(i: int, output: Any, variant: str | None = None) -> bytes:
    """Call ``req-{i}`` of the support prompt with its captured input and output."""
    body: dict[str, Any] = {
        "event_id": new_event_id(),
        "type": "metric",
        "ts": time.time() - 5,
        "prompt": PROMPT,
        "variant": variant or f"variant-{i % 2}",
        "model": "m",
        "request_id": f"req-{i}",
        "latency_ms": 20.0,
        "success": True,
        "input": {"question": f"question {i}"},
    }
    if output is not None:
        body["output"] = output
    return json.dumps(body).encode()


def human(i: int, score: float, correction: str | None = None) -> bytes:
    """People's feedback on ``req-{i}``."""
    body: dict[str, Any] = {
        "event_id": new_event_id(),
        "type": "feedback",
        "ts": time.time() - 4,
        "prompt": PROMPT,
        "variant": f"variant-{i % 2}",
        "request_id": f"req-{i}",
        "score": score,
    }
    if correction is not None:
        body["correction"] = correction
    return json.dumps(body).encode()


def judge_answer(body: dict[str, Any]) -> str:
    """The fake judge: 5 for answers that mention 'good', else 2."""
    text = body["messages"][-1]["content"]
    return "5 - fine" if "good" in text.split("Answer to evaluate:")[1] else "2 - weak"


@pytest.fixture
async def judge_server() -> AsyncIterator[FakeLLM]:
    """A judge answering by :func:`judge_answer` until a test swaps its responder."""
    fake = await FakeLLM(judge_answer).start()
    yield fake
    await fake.stop()


def evaluation(fake: FakeLLM, **judge: Any) -> dict[str, Any]:
    """A length check on every call and a judge behind it (only_if), both sampling all."""
    return {
        "evaluators": [
            {"name": "short", "type": "length", "max_chars": 40, "sample_rate": 1.0},
            {
                "name": "helpful",
                "type": "judge",
                "rubric": "Is the answer helpful?",
                "model": "openai/judge",
                "api_base": fake.api_base,
                "only_if": ["short"],
                "sample_rate": 1.0,
                "retries": 0,
                **judge,
            },
        ],
        "cursor_interval_s": 0.1,
        "outbox_interval_s": 0.1,
        "outage_after_failures": 2,
        "probe_interval_s": 0.3,
        "agreement": {"interval_s": 0.2, "min_pairs": 4},
    }


async def rows(daemon: Any, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of a query on the daemon's database."""
    async with daemon.db.reader.execute(sql, params) as cur:
        return [tuple(r) for r in await cur.fetchall()]


async def by_source(daemon: Any) -> dict[str | None, int]:
    """Stored feedback events per source."""
    found = await rows(daemon, "SELECT source, count(*) FROM feedback_events GROUP BY source")
    return dict(found)  # type: ignore[arg-type]


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json()


async def test_evaluations_are_stored_once_as_feedback_with_their_source(
    make_settings: Callable[..., Any], start_daemon: Callable[..., Any], judge_server: FakeLLM
) -> None:
    """Sampled calls are scored by the code check and (when it passes) the judge; each
    result is one feedback event with source eval:<name> on the call's prompt, variant and
    request; the judge sees people's correction, never the variant; agreement with people
    is tracked; HTTP shows it all."""
    settings = make_settings(evaluation=evaluation(judge_server))
    running = await start_daemon(settings)
    daemon, kafka = running.daemon, settings.kafka
    # A correction first, so the judge can use it as the reference.
    await produce(kafka.bootstrap_servers, kafka.feedback_topic, [human(0, 1.0, "the reference")])
    await wait_for(lambda: by_source(daemon), timeout=20)
    outputs = ["a good answer" if i % 2 else "a poor answer" for i in range(12)]
    outputs += ["good " * 20, None]  # too long for the judge's only_if; nothing captured
    await produce(
        kafka.bootstrap_servers, kafka.metrics_topic, [metric(i, o) for i, o in enumerate(outputs)]
    )
    await produce(
        kafka.bootstrap_servers,
        kafka.feedback_topic,
        [human(i, 1.0 if i % 2 else 0.0) for i in range(1, 12)],
    )

    async def all_stored() -> bool:
        return await by_source(daemon) == {None: 12, "eval:short": 13, "eval:helpful": 12}

    await wait_for(all_stored, timeout=30)
    stored = await rows(
        daemon,
        "SELECT request_id, variant, score, kind, source, event_id FROM feedback_events "
        "WHERE source = 'eval:helpful' ORDER BY request_id",
    )
    for request_id, variant, score, kind, _source, _eid in stored:
        i = int(request_id.split("-")[1])
        assert variant == f"variant-{i % 2}"
        assert score == (1.0 if i % 2 else 0.25)
        assert kind == "judge"
    assert len({r[5] for r in stored}) == 12
    short = dict(
        await rows(
            daemon, "SELECT request_id, score FROM feedback_events WHERE source = 'eval:short'"
        )
    )
    assert short["req-12"] == 0.0
    assert all(short[f"req-{i}"] == 1.0 for i in range(12))
    sent = [m["content"] for body in judge_server.requests for m in body["messages"]]
    assert not any("variant-" in text for text in sent)
    assert sum("the reference" in text for text in sent) == 1

    async def agreement() -> Any:
        _, body = await get_json(f"{running.url}/v1/evaluators/helpful")
        found = body["agreement"]
        return found[0] if found and found[0]["pairs"] == 12 else None

    report = await wait_for(agreement, timeout=20)
    people = [1.0] + [1.0 if i % 2 else 0.0 for i in range(1, 12)]
    judged = [1.0 if i % 2 else 0.25 for i in range(12)]
    assert report["spearman"]["value"] == pytest.approx(stats.spearmanr(people, judged).statistic)
    status, body = await get_json(f"{running.url}/v1/evaluators/helpful")
    assert status == 200
    assert body["since_start"] == {
        "sampled": 14,
        "scored": 12,
        "skipped_no_output": 1,
        "skipped_only_if": 1,
    }
    assert body["stored"]["scored"] == 12
    assert body["stored"]["unpublished"] == 0
    assert len(body["recent"]) == 12
    status, _ = await get_json(f"{running.url}/v1/evaluators/nope")
    assert status == 404
    reg = daemon.registry
    assert (
        reg.get_sample_value(
            "promptd_evaluation_results_total", {"evaluator": "short", "status": "scored"}
        )
        == 13
    )
    assert (
        reg.get_sample_value(
            "promptd_evaluator_agreement_pairs", {"evaluator": "helpful", "prompt": PROMPT}
        )
        == 12
    )
    # Publishing again stores nothing new: the event ids are the results'.
    await daemon.db.writer.execute("UPDATE evaluation_results SET published_at = NULL")
    await daemon.db.writer.commit()
    engine = daemon.components["evaluation"]
    engine.outbox.wake()
    await wait_for(
        lambda: reg.get_sample_value("promptd_evaluation_published_total") == 50, timeout=20
    )
    await wait_for(
        lambda: reg.get_sample_value("promptd_events_duplicates_total") == 25, timeout=20
    )
    assert await by_source(daemon) == {None: 12, "eval:short": 13, "eval:helpful": 12}


async def test_an_outage_is_a_metric_an_alert_and_a_readiness_detail(
    make_settings: Callable[..., Any], start_daemon: Callable[..., Any], judge_server: FakeLLM
) -> None:
    """With the judge down the code check goes on; the judge is reported down (gauge,
    alert, /readyz detail while staying ready), probed, and up again when it answers."""
    judge_server.responder = lambda body: (503, {"error": {"message": "overloaded"}})
    settings = make_settings(evaluation=evaluation(judge_server))
    running = await start_daemon(settings)
    daemon, kafka = running.daemon, settings.kafka
    reg = daemon.registry
    with structlog.testing.capture_logs() as logs:
        await produce(
            kafka.bootstrap_servers,
            kafka.metrics_topic,
            [metric(i, "a good answer") for i in range(6)],
        )

        def judge_down() -> bool:
            return reg.get_sample_value("promptd_evaluator_up", {"evaluator": "helpful"}) == 0

        await wait_for(judge_down, timeout=20)
        await wait_for(lambda: by_source(daemon), timeout=20)
        assert any(e["event"] == "alert_firing" and e["rule"] == "evaluator_down" for e in logs)
    status, ready = await get_json(f"{running.url}/readyz")
    assert status == 200
    assert any("'helpful' down" in line for line in ready["degraded"])
    skipped = reg.get_sample_value(
        "promptd_evaluation_skipped_total", {"evaluator": "helpful", "reason": "error"}
    )
    assert skipped is not None
    assert skipped >= 2

    async def checks_went_on() -> bool:
        return (await by_source(daemon)).get("eval:short") == 6

    await wait_for(checks_went_on, timeout=20)

    judge_server.responder = judge_answer
    sent = iter(range(100, 1000))

    async def probed_back_up() -> bool:
        # While down the judge is probed once per probe_interval_s, when calls come.
        await produce(kafka.bootstrap_servers, kafka.metrics_topic, [metric(next(sent), "good")])
        return reg.get_sample_value("promptd_evaluator_up", {"evaluator": "helpful"}) == 1

    with structlog.testing.capture_logs() as logs:
        await wait_for(probed_back_up, timeout=20, interval=0.1)
    assert any(e["event"] == "alert_resolved" and e["rule"] == "evaluator_down" for e in logs)
    status, ready = await get_json(f"{running.url}/readyz")
    assert "degraded" not in ready


async def test_budget_bounds_the_judge_and_counts_the_rest(
    make_settings: Callable[..., Any], start_daemon: Callable[..., Any], judge_server: FakeLLM
) -> None:
    """Three judgements per minute: the other sampled calls are counted, not queued."""
    settings = make_settings(evaluation=evaluation(judge_server, max_calls_per_minute=3))
    running = await start_daemon(settings)
    daemon, kafka = running.daemon, settings.kafka
    await produce(
        kafka.bootstrap_servers, kafka.metrics_topic, [metric(i, "good") for i in range(10)]
    )

    async def counted() -> Any:
        _, body = await get_json(f"{running.url}/v1/evaluators/helpful")
        counts = body["since_start"]
        return (
            counts if counts.get("scored", 0) + counts.get("skipped_budget_rate", 0) == 10 else None
        )

    counts = await wait_for(counted, timeout=20)
    assert counts["scored"] == 3
    assert counts["skipped_budget_rate"] == 7
    assert len(judge_server.requests) == 3
    await wait_for(lambda: by_source(daemon), timeout=5)
