"""CLI: ``promptd optimize``, ``optimizations``, ``recommendations``."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> dict[str, Any]:
    """Add the optimization subcommands."""
    _ = sub
    return {}
