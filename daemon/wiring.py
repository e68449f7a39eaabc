"""Plug the optional parts (monitoring, replacement, optimization) into a :class:`Daemon`.

Each part adds its batch listeners, HTTP routes and background tasks here, so the
core lifecycle in ``app.py`` does not grow with every feature.
"""

from __future__ import annotations

from promptd.daemon.app import Daemon


def install_components(daemon: Daemon) -> None:
    """Attach every component enabled in ``daemon.settings``."""
    _ = daemon
