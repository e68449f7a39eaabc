"""The app-side SDK: ``@instrument``, ``feedback`` and the background publisher.

Importing it is cheap: pydantic, aiokafka, aiohttp and prometheus_client are imported
only in the SDK's sender thread, once there is something to send.
"""

from __future__ import annotations

from promptd.sdk.client import (
    Client,
    afeedback,
    aflush,
    astart,
    configure,
    feedback,
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
