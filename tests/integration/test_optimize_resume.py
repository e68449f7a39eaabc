"""A triggered optimization run survives SIGKILL of the real ``promptd run`` process: the
next start resumes it, and no model call that was answered is paid for again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from promptd.daemon.broker import EmbeddedBroker, free_port
from promptd.events import FeedbackEvent, MetricEvent, new_event_id
from promptd.optimization.llm import close_litellm
from tests.kafka_helpers import produce
from tests.optimize_fake_llm import FakeLLM
from tests.optimize_task import TEMPLATE, responder, rows

pytestmark = pytest.mark.integration

PROMPTD = [sys.executable, "-m", "promptd.daemon.cli"]
TOKEN = "resume-test-admin-token"
PROMPT = "city"


def _config(tmp_path: Path, broker: EmbeddedBroker, api_base: str, port: int) -> Path:
    tag = uuid.uuid4().hex[:8]
    model = f'{{ model = "openai/test-model", api_base = "{api_base}", temperature = 0.0 }}'
    text = f"""
log_level = "info"
[kafka]
bootstrap_servers = "{broker.bootstrap_servers}"
group_id = "resume-{tag}"
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
admin_token = "{TOKEN}"
[optimization]
enable_automatic_optimization = false
max_concurrency = 1
retry_backoff_s = 0.05
proposer = {model}
[optimization.evaluation]
metric = "token_f1"
bootstrap_samples = 1000
model = {model}
[optimization.mipro]
num_instructions = 3
num_demo_sets = 3
num_trials = 6
"""
    path = tmp_path / "promptd.toml"
    path.write_text(text)
    return path


def _start(config: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTD_")}
    # The child keeps its own copy of the descriptor; ours is closed at once.
    with (tmp_path / f"daemon-{time.monotonic_ns()}.log").open("wb") as log:
        return subprocess.Popen(
            [*PROMPTD, "--config", str(config), "run"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def _ready(
    http: aiohttp.ClientSession, proc: subprocess.Popen[bytes], interval: float = 0.2
) -> float:
    """Wait for ``/readyz`` 200; the monotonic time of the last answer that was not."""
    deadline = time.monotonic() + 60
    unready = time.monotonic()
    while time.monotonic() < deadline:
        assert proc.poll() is None, "promptd exited early"
        try:
            async with http.get("/readyz") as resp:
                if resp.status == 200:
                    return unready
        except aiohttp.ClientError:
            pass
        unready = time.monotonic()
        await asyncio.sleep(interval)
    raise AssertionError("promptd never became ready")


async def _publish(broker: EmbeddedBroker, config_tag: str) -> None:
    now = time.time()
    metrics, feedback = [], []
    for i, r in enumerate(rows(240)):
        metrics.append(
            MetricEvent(
                event_id=new_event_id(),
                ts=now - 600 + i,
                prompt=PROMPT,
                variant="v1",
                model="m",
                request_id=r.request_id,
                latency_ms=10.0,
                success=True,
                input=r.input,
                output=r.output,
            ).to_json()
        )
        feedback.append(
            FeedbackEvent(
                event_id=new_event_id(),
                ts=now - 300 + i,
                prompt=PROMPT,
                variant="v1",
                request_id=r.request_id,
                score=r.scores[0],
                kind="quality",
                correction=r.correction,
            ).to_json()
        )
    await produce(broker.bootstrap_servers, f"m-{config_tag}", metrics, key=PROMPT.encode())
    await produce(broker.bootstrap_servers, f"f-{config_tag}", feedback, key=PROMPT.encode())


async def _poll(http: aiohttp.ClientSession, path: str, ok: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with http.get(path) as resp:
            body = await resp.json()
        if ok(body):
            return body
        await asyncio.sleep(0.3)
    raise AssertionError(f"{path} never satisfied the condition: {body}")


async def test_triggered_run_resumes_after_sigkill_without_repeating_calls(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    """SIGKILL mid-search, restart: the run resumes (resumes = 1) once the daemon is
    ready, and completes; every request answered before the kill is never sent again
    (only the one in flight), and the run counts every request it paid for, the one
    lost in flight included."""
    calls: list[tuple[int, str]] = []
    arrived: list[float] = []
    life = {"n": 1}
    held = asyncio.Event()

    async def answer(body: dict[str, Any]) -> str:
        calls.append((life["n"], json.dumps(body["messages"], sort_keys=True)))
        arrived.append(time.monotonic())
        if life["n"] == 1 and len(calls) > 40:
            held.set()
            await asyncio.sleep(3600)  # in flight when the daemon is killed
        return responder(body)

    fake = await FakeLLM(answer).start()
    port = free_port()
    config = _config(tmp_path, broker, fake.api_base, port)
    tag = config.read_text().split('group_id = "resume-')[1].split('"')[0]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    first = _start(config, tmp_path)
    second: subprocess.Popen[bytes] | None = None
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            await _ready(http, first)
            async with http.post(
                f"/v1/prompts/{PROMPT}/versions", json={"template": TEMPLATE}, headers=auth
            ) as resp:
                assert resp.status in (200, 201), await resp.text()
            await _publish(broker, tag)
            await _poll(http, "/v1/status", lambda b: b["events"]["stored"] >= 480)
            async with http.post(
                f"/v1/optimize/{PROMPT}", json={"strategies": ["mipro"]}, headers=auth
            ) as resp:
                assert resp.status == 202, await resp.text()
                run_id = (await resp.json())["run_id"]
            await asyncio.wait_for(held.wait(), 120)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            paid_before = len(calls) - 1
            life["n"] = 2

            second = _start(config, tmp_path)
            unready = await _ready(http, second, interval=0.02)
            run = await _poll(
                http, f"/v1/optimizations/{run_id}", lambda b: b["status"] != "running", 180
            )
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        await close_litellm()
        await fake.stop()
    assert run["status"] == "completed", run
    assert run["resumes"] == 1
    before = [key for life_n, key in calls if life_n == 1]
    after = [key for life_n, key in calls if life_n == 2]
    answered_before = set(before[:paid_before])
    assert not answered_before & set(after), "an answered call was paid for again"
    assert len(after) > 0
    assert max(Counter(after).values()) == 1
    assert min(arrived[len(before) :]) > unready, "a resumed run paid before /readyz was 200"
    assert run["llm_calls"] == len(calls), "every request the model received was paid"
