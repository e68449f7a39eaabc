"""One daemon per data directory: an exclusive ``flock`` held for the process lifetime.

The lock file (``promptd.lock`` in the data directory) holds the holder's pid, host and
start time as JSON, so a second daemon can say who is in the way. The kernel drops the
lock when the holder's process ends, however it ends (SIGKILL included), so a stale lock
never blocks a restart; the file itself stays, and only its lock counts.

Files that only a live holder may have (``runtime.json``) are written and removed by the
holder alone: :class:`DataDirLock` removes a stale one when it takes the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

LOCK_FILE = "promptd.lock"


@dataclass(frozen=True, slots=True)
class LockHolder:
    """Who holds a data directory, as written in its lock file."""

    pid: int
    host: str
    started_at: float

    def describe(self) -> str:
        """``pid 123 on host h since 2026-01-01T00:00:00Z``."""
        since = datetime.fromtimestamp(self.started_at, UTC).isoformat(timespec="seconds")
        return f"pid {self.pid} on host {self.host} since {since.replace('+00:00', 'Z')}"


class DataDirLockedError(RuntimeError):
    """Another process holds the data directory's lock."""

    def __init__(self, path: Path, holder: LockHolder | None) -> None:
        who = f"promptd {holder.describe()}" if holder else "another process"
        super().__init__(
            f"data directory {str(path.parent)!r} is in use by {who} (lock {str(path)!r}): "
            "one daemon per data directory; stop it or set PROMPTD_DATA_DIR"
        )
        self.path = path
        self.holder = holder


def read_holder(path: Path) -> LockHolder | None:
    """The holder recorded in the lock file at ``path`` (``None`` if unreadable)."""
    try:
        data = json.loads(path.read_text())
        return LockHolder(int(data["pid"]), str(data["host"]), float(data["started_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class DataDirLock:
    """The exclusive lock of one data directory; :meth:`acquire` once, :meth:`release` at exit."""

    def __init__(self, data_dir: Path, owned_files: tuple[str, ...] = ()) -> None:
        self.path = data_dir / LOCK_FILE
        self._owned = [data_dir / name for name in owned_files]
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> LockHolder:
        """Take the lock or raise :class:`DataDirLockedError` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Python opens it close-on-exec, so the embedded broker never inherits the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirLockedError(self.path, read_holder(self.path)) from None
        me = LockHolder(os.getpid(), socket.gethostname(), time.time())
        body = json.dumps({"pid": me.pid, "host": me.host, "started_at": me.started_at})
        os.ftruncate(fd, 0)
        os.pwrite(fd, body.encode(), 0)
        self._fd = fd
        # We hold the lock, so whoever wrote these is gone.
        for stale in self._owned:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        return me

    def release(self) -> None:
        """Remove the files only the holder may have, then drop the lock."""
        if self._fd is None:
            return
        for owned in self._owned:
            with contextlib.suppress(FileNotFoundError):
                owned.unlink()
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None
