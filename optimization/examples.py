"""Examples and splits: production calls joined to their feedback, split once and for all.

An example is a :class:`~promptd.events.MetricEvent` that carries ``input`` (and usually
``output``) plus every :class:`~promptd.events.FeedbackEvent` with the same
``request_id`` and every one on the call's whole episode (``episode_id``, no
``request_id``): mean score, the comments, the latest correction (the call's own).
Nothing is copied: the query joins the two event tables, so retention of raw events
(``storage.retention_days``) is also the store's retention.

A run reads its examples through a :class:`Snapshot`: the time and the highest event row
ids when it started. A resumed run (after a restart) reads exactly the same examples
with the same mean scores, so its search replays from the evaluation cache instead of
paying again, whatever arrived in between.

:func:`split` assigns each example to train, validation or test by a hash of the split
salt and its ``request_id``; the assignment does not depend on the run, the query order
or the other examples, so a test example is never seen by any run's search.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

from promptd.demos import as_text
from promptd.evaluation.signals import HUMAN, sql_condition_named
from promptd.storage.database import Database
from promptd.storage.repository import EventRepository

SplitName = Literal["train", "validation", "test"]

# The feedback of the prompt's optimizer signals counts ({signals}: people's by default,
# source IS NULL; an evaluator's, or both, when the prompt chooses them); the correction
# is always people's.
# Feedback is aggregated per request first, then joined to the request's latest captured
# call (a retried call stores two metric events; it must not count the feedback twice).
# A call's feedback is its own plus its episode's: feedback on a whole episode (no
# request_id) counts for every captured call of the prompt in that episode. The
# correction stays the call's own: an episode's correction is of the final answer.
_SELECT: Final = """
WITH fb (request_id, fid, score, comment, ts) AS (
    SELECT f.request_id, f.id, f.score, f.comment, f.ts
      FROM feedback_events f
     WHERE f.id >= :floor AND f.id <= :max_f AND f.ts >= :since AND f.prompt = :prompt
       AND f.request_id IS NOT NULL AND {signals}
    UNION
    SELECT m.request_id, f.id, f.score, f.comment, f.ts
      FROM feedback_events f
      JOIN metric_events m ON m.episode_id = f.episode_id AND m.episode_id IS NOT NULL
     WHERE f.id >= :floor AND f.id <= :max_f AND f.ts >= :since AND f.request_id IS NULL
       AND {signals} AND m.prompt = :prompt AND m.input IS NOT NULL AND m.id <= :max_m
)
SELECT m.request_id, m.variant, m.ts, m.input, m.output, agg.score, agg.n, agg.comments,
       (SELECT f2.correction FROM feedback_events f2
         WHERE f2.request_id = agg.request_id AND f2.correction IS NOT NULL AND f2.id <= :max_f
           AND f2.source IS NULL
         ORDER BY f2.ts DESC, f2.id DESC LIMIT 1)
  FROM (SELECT request_id, avg(score) AS score, count(*) AS n,
               group_concat(comment, ' | ') AS comments, max(ts) AS last_ts
          FROM fb GROUP BY request_id) agg
  JOIN metric_events m ON m.id = (
        SELECT max(m2.id) FROM metric_events m2
         WHERE m2.request_id = agg.request_id AND m2.input IS NOT NULL
           AND m2.id <= :max_m AND m2.prompt = :prompt)
 ORDER BY agg.last_ts DESC, m.request_id
 LIMIT :limit
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

    def reference(self, min_score: float) -> str | None:
        """The answer to compare with: the correction, else the call's own output when
        it was rated at least ``min_score``; ``None`` when there is no trusted answer."""
        if self.correction is not None:
            return as_text(self.correction)
        if self.output is not None and self.score >= min_score:
            return as_text(self.output)
        return None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The bounds a run reads its examples within (persisted with the run)."""

    now: float
    max_feedback_id: int
    max_metric_id: int

    def to_dict(self) -> dict[str, float | int]:
        """JSON form for the run row."""
        return {
            "now": self.now,
            "max_feedback_id": self.max_feedback_id,
            "max_metric_id": self.max_metric_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Snapshot:
        """Inverse of :meth:`to_dict`."""
        return cls(float(data["now"]), int(data["max_feedback_id"]), int(data["max_metric_id"]))


class HasRequestId(Protocol):
    """What splits hash: a call's ``request_id`` (an episode's id for episodes)."""

    @property
    def request_id(self) -> str:
        """The id the split hashes."""
        ...


T = TypeVar("T", bound=HasRequestId)


@dataclass(frozen=True, slots=True)
class Splits(Generic[T]):
    """A run's examples (or episodes) by split."""

    train: list[T]
    validation: list[T]
    test: list[T]

    def sizes(self) -> dict[str, int]:
        """Counts per split, for logs and the run row."""
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
        }


def load_payload(text: str | None) -> Any:
    """A stored payload: its JSON value, or the text itself when it is not JSON."""
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
        input=load_payload(row[3]),
        output=load_payload(row[4]),
        score=float(row[5]),
        n_feedback=int(row[6]),
        comments=row[7],
        correction=load_payload(row[8]),
    )


async def read_snapshot(db: Database, now: float) -> Snapshot:
    """The bounds of the event tables now: what a run started now may read."""
    out = []
    for table in ("feedback_events", "metric_events"):
        async with db.reader.execute(f"SELECT coalesce(max(id), 0) FROM {table}") as cur:
            row = await cur.fetchone()
        out.append(int(row[0]) if row else 0)
    return Snapshot(now, out[0], out[1])


class EventReader:
    """Read-only queries over the event tables (on the reader connection), bounded by a
    :class:`Snapshot`, feedback at most ``max_age_s`` old, at most ``limit`` results."""

    def __init__(self, db: Database, max_age_s: float, limit: int) -> None:
        self.db = db
        self.max_age_s = max_age_s
        self.limit = limit

    async def snapshot(self, now: float) -> Snapshot:
        """The current bounds: what a run started now may read."""
        return await read_snapshot(self.db, now)


class ExampleStore(EventReader):
    """A prompt's examples: its calls with the feedback of its optimizer signals
    (``signals_of(prompt)``; people's by default)."""

    def __init__(
        self,
        db: Database,
        max_age_s: float,
        limit: int,
        signals_of: Callable[[str], tuple[str, ...]] | None = None,
    ) -> None:
        super().__init__(db, max_age_s, limit)
        self.signals_of = signals_of or (lambda prompt: (HUMAN,))

    async def examples(self, prompt: str, snapshot: Snapshot) -> list[Example]:
        """The prompt's examples within ``snapshot``, newest feedback first, capped."""
        since = snapshot.now - self.max_age_s
        # feedback_events has no ts index: start the scan at the first row id that can
        # be recent enough (see storage/schema.py, ingest_batches).
        floor = await EventRepository(self.db).first_id_since("feedback_events", since)
        params = {
            "floor": floor,
            "max_f": snapshot.max_feedback_id,
            "max_m": snapshot.max_metric_id,
            "since": since,
            "prompt": prompt,
            "limit": self.limit,
        }
        signals, named = sql_condition_named(self.signals_of(prompt), "f.source")
        async with self.db.reader.execute(_SELECT.format(signals=signals), params | named) as cur:
            rows = await cur.fetchall()
        return [_example(r) for r in rows]


def split_of(request_id: str, salt: str, train: float, validation: float) -> SplitName:
    """The split ``request_id`` belongs to: a uniform hash in [0, 1) cut at the shares."""
    digest = hashlib.sha256(f"{salt}\x00{request_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < train:
        return "train"
    if u < train + validation:
        return "validation"
    return "test"


def split(examples: Sequence[T], salt: str, train: float, validation: float) -> Splits[T]:
    """Examples by split, each in a hash order that does not depend on the query.

    Callers cap a split by taking a prefix (after filtering what they can score), so a
    capped split is stable too: the same pool always keeps the same examples.
    """
    parts: dict[SplitName, list[T]] = {"train": [], "validation": [], "test": []}
    for e in examples:
        parts[split_of(e.request_id, salt, train, validation)].append(e)

    def rank(e: T) -> bytes:
        return hashlib.sha256(f"{salt}\x01{e.request_id}".encode()).digest()

    return Splits(
        train=sorted(parts["train"], key=rank),
        validation=sorted(parts["validation"], key=rank),
        test=sorted(parts["test"], key=rank),
    )
