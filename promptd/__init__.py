"""promptd: continuous prompt improvement for production LLM applications.

Apps import only this package: the SDK (``instrument``, ``feedback``, ``configure``, ...),
the event models and the routing hash. Importing it must stay cheap (no scipy, litellm or
aiosqlite), so the pydantic event models are loaded on first attribute access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from promptd.sdk import (
    Episode,
    PromptVariant,
    SdkConfig,
    SdkStats,
    afeedback,
    aflush,
    astart,
    configure,
    current_episode_id,
    current_request_id,
    current_variant,
    episode,
    feedback,
    flush,
    instrument,
    last_request_id,
    sdk_stats,
    set_unit_id,
    shutdown,
    start,
    unit_scope,
)

if TYPE_CHECKING:
    from promptd.events import FeedbackEvent, MetricEvent

__version__ = "0.1.0"

_LAZY = {"FeedbackEvent": "promptd.events", "MetricEvent": "promptd.events"}


def __getattr__(name: str) -> Any:
    # PEP 562: the event models pull in pydantic (~0.1 s), which the SDK hot path
    # never needs; load them when someone asks.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'promptd' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Episode",
    "FeedbackEvent",
    "MetricEvent",
    "PromptVariant",
    "SdkConfig",
    "SdkStats",
    "__version__",
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
    "instrument",
    "last_request_id",
    "sdk_stats",
    "set_unit_id",
    "shutdown",
    "start",
    "unit_scope",
]
