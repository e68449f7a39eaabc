"""A throwaway PostgreSQL cluster: ``initdb`` and ``pg_ctl`` in a temporary directory.

Used by the test suite (one cluster per xdist worker, a fresh database per test) and by
``bench/ingest.py --storage postgresql``. PostgreSQL refuses to run as root, so under
root (CI) the server runs as ``nobody`` (``runuser``) in a directory that user owns.
Durability is off (``fsync``, ``synchronous_commit``, ``full_page_writes``) for the tests,
whose cluster dies with them; benchmarks ask for it on (``durable=True``), as in production.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

#: Where Debian puts the server binaries (``initdb`` is also on PATH there).
_DEBIAN_BINARIES = "/usr/lib/postgresql/*/bin"


def find_binaries() -> Path | None:
    """The directory with ``initdb``, ``pg_ctl`` and ``postgres``, or ``None``."""
    candidates = sorted(glob.glob(_DEBIAN_BINARIES), reverse=True)
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.insert(0, str(Path(os.path.realpath(initdb)).parent))
    for directory in candidates:
        path = Path(directory)
        if all((path / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
            return path
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """One running cluster on a free loopback port, trusted local connections."""

    def __init__(self, binaries: Path, durable: bool = False) -> None:
        self.binaries = binaries
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="promptd-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self._user: str | None = None
        if os.geteuid() == 0:
            # initdb and postgres refuse root: run them as nobody, in a directory it owns.
            self._user = "nobody"
            shutil.chown(self.root, user=self._user)

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        command = [str(self.binaries / args[0]), *args[1:]]
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=timeout, cwd=self.root)

    def start(self) -> PostgresCluster:
        """initdb, then start the server (retrying on another port if one is taken)."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")  # fmt: skip
        for _attempt in range(3):
            self.port = _free_port()
            options = (
                f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                "-c max_connections=200"
            )
            if not self.durable:
                options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"),
                          "-o", options, "-w", "-t", "30", "start")  # fmt: skip
                return self
            except subprocess.CalledProcessError:
                continue
        raise RuntimeError(f"PostgreSQL did not start; see {self.root / 'log'}")

    def url(self, database: str = "postgres") -> str:
        """The URL of ``database`` on this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_store(self) -> str:
        """A new empty store: a schema of its own on the ``postgres`` database, named by
        the URL's ``search_path`` (asyncpg passes it on as a server setting). A schema
        takes milliseconds where a database takes most of a second."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f'CREATE SCHEMA "{name}"')
        return f"{self.url()}?search_path={name}"

    def drop_store(self, url: str) -> None:
        """Drop the schema of a :meth:`create_store` URL with everything in it."""
        name = url.rsplit("search_path=", 1)[1]
        self.psql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

    def psql(self, sql: str) -> str:
        """Run ``sql`` on the ``postgres`` database; returns psql's output."""
        psql = shutil.which("psql") or str(self.binaries / "psql")
        done = subprocess.run(
            [psql, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", self.url(), "-c", sql],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return done.stdout

    def stop(self) -> None:
        """Stop the server at once and delete its directory."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
