"""Sticky assignment of units to the arms of a rollout.

``bucket(salt, unit_id)`` is the cross-language contract: take the SHA-256 digest of the
UTF-8 bytes of ``salt + ":" + unit_id``, read its first 8 bytes as an unsigned big-endian
64-bit integer, and reduce it modulo 10,000. Any language with SHA-256 reproduces it
(the tests hold golden vectors). The modulo bias is below 10,000 / 2**64, i.e. nil.

A unit is in the candidate arm when ``bucket < round(weight * 10000)``. Raising the weight
only adds buckets, so every unit already in the candidate arm stays there; a weight of 0
sends everyone to the active version at once.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

BUCKETS: Final = 10_000


def bucket(salt: str, unit_id: str) -> int:
    """Stable bucket 0..9999 of ``unit_id`` under ``salt`` (see the module docstring)."""
    digest = hashlib.sha256(f"{salt}:{unit_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def threshold(weight: float) -> int:
    """Number of buckets in the candidate arm for a traffic ``weight`` in 0..1."""
    return max(0, min(BUCKETS, round(weight * BUCKETS)))


def in_candidate(salt: str, unit_id: str, weight: float) -> bool:
    """True when ``unit_id`` is served the candidate at this weight."""
    return bucket(salt, unit_id) < threshold(weight)


class Routing(BaseModel):
    """What ``GET /v1/prompts/{name}/routing`` returns and ``promptd.routing`` carries."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    active_version: str | None = None
    active_template: str | None = None
    # A configuration version's messages, model and parameters (see
    # promptd.prompt_config); its template is then its canonical text, not for formatting.
    active_config: dict[str, Any] | None = None
    candidate_version: str | None = None
    candidate_template: str | None = None
    candidate_config: dict[str, Any] | None = None
    weight: float = Field(default=0.0, ge=0.0, le=1.0)
    salt: str = ""
    rollout_id: str | None = None
    ttl_seconds: float = 30.0
    updated_at: float = 0.0

    def choose(self, unit_id: str) -> tuple[str | None, str | None]:
        """Return ``(version, template)`` serving ``unit_id``."""
        if (
            self.candidate_version is not None
            and self.weight > 0.0
            and in_candidate(self.salt, unit_id, self.weight)
        ):
            return self.candidate_version, self.candidate_template
        return self.active_version, self.active_template
