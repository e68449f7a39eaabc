"""The example store: production calls with captured input/output joined to their feedback.

An example is a :class:`~promptd.events.MetricEvent` that carries ``input`` (and usually
``output``) plus every :class:`~promptd.events.FeedbackEvent` with the same
``request_id``: mean score, the comments, the latest correction. Nothing is copied: the
queries join the two event tables, driven by the feedback time index and the partial
``request_id`` index on captured calls, so retention of raw events (``storage.retention_days``)
is also the store's retention. ``max_age_s`` narrows it further and ``limit`` caps the
size of every answer, so a run's memory does not grow with traffic.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from promptd.storage.database import Database
from promptd.storage.repository import EventRepository

_SELECT: Final = """
SELECT m.request_id, m.variant, max(m.ts), m.input, m.output,
       avg(f.score), count(f.id),
       group_concat(f.comment, ' | '),
       (SELECT f2.correction FROM feedback_events f2
         WHERE f2.request_id = m.request_id AND f2.correction IS NOT NULL
         ORDER BY f2.ts DESC LIMIT 1)
  FROM feedback_events f
  JOIN metric_events m ON m.request_id = f.request_id AND m.input IS NOT NULL
 WHERE f.id >= ? AND f.ts >= ? AND f.prompt = ? AND m.prompt = ?
 GROUP BY m.request_id
"""


@dataclass(frozen=True, slots=True)
class Example:
    """One production call with its feedback."""

    request_id: str
    variant: str
    ts: float
    input: dict[str, Any] | str
    output: dict[str, Any] | str | None
    score: float
    n_feedback: int
    comments: str | None
    correction: dict[str, Any] | str | None

    @property
    def reference(self) -> str | None:
        """The answer to compare with: the correction if any, else nothing."""
        return None if self.correction is None else as_text(self.correction)


def as_text(value: dict[str, Any] | str | None) -> str:
    """A captured payload as text (strings unchanged, objects as compact JSON)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _load(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _example(row: Sequence[Any]) -> Example:
    return Example(
        request_id=row[0],
        variant=row[1],
        ts=float(row[2]),
        input=_load(row[3]),
        output=_load(row[4]),
        score=float(row[5]),
        n_feedback=int(row[6]),
        comments=row[7],
        correction=_load(row[8]),
    )


class ExampleStore:
    """Read-only queries over the event tables (on the reader connection)."""

    def __init__(self, db: Database, max_age_s: float, limit: int) -> None:
        self.db = db
        self.max_age_s = max_age_s
        self.limit = limit

    async def _query(
        self, prompt: str, now: float, tail: str, extra: Sequence[Any] = ()
    ) -> list[Example]:
        since = now - self.max_age_s
        # feedback_events has no ts index: start the scan at the first row id that can
        # be recent enough (see storage/schema.py, ingest_batches).
        floor = await EventRepository(self.db).first_id_since("feedback_events", since)
        params = (floor, since, prompt, prompt, *extra, self.limit)
        async with self.db.reader.execute(_SELECT + tail + " LIMIT ?", params) as cur:
            rows = await cur.fetchall()
        return [_example(r) for r in rows]

    async def best_rated(self, prompt: str, now: float, min_score: float) -> list[Example]:
        """Examples with mean score ≥ ``min_score``, best and most rated first."""
        return await self._query(
            prompt,
            now,
            " HAVING avg(f.score) >= ? ORDER BY avg(f.score) DESC, count(f.id) DESC, m.request_id",
            (min_score,),
        )

    async def worst_rated(self, prompt: str, now: float, max_score: float = 1.0) -> list[Example]:
        """Examples with mean score ≤ ``max_score``, worst first (corrections first on ties)."""
        return await self._query(
            prompt,
            now,
            " HAVING avg(f.score) <= ? ORDER BY avg(f.score) ASC, "
            "count(f.correction) DESC, m.request_id",
            (max_score,),
        )

    async def with_corrections(self, prompt: str, now: float) -> list[Example]:
        """Examples where someone supplied the right answer, newest first."""
        return await self._query(
            prompt, now, " HAVING count(f.correction) > 0 ORDER BY max(f.ts) DESC"
        )

    async def recent(self, prompt: str, now: float) -> list[Example]:
        """All examples, newest first (the pool for held-out splits)."""
        return await self._query(prompt, now, " ORDER BY max(f.ts) DESC, m.request_id")


def split_held_out(
    examples: Sequence[Example], run_id: str, size: int
) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)``: a random split that is the same every time for ``run_id``.

    Each example gets a rank from a hash of the run id and its request id, so the split
    does not depend on query order and a resumed or re-evaluated run sees the same
    held-out set; at most half of the examples are held out, so training keeps some.
    """

    def rank(e: Example) -> str:
        return hashlib.sha256(f"{run_id}\x00{e.request_id}".encode()).hexdigest()

    ordered = sorted(examples, key=rank)
    n = min(size, len(ordered) // 2)
    held = {e.request_id for e in ordered[:n]}
    return [e for e in examples if e.request_id not in held], ordered[:n]
