"""The real ``promptd`` process: configuration errors are one clear line, flags and
variables are honoured or refused (never silently ignored), and every log line is JSON."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from promptd import __version__
from promptd.daemon.broker import EmbeddedBroker, free_port
from tests.integration.test_process import PROMPTD, _env, _get, _wait_ready

pytestmark = pytest.mark.integration


def _run(
    tmp_path: Path, *argv: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROMPTD, *argv],
        env=env if env is not None else _env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _is_log_record(line: str) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and "event" in record


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a failed command: no traceback, and besides it only
    JSON log records (which `run` writes while it starts)."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not _is_log_record(line)]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[dict[str, str], int, subprocess.Popen[str]]]:
    """`promptd run` (embedded broker), with its environment and HTTP port."""
    port = free_port()
    env = _env(tmp_path, PROMPTD_HTTP_PORT=str(port))
    proc = subprocess.Popen(
        [*PROMPTD, "run"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_ready(port)
        yield env, port, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


# -- errors are one line that names the file or setting --------------------------------


@pytest.mark.parametrize("which", ["http", "embedded broker"])
def test_port_in_use_is_one_line_naming_the_setting(tmp_path: Path, which: str) -> None:
    """A port already taken (the HTTP API's, or the embedded broker's) stops `promptd run`
    with one line naming the setting and the address, not a traceback, before any
    migration runs or the broker starts."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        variable = "PROMPTD_HTTP_PORT" if which == "http" else "PROMPTD_KAFKA__EMBEDDED_PORT"
        result = _run(tmp_path, "run", env=_env(tmp_path, **{variable: str(port)}))
    line = _one_line(result)
    assert f"127.0.0.1:{port}" in line
    assert variable in line
    assert ("http.port" if which == "http" else "kafka.embedded_port") in line
    assert "in use" in line
    if which != "http":
        assert "PROMPTD_KAFKA_BOOTSTRAP_SERVERS" in line  # the way to use a running Kafka
    assert not (tmp_path / "data" / "promptd.db").exists()  # no migration ran
    assert "embedded_broker_started" not in result.stderr


def _read_only(path: Path) -> list[str]:
    """A command prefix under which ``path`` is read-only, even for root."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return []
    unshare = shutil.which("unshare")
    probe = subprocess.run(
        [unshare or "unshare", "-m", "true"], capture_output=True, check=False, timeout=10
    )
    if unshare is None or probe.returncode != 0:
        pytest.skip("running as root without mount namespaces: cannot make a read-only dir")
    quoted = str(path).replace("'", "'\\''")
    script = f"mount --bind '{quoted}' '{quoted}' && mount -o remount,bind,ro '{quoted}'"
    return [unshare, "-m", "sh", "-c", script + ' && exec "$@"', "sh"]


@pytest.mark.parametrize("existing_database", [False, True])
def test_read_only_data_dir_is_one_line_naming_it(tmp_path: Path, existing_database: bool) -> None:
    """A data directory that cannot be written stops `promptd run` with one line naming
    the directory and the setting (storage.data_dir / PROMPTD_DATA_DIR)."""
    data = tmp_path / "data"
    env = _env(tmp_path)
    if existing_database:
        assert _run(tmp_path, "init", env=env).returncode == 0
    else:
        data.mkdir()
    prefix = _read_only(data)
    try:
        result = subprocess.run(
            [*prefix, *PROMPTD, "run"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        data.chmod(0o755)
    line = _one_line(result)
    assert str(data) in line
    assert "PROMPTD_DATA_DIR" in line
    assert "sqlite3" not in line


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """A config file that is not valid TOML is reported with its path and the position."""
    config = tmp_path / "broken.toml"
    config.write_text('log_level = "info\n')
    line = _one_line(_run(tmp_path, "--config", str(config), "status"))
    assert str(config) in line
    assert "line 1" in line


def test_short_admin_token_is_not_echoed(tmp_path: Path) -> None:
    """A too-short admin token is refused naming the setting, without printing the token."""
    secret = "hunter2-secret"
    line = _one_line(_run(tmp_path, "init", env=_env(tmp_path, PROMPTD_ADMIN_TOKEN=secret)))
    assert "PROMPTD_ADMIN_TOKEN" in line
    assert "16" in line
    assert secret not in line


def test_unknown_variable_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    """A misspelt PROMPTD_ variable stops the command, naming it and the closest name."""
    line = _one_line(_run(tmp_path, "init", env=_env(tmp_path, PROMPTD_HTTP_PROT="9000")))
    assert "PROMPTD_HTTP_PROT" in line
    assert "PROMPTD_HTTP_PORT" in line


def test_unknown_variable_in_dotenv_is_an_error(tmp_path: Path) -> None:
    """A misspelt variable in .env is refused too, naming the .env file."""
    (tmp_path / ".env").write_text("PROMPTD_LOG_LEVL=debug\n")
    line = _one_line(_run(tmp_path, "init"))
    assert "PROMPTD_LOG_LEVL" in line
    assert "PROMPTD_LOG_LEVEL" in line
    assert ".env" in line


def test_unprefixed_variables_are_ignored(tmp_path: Path) -> None:
    """ADMIN_TOKEN (no PROMPTD_ prefix) is not the admin token: a short one is no error."""
    result = _run(tmp_path, "init", env=_env(tmp_path, ADMIN_TOKEN="short", DATA_DIR="/nope"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "promptd.db").is_file()


def test_sdk_daemon_url_in_dotenv_breaks_no_command(tmp_path: Path) -> None:
    """A .env written for the SDK (PROMPTD_DAEMON_URL, PROMPTD_SDK_*) is fine for the CLI."""
    (tmp_path / ".env").write_text(
        "PROMPTD_DAEMON_URL=http://127.0.0.1:8787\nPROMPTD_SDK_QUEUE_SIZE=100\n"
    )
    result = _run(tmp_path, "init")
    assert result.returncode == 0, result.stderr


def test_unknown_default_profile_fails_at_start(tmp_path: Path) -> None:
    """rollout.default_profile naming no profile stops `promptd run` at once, naming the
    setting and the known profiles (built-in and configured)."""
    config = tmp_path / "c.toml"
    config.write_text(
        '[rollout]\ndefault_profile = "fast"\n'
        "[rollout.profiles.careful]\nsteps = [{weight = 1.0, min_duration_s = 1}]\n"
    )
    line = _one_line(_run(tmp_path, "run", "--config", str(config), timeout=30))
    assert "rollout.default_profile" in line
    assert "'fast'" in line
    for known in ("balanced", "conservative", "aggressive", "careful"):
        assert known in line


# -- flags ------------------------------------------------------------------------------


def test_version_flag(tmp_path: Path) -> None:
    """`promptd --version` prints the version and exits 0."""
    result = _run(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"promptd {__version__}"


def test_config_flag_after_the_subcommand(tmp_path: Path) -> None:
    """--config is read when given after the subcommand too."""
    config = tmp_path / "c.toml"
    config.write_text('[storage]\ndatabase_name = "from-config.db"\n')
    result = _run(tmp_path, "init", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "from-config.db").is_file()


def test_run_takes_the_common_settings_as_flags(tmp_path: Path) -> None:
    """`promptd run --data-dir D --http-host H --http-port P --log-level debug
    --kafka-bootstrap-servers B` uses them all (flags win over the environment)."""
    data = tmp_path / "flag-data"
    port = free_port()
    env = _env(tmp_path, PROMPTD_HTTP_PORT="1", PROMPTD_LOG_LEVEL="error")
    log = tmp_path / "stderr.log"
    with EmbeddedBroker() as broker, log.open("w") as log_file:
        proc = subprocess.Popen(
            [
                *PROMPTD,
                "run",
                "--data-dir",
                str(data),
                "--http-host",
                "127.0.0.1",
                "--http-port",
                str(port),
                "--log-level",
                "debug",
                "--kafka-bootstrap-servers",
                broker.bootstrap_servers,
            ],
            env=env,
            cwd=tmp_path,
            stderr=log_file,  # a file: debug logs would fill a pipe nobody reads
        )
        try:
            _wait_ready(port)
            status = _get(f"http://127.0.0.1:{port}/v1/status")[1]
            assert status["kafka"]["bootstrap_servers"] == broker.bootstrap_servers
            assert not status["kafka"]["embedded"]
            assert (data / "promptd.db").is_file()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    levels = {json.loads(line)["level"] for line in log.read_text().splitlines()}
    assert "debug" in levels


def test_json_flag_before_and_after_the_subcommand(
    tmp_path: Path, daemon: tuple[dict[str, str], int, subprocess.Popen[str]]
) -> None:
    """`promptd --json status` and `promptd status --json` both print the status JSON;
    so do `promptd --json alerts` and `promptd prompts list --json`."""
    env, _, _ = daemon
    for argv in (
        ["--json", "status"],
        ["status", "--json"],
        ["--json", "alerts"],
        ["prompts", "list", "--json"],
        ["--json", "prompts", "list"],
    ):
        result = _run(tmp_path, *argv, env=env)
        assert result.returncode == 0, (argv, result.stderr)
        assert isinstance(json.loads(result.stdout), dict), argv


# -- the SDK's variables ----------------------------------------------------------------


def test_sdk_topic_variables_are_honoured_by_the_daemon(tmp_path: Path) -> None:
    """An app and the daemon sharing an environment with PROMPTD_KAFKA_METRICS_TOPIC (the
    SDK's flat name) use the same topic: the app's event is stored."""
    tag = uuid.uuid4().hex[:8]
    port = free_port()
    with EmbeddedBroker() as broker:
        env = _env(
            tmp_path,
            PROMPTD_HTTP_PORT=str(port),
            PROMPTD_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
            PROMPTD_KAFKA_METRICS_TOPIC=f"app-metrics-{tag}",
            PROMPTD_KAFKA_FEEDBACK_TOPIC=f"app-feedback-{tag}",
            PROMPTD_DAEMON_URL=f"http://127.0.0.1:{port}",
        )
        proc = subprocess.Popen(
            [*PROMPTD, "run"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_ready(port)
            app = (
                "import promptd\n"
                "@promptd.instrument(prompt='p', model='m', version='v1')\n"
                "def call():\n    return 'ok'\n"
                "call()\n"
                "promptd.feedback(promptd.last_request_id(), 1.0)\n"
                "assert promptd.flush(20), promptd.sdk_stats()\n"
            )
            subprocess.run(
                [sys.executable, "-c", app], env=env, cwd=tmp_path, check=True, timeout=60
            )
            deadline = time.monotonic() + 30
            stored: Any = 0
            while time.monotonic() < deadline:
                stored = _get(f"http://127.0.0.1:{port}/v1/status")[1]["events"]["stored"]
                if stored == 2:
                    break
                time.sleep(0.2)
            assert stored == 2
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=20)


# -- logs and publishing ------------------------------------------------------------------


def test_every_log_line_is_json_including_aiokafka(tmp_path: Path) -> None:
    """With Kafka unreachable aiokafka logs connection errors; they come out as JSON lines
    with a level and an event, like the daemon's own."""
    env = _env(
        tmp_path,
        PROMPTD_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
        PROMPTD_KAFKA__REQUEST_TIMEOUT_MS="1000",
        PROMPTD_KAFKA__RETRY_BACKOFF_MAX_S="0.5",
        PROMPTD_HTTP_PORT=str(free_port()),
    )
    proc = subprocess.Popen(
        [*PROMPTD, "run"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    lines: list[str] = []
    # Read in a thread so the wait is bounded by a deadline, not by a fixed sleep (a loaded
    # machine may take seconds to start the daemon).
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any('"logger": "aiokafka' in x for x in lines):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    reader.join(timeout=5)
    proc.stderr.close()
    lines = [line for line in lines if line.strip()]
    records = [json.loads(line) for line in lines]  # every line parses
    assert all({"event", "level", "timestamp"} <= set(r) for r in records), lines
    assert any(r.get("logger", "").startswith("aiokafka") for r in records), lines


def test_publishing_to_unreachable_kafka_is_one_line(tmp_path: Path) -> None:
    """`promptd metrics` with Kafka down prints one line naming the address, no warning
    about an unclosed producer."""
    dead = f"127.0.0.1:{free_port()}"
    env = _env(tmp_path, PROMPTD_KAFKA_BOOTSTRAP_SERVERS=dead)
    result = _run(tmp_path, "metrics", "v1", "m", "12", "--prompt", "p", env=env)
    line = _one_line(result)
    assert dead in line
    assert "Unclosed" not in result.stderr
