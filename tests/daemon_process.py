"""A real ``promptd run`` process for tests and benchmarks: start, signal, read its log."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

PROMPTD = [sys.executable, "-m", "promptd.daemon.cli"]


def environment(bootstrap: str, tag: str, token: str, **extra: str) -> dict[str, str]:
    """This process's environment without ``PROMPTD_`` variables, plus a daemon's: the
    broker, topics and group named by ``tag``, a free HTTP port, the admin token, JSON
    logs, and ``extra`` (``PROMPTD_…`` names)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTD_")}
    env.update(
        {
            "PROMPTD_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "PROMPTD_KAFKA__GROUP_ID": f"g-{tag}",
            "PROMPTD_KAFKA__METRICS_TOPIC": f"m-{tag}",
            "PROMPTD_KAFKA__FEEDBACK_TOPIC": f"f-{tag}",
            "PROMPTD_KAFKA__DLQ_TOPIC": f"dlq-{tag}",
            "PROMPTD_KAFKA__ALERTS_TOPIC": f"alerts-{tag}",
            "PROMPTD_KAFKA__ROUTING_TOPIC": f"routing-{tag}",
            "PROMPTD_KAFKA__OPTIMIZATION_TOPIC": f"opt-{tag}",
            "PROMPTD_HTTP_PORT": "0",
            "PROMPTD_ADMIN_TOKEN": token,
            "PROMPTD_LOG_FORMAT": "json",
            **extra,
        }
    )
    return env


class DaemonProcess:
    """One ``promptd run`` with its own data directory and a log file."""

    def __init__(self, root: Path, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.data = root / name
        self.log_path = root / f"{name}.log"
        self.env = {**env, "PROMPTD_DATA_DIR": str(self.data), "PROMPTD_HA__IDENTITY": name}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        """Start ``promptd run`` (stdout and stderr into the log file)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*PROMPTD, "run"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    async def wait_started(self, timeout: float = 30.0) -> None:
        """Until the daemon wrote ``runtime.json`` (its HTTP port); fails if it exits."""
        from tests.conftest import wait_for

        runtime = self.data / "runtime.json"

        def started() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited early:\n{self.log_path.read_text()}")
            return runtime.exists()

        await wait_for(started, timeout=timeout)
        self.port = int(json.loads(runtime.read_text())["http_port"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs() if e.get("event") == name]

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode
