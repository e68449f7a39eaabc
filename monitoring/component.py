"""Wiring of the monitor into the daemon (windows, rules, sinks, export)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from promptd.daemon.app import Daemon


def install(daemon: Daemon) -> None:
    """Attach the monitor to ``daemon`` (startup hook, batch listener, routes, task)."""
    _ = daemon
