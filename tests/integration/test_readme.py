"""The README's examples, in order, as a user copies them, against one real `promptd run`.

Every snippet is read from README.md itself, so the README cannot drift from what works:
the plain script, the chat configuration, the pipeline, the rollout commands and the
optimizer's settings and command. One daemon (embedded broker, SQLite in ./data, the HTTP
API) serves every step; the models are the local OpenAI-compatible server the optimizer's
tests use, reached the way the README says (``OPENAI_BASE_URL`` for the app's OpenAI
client, ``api_base`` in the optimizer's settings).

What a user would fill in is filled in the same way: the ports (free ones, as tests run
side by side, instead of 9092 and 8787), the prompt names of commands written for another
prompt, a rollout's id, the placeholders of a command's synopsis.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from promptd.daemon.broker import free_port
from tests.integration.test_process import _get, _wait_ready
from tests.optimize_fake_llm import FakeLLM, serving, user_text
from tests.optimize_task import is_proposer

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
PROMPTD = [sys.executable, "-m", "promptd.daemon.cli"]
TICKETS = 150
INSTRUCTION = "Label the ticket as bug, billing or other. Answer with the label only."
#: What the test adds to the README's optimizer settings: the run is started by the
#: README's command, not by the feedback-volume trigger the script's feedback would fire.
TEST_SETTINGS = "\n[optimization]\nenable_automatic_optimization = false\n"


def block(language: str, marker: str) -> str:
    """The one fenced ``language`` block of the README that contains ``marker``."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.M | re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"{len(found)} ```{language} blocks contain {marker!r}"
    return str(found[0])


def commands(sh_block: str) -> list[str]:
    """The command lines of a sh block, comments left out."""
    lines = (line.split("  #")[0].split(" # ")[0].strip() for line in sh_block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _label(ticket: str) -> str:
    # The scripted model: right on most tickets, wrong ("bug") on slow pages.
    if "charged" in ticket or "invoice" in ticket:
        return "billing"
    return "bug" if "crash" in ticket or "slow" in ticket else "other"


def _answer(body: dict[str, Any]) -> str:
    text = user_text(body)
    if is_proposer(body) and "expert prompt engineer" in text:
        return f"<instruction>{INSTRUCTION}</instruction>"
    tickets = re.findall(r"Ticket \d+: [^\n]*", text)
    return _label(tickets[-1] if tickets else text)


def _tickets() -> str:
    kinds = (
        "the app crashes when I open photo {i}",
        "I was charged twice for order {i}",
        "where can I download invoice {i}?",
        "how do I change my avatar ({i})?",
        "the page is slow since update {i}",
    )
    return "".join(f"Ticket {i}: {kinds[i % len(kinds)].format(i=i)}\n" for i in range(TICKETS))


class User:
    """A shell in a fresh directory with `promptd run` up: runs what the README says."""

    def __init__(self, cwd: Path, env: dict[str, str], http_port: int, broker_port: int):
        self.cwd = cwd
        self.env = env
        self.http_port = http_port
        self.broker_port = broker_port

    def localize(self, text: str) -> str:
        """The README's addresses, on this test's ports."""
        return text.replace("localhost:9092", f"localhost:{self.broker_port}").replace(
            "localhost:8787", f"localhost:{self.http_port}"
        )

    async def run(self, line: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """One command line of the README (``promptd`` is this checkout's)."""
        argv = shlex.split(line)
        if Path(argv[0]).name == "promptd":
            argv = [*PROMPTD, *argv[1:]]
        result = await asyncio.to_thread(
            subprocess.run,
            argv,
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        if check:
            assert result.returncode == 0, (line, result.stdout, result.stderr)
        return result

    def write(self, name: str, text: str) -> None:
        """Save a snippet as the file the README names."""
        (self.cwd / name).write_text(text)

    def status(self) -> dict[str, Any]:
        """``GET /v1/status``."""
        return dict(_get(f"http://127.0.0.1:{self.http_port}/v1/status")[1])


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    """The app's model, the evaluation model and the proposer."""
    async with serving(_answer) as server:
        yield server


async def test_the_readme_examples_work_as_written(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """Plain script, chat configuration, pipeline, rollout and optimizer, from the README,
    against one `promptd run`: nothing is dropped, every call is stored under the
    registered version, a chat configuration with params binds in a pipeline (also
    after a promoted one), the rollout reads in text, the optimizer runs without
    litellm's log noise, and the daemon stops cleanly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMPTD_", "OPENAI_"))}
    http_port, broker_port = free_port(), free_port()
    env |= {
        "PROMPTD_HTTP_PORT": str(http_port),
        "PROMPTD_KAFKA__EMBEDDED_PORT": str(broker_port),
        "OPENAI_API_KEY": "test-key",
        "OPENAI_BASE_URL": fake_llm.api_base,
    }
    user = User(tmp_path, env, http_port, broker_port)
    optimizer = block("toml", "[optimization.proposer]")
    optimizer = optimizer.replace('# api_base = "http://localhost:8000/v1"', "api_base = ")
    optimizer = re.sub(r"api_base = [^\n]*", f'api_base = "{fake_llm.api_base}"', optimizer)
    user.write("promptd.toml", optimizer + TEST_SETTINGS)
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
        [*PROMPTD, "run", "--config", "promptd.toml"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        await asyncio.to_thread(_wait_ready, http_port)
        await _plain_script(user)
        await _chat_configuration_and_pipeline(user)
        await _rollout(user)
        await _optimize(user)
        daemon.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 20) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
    logged = (tmp_path / "daemon.log").read_text()
    assert "PydanticSerializationUnexpectedValue" not in logged
    assert "Traceback" not in logged


async def _plain_script(user: User) -> None:
    """Register the prompt, run the script over the tickets: every event is delivered
    (no SDK warning) and stored under the registered version, from the first call on."""
    [register] = commands(block("sh", "promptd prompts register classify"))
    await user.run(register)
    user.write("tickets.txt", _tickets())
    user.write("app.py", user.localize(block("python", 'prompt="classify"')))
    result = await user.run(f"{sys.executable} app.py")
    assert "promptd SDK" not in result.stderr, result.stderr
    assert f"emitted={2 * TICKETS}, delivered={2 * TICKETS}, dropped=0" in result.stdout
    await _until(lambda: user.status()["events"]["stored"] == 2 * TICKETS)
    database = f"file:{user.cwd / 'data' / 'promptd.db'}?mode=ro"
    with sqlite3.connect(database, uri=True) as db:
        rows = db.execute("SELECT DISTINCT variant FROM metric_events WHERE prompt = 'classify'")
        assert {variant for (variant,) in rows} == {"v1"}


async def _chat_configuration_and_pipeline(user: User) -> None:
    """extract.toml (params included) registered with --chat, then geo.toml."""
    register_chat = re.search(r"`(promptd prompts register extract --chat extract\.toml)`", _text())
    assert register_chat is not None
    user.write("extract.toml", block("toml", "# extract.toml"))
    assert "registered  extract v1 (active)" in (await user.run(register_chat.group(1))).stdout
    user.write("geo.toml", block("toml", "# geo.toml"))
    for line in commands(block("sh", "promptd pipelines register geo.toml")):
        await user.run(line)


async def _rollout(user: User) -> None:
    """A new extract.toml as v2, rolled out and promoted by the README's commands; the
    status reads in words; the pipeline is redefined after the promotion."""
    start, status, command = commands(block("sh", "promptd rollout start summarize v2"))
    changed = block("toml", "# extract.toml").replace("max_tokens = 128", "max_tokens = 256")
    user.write("extract.toml", changed)
    register_chat = re.search(r"`(promptd prompts register extract --chat extract\.toml)`", _text())
    assert register_chat is not None
    assert "extract v2 (candidate)" in (await user.run(register_chat.group(1))).stdout
    started = await user.run(start.replace("summarize", "extract").replace(" [--require-win]", ""))
    rollout_id = re.search(r"^rollout\s+(\S+)$", started.stdout, re.M)
    assert rollout_id is not None, started.stdout
    shown = await user.run(status.replace("[ROLLOUT_ID]", rollout_id.group(1)))
    assert "step 1, 10% of units on the candidate" in shown.stdout
    assert re.search(r"^  candidate\s+\d+ requests", shown.stdout, re.M), shown.stdout
    promote = command.replace("pause|resume|promote|rollback", "promote")
    await user.run(
        promote.replace("ROLLOUT_ID", rollout_id.group(1)).replace(" [--reason TEXT]", "")
    )
    ended = await user.run(status.replace("[ROLLOUT_ID]", rollout_id.group(1)))
    assert "ended: v2 was promoted and serves all traffic" in ended.stdout
    assert "step / weight" not in ended.stdout
    await user.run("promptd pipelines register geo.toml")
    await _closed_pipe(user, status.replace("[ROLLOUT_ID]", "--json"))


async def _closed_pipe(user: User, line: str) -> None:
    """`… --json | head` that stops reading: no traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = await asyncio.to_thread(
            subprocess.run,
            [*PROMPTD, *shlex.split(line)[1:]],
            cwd=user.cwd,
            env=user.env,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (141, "")


async def _optimize(user: User) -> None:
    """The README's optimizer command on the script's prompt follows its run to the end
    (it exits 0 only for a completed run); the listing shows it."""
    optimize, *listings = commands(block("sh", "promptd optimize summarization"))
    result = await user.run(optimize.replace("summarization", "classify"))
    assert re.search(r"run \S+ started for classify", result.stdout), result.stdout
    runs = await user.run(listings[0])
    assert "classify" in runs.stdout


def _text() -> str:
    return README.read_text()


async def _until(predicate: Any, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)
