"""The app-side SDK: ``@instrument``, ``feedback`` and the background publisher.

Importing it is cheap: pydantic, aiokafka, aiohttp and prometheus_client are imported
only in the SDK's sender thread, once there is something to send.
"""

from __future__ import annotations

import contextlib
from typing import Any

from promptd.sdk.client import (
    Client,
    aflush,
    astart,
    configure,
    flush,
    get_client,
    sdk_stats,
    shutdown,
    start,
)
from promptd.sdk.config import SdkConfig
from promptd.sdk.context import (
    current_request_id,
    current_variant,
    last_request_id,
    set_unit_id,
    unit_scope,
)
from promptd.sdk.instrument import instrument
from promptd.sdk.routing_client import PromptVariant
from promptd.sdk.stats import SdkStats


def feedback(
    request_id: str,
    score: float | bool,
    kind: str = "quality",
    comment: str | None = None,
    correction: Any = None,
    *,
    prompt: str | None = None,
    variant: str | PromptVariant | None = None,
    model: str | None = None,
) -> None:
    """Report feedback on the call ``request_id``: ``score`` in 0..1 (``True`` = 1.0).

    Never blocks and never raises. ``prompt`` and ``variant`` may be omitted when the
    call was made by this process (the SDK remembers the last ``feedback_lru_size``
    calls); feedback that cannot be joined is dropped as ``unknown_request``.
    """
    # Client.feedback counts its own errors; this guards building the client.
    with contextlib.suppress(Exception):
        get_client().feedback(
            request_id,
            score,
            kind,
            comment,
            correction,
            prompt=prompt,
            variant=variant,
            model=model,
        )


async def afeedback(
    request_id: str,
    score: float | bool,
    kind: str = "quality",
    comment: str | None = None,
    correction: Any = None,
    *,
    prompt: str | None = None,
    variant: str | PromptVariant | None = None,
    model: str | None = None,
) -> None:
    """Async twin of :func:`feedback` (equally non-blocking; for symmetry in async code)."""
    feedback(
        request_id,
        score,
        kind,
        comment,
        correction,
        prompt=prompt,
        variant=variant,
        model=model,
    )


__all__ = [
    "Client",
    "PromptVariant",
    "SdkConfig",
    "SdkStats",
    "afeedback",
    "aflush",
    "astart",
    "configure",
    "current_request_id",
    "current_variant",
    "feedback",
    "flush",
    "get_client",
    "instrument",
    "last_request_id",
    "sdk_stats",
    "set_unit_id",
    "shutdown",
    "start",
    "unit_scope",
]
