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
    Episode,
    current_episode_id,
    current_request_id,
    current_variant,
    episode,
    last_request_id,
    set_unit_id,
    unit_scope,
)
from promptd.sdk.instrument import instrument
from promptd.sdk.routing_client import PromptVariant
from promptd.sdk.stats import SdkStats


def feedback(
    request_id: str | None = None,
    score: float | bool | None = None,
    kind: str = "quality",
    comment: str | None = None,
    correction: Any = None,
    *,
    episode_id: str | None = None,
    prompt: str | None = None,
    variant: str | PromptVariant | None = None,
    model: str | None = None,
) -> None:
    """Report feedback: ``score`` in 0..1 (``True`` = 1.0) on the call ``request_id``, or,
    with only ``episode_id``, on a whole episode (credited to every call in it).

    Never blocks. Raises only for a bad ``score``, as for a bad argument: ``TypeError``
    when it is missing or not a number, ``ValueError`` outside 0..1. For a call,
    ``prompt`` and ``variant`` may be omitted when this process made it (the SDK
    remembers the last ``feedback_lru_size`` calls); call feedback that cannot be joined
    is dropped as ``unknown_request``. Episode feedback needs neither. Feedback naming
    neither a request nor an episode is dropped as ``invalid``.
    """
    score = check_score(score)
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
            episode_id=episode_id,
        )


def check_score(score: object) -> float | bool:
    """``score`` when it is a number in 0..1 or a bool; else ``TypeError``/``ValueError``."""
    if score is None:
        raise TypeError("promptd.feedback() needs a score (0..1, or True/False)")
    if isinstance(score, bool):
        return score
    if not isinstance(score, int | float):
        raise TypeError(
            f"promptd.feedback(): score must be a number from 0 to 1 or True/False, "
            f"got {type(score).__name__} {score!r}"
        )
    if not 0.0 <= score <= 1.0:  # NaN fails this too
        raise ValueError(
            f"promptd.feedback(): score must be from 0 to 1 (0 = bad, 1 = good; "
            f"True/False for thumbs), got {score!r}; scale a rating first, "
            "e.g. stars / 5"
        )
    return score


async def afeedback(
    request_id: str | None = None,
    score: float | bool | None = None,
    kind: str = "quality",
    comment: str | None = None,
    correction: Any = None,
    *,
    episode_id: str | None = None,
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
        episode_id=episode_id,
        prompt=prompt,
        variant=variant,
        model=model,
    )


__all__ = [
    "Client",
    "Episode",
    "PromptVariant",
    "SdkConfig",
    "SdkStats",
    "afeedback",
    "aflush",
    "astart",
    "configure",
    "current_episode_id",
    "current_request_id",
    "current_variant",
    "episode",
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
