"""Wiring of the optimizer into the daemon."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from promptd.daemon.app import Daemon


def install(daemon: Daemon) -> None:
    """Attach the optimizer to ``daemon`` (startup hook, routes, task)."""
    _ = daemon
