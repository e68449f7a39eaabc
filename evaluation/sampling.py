"""Which calls an evaluator takes: a stable hash of ``request_id`` and the evaluator's name.

The decision, reproducible in any language:

- ``h = CRC-32(UTF-8 bytes of request_id)`` (the zlib / ISO-HDLC CRC, as ``zlib.crc32``);
- ``a = first 4 bytes of SHA-256(UTF-8 bytes of the evaluator's name)``, big-endian,
  with the lowest bit set (odd);
- the call is sampled when ``(a * h) mod 2**32 < round(rate * 2**32)``.

Multiplying by an odd number is a bijection of 32-bit integers, so every evaluator samples
``rate`` of the calls, and different names (different multipliers) sample close to
independently (multiply-shift hashing). It depends on ``request_id`` alone, not on the
variant, the unit or the time: both arms of a rollout are sampled alike, and a call is
sampled or not the same way live and after a restart.

Why not the routing hash (SHA-256 per call): it costs about 0.55 us per call and
evaluator in CPython, about 10 % of the whole ingest path per call; CRC-32 of the id once
per call plus one multiplication per evaluator costs about a fifth of that (see
``bench/ingest.py --evaluation``). CRC-32 alone is affine, so two names salted into it
would give sample sets tied to each other; the multiplication breaks that tie.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from typing import Final

from promptd.storage.rows import MetricRow

from .config import EvaluationSettings, Evaluator

_MASK: Final = 0xFFFF_FFFF
_SPAN: Final = 1 << 32
#: Distinct prompt names whose plans are cached (names come from events: bounded).
MAX_CACHED_PROMPTS: Final = 10_000

# Where a metric row holds what sampling reads (storage.rows column order).
_PROMPT: Final = 2
_REQUEST: Final = 5


def request_hash(request_id: str) -> int:
    """CRC-32 of the request id's UTF-8 bytes."""
    return zlib.crc32(request_id.encode())


def multiplier(name: str) -> int:
    """The evaluator's odd 32-bit multiplier."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") | 1


def threshold(rate: float) -> int:
    """Sampled values are below this (``rate`` in 0..1)."""
    return max(0, min(_SPAN, round(rate * _SPAN)))


def is_sampled(name: str, rate: float, request_id: str) -> bool:
    """Whether evaluator ``name`` at ``rate`` takes the call ``request_id``."""
    return (multiplier(name) * request_hash(request_id)) & _MASK < threshold(rate)


Plan = tuple[tuple[int, int, Evaluator], ...]
Sampled = tuple[MetricRow, tuple[Evaluator, ...]]


class Sampler:
    """The sampling decisions of the configured evaluators, built for the ingest path:
    per prompt, the evaluators that select it (cached), then one CRC-32 per call and
    one multiplication per evaluator."""

    def __init__(self, settings: EvaluationSettings) -> None:
        self._evaluators = [
            (multiplier(e.name), threshold(e.sample_rate), e) for e in settings.evaluators
        ]
        self._plans: dict[str, Plan] = {}

    def plan(self, prompt: str) -> Plan:
        """``(multiplier, threshold, evaluator)`` of every evaluator selecting ``prompt``."""
        found = self._plans.get(prompt)
        if found is None:
            found = tuple(item for item in self._evaluators if item[2].selects(prompt))
            if len(self._plans) >= MAX_CACHED_PROMPTS:
                self._plans.clear()
            self._plans[prompt] = found
        return found

    def sample(self, rows: Sequence[MetricRow]) -> list[Sampled]:
        """The rows some evaluator takes, each with those evaluators (config order)."""
        hits: list[tuple[MetricRow, Evaluator]] = []
        plans = self._plans
        crc = zlib.crc32
        # The ingest path: plain loops, no generator or tuple per call.
        for row in rows:
            prompt = row[_PROMPT]
            plan = plans.get(prompt)
            if plan is None:
                plan = self.plan(prompt)
            if plan:
                h = crc(row[_REQUEST].encode())
                for a, t, e in plan:
                    if (a * h) & _MASK < t:
                        hits.append((row, e))
        if not hits:
            return []
        grouped: dict[int, tuple[MetricRow, list[Evaluator]]] = {}
        for row, e in hits:
            grouped.setdefault(id(row), (row, []))[1].append(e)
        return [(row, tuple(evaluators)) for row, evaluators in grouped.values()]

    def sampled_by(self, prompt: str, request_id: str) -> tuple[Evaluator, ...]:
        """The evaluators that take the call ``request_id`` of ``prompt``."""
        plan = self.plan(prompt)
        if not plan:
            return ()
        h = request_hash(request_id)
        return tuple(e for a, t, e in plan if (a * h) & _MASK < t)
