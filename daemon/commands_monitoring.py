"""CLI: ``promptd alerts`` and ``promptd stats PROMPT``."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> dict[str, Any]:
    """Add the monitoring subcommands."""
    _ = sub
    return {}
