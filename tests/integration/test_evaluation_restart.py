"""SIGKILL of the real ``promptd run`` process while evaluations are pending: after the
restart every sampled call has exactly one result stored as feedback, and no judgement
that was answered before the kill is asked for again."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from promptd.daemon.broker import EmbeddedBroker, free_port
from promptd.evaluation.sampling import is_sampled
from promptd.events import MetricEvent, new_event_id
from promptd.optimization.llm import close_litellm
from promptd.storage.database import Database
from tests.integration.test_optimize_resume import _poll, _ready, _start
from tests.kafka_helpers import produce
from tests.optimize_fake_llm import FakeLLM

pytestmark = pytest.mark.integration

CALLS = 40
JUDGE_RATE = 0.5


def _config(tmp_path: Path, broker: EmbeddedBroker, api_base: str, port: int, tag: str) -> Path:
    text = f"""
log_level = "info"
[kafka]
bootstrap_servers = "{broker.bootstrap_servers}"
group_id = "eval-{tag}"
metrics_topic = "m-{tag}"
feedback_topic = "f-{tag}"
dlq_topic = "dlq-{tag}"
alerts_topic = "alerts-{tag}"
routing_topic = "routing-{tag}"
optimization_topic = "opt-{tag}"
session_timeout_ms = 1000
heartbeat_interval_ms = 300
[storage]
data_dir = "{tmp_path / "data"}"
[http]
port = {port}
[evaluation]
concurrency = 2
cursor_interval_s = 0.1
outbox_interval_s = 0.1
[[evaluation.evaluators]]
name = "nonempty"
type = "length"
min_chars = 1
sample_rate = 1.0
[[evaluation.evaluators]]
name = "judge"
type = "judge"
rubric = "Is it right?"
model = "openai/judge"
api_base = "{api_base}"
sample_rate = {JUDGE_RATE}
request_timeout_s = 600
"""
    path = tmp_path / "promptd.toml"
    path.write_text(text)
    return path


def _calls(tag: str) -> list[bytes]:
    return [
        MetricEvent(
            event_id=new_event_id(),
            ts=time.time() - 60,
            prompt="qa",
            variant="v1",
            model="m",
            request_id=f"req-{i}",
            latency_ms=10.0,
            success=True,
            input={"question": f"question {i}"},
            output=f"answer {i}",
        ).to_json()
        for i in range(CALLS)
    ]


async def test_sigkill_with_evaluations_pending_loses_none_and_repeats_none(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    """The judge answers some calls, then hangs; SIGKILL; the restarted daemon judges
    the rest: one stored feedback per sampled (call, evaluator), no answered judgement
    asked again."""
    asked: list[tuple[int, str]] = []
    life = {"n": 1}
    held, release = asyncio.Event(), asyncio.Event()

    async def answer(body: dict[str, Any]) -> str:
        question = json.loads(body["messages"][-1]["content"].split("\n")[1])["question"]
        asked.append((life["n"], question))
        if life["n"] == 1 and len(asked) > 6:
            held.set()
            await release.wait()  # pending when the daemon is killed
        return "4"

    fake = await FakeLLM(answer).start()
    port, tag = free_port(), uuid.uuid4().hex[:8]
    config = _config(tmp_path, broker, fake.api_base, port, tag)
    first = _start(config, tmp_path)
    second: subprocess.Popen[bytes] | None = None
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            await _ready(http, first)
            await produce(broker.bootstrap_servers, f"m-{tag}", _calls(tag), key=b"qa")
            await asyncio.wait_for(held.wait(), 60)
            await _poll(http, "/v1/evaluators/judge", lambda b: b["stored"]["scored"] >= 6, 30)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            answered = [q for n, q in asked if n == 1][:6]
            life["n"] = 2
            second = _start(config, tmp_path)
            await _ready(http, second)
            sampled = {
                f"req-{i}" for i in range(CALLS) if is_sampled("judge", JUDGE_RATE, f"req-{i}")
            }

            def all_published(body: dict[str, Any]) -> bool:
                stored = {e["name"]: e["stored"] for e in body["evaluators"]}
                return (
                    stored["judge"].get("scored") == len(sampled)
                    and stored["nonempty"].get("scored") == CALLS
                    and stored["judge"]["unpublished"] == stored["nonempty"]["unpublished"] == 0
                )

            await _poll(http, "/v1/evaluators", all_published, 60)
            await _poll(
                http,
                "/v1/status",
                lambda b: b["events"]["stored_feedback"] == CALLS + len(sampled),
                30,
            )
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        release.set()
        await close_litellm()
        await fake.stop()
    db = await Database.open(tmp_path / "data" / "promptd.db")
    try:
        async with db.reader.execute(
            "SELECT source, request_id, count(*) FROM feedback_events GROUP BY source, request_id"
        ) as cur:
            stored = [tuple(r) for r in await cur.fetchall()]
    finally:
        await db.close()
    assert {r for s, r, _ in stored if s == "eval:judge"} == sampled
    assert {r for s, r, _ in stored if s == "eval:nonempty"} == {f"req-{i}" for i in range(CALLS)}
    assert all(n == 1 for _, _, n in stored)
    again = [q for n, q in asked if n == 2]
    assert not set(answered) & set(again), "a judgement answered before the kill was asked again"
    assert len(again) == len(set(again))
    assert {f"req-{q.split()[1]}" for q in [*answered, *again]} == sampled
