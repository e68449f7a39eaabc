"""One ingested batch: what its write did, and the SQL and counters both backends share.

Each backend writes a batch its fastest way (SQLite: multi-row INSERTs on the writer's
thread, :mod:`.sqlite_batch`; PostgreSQL: COPY, :mod:`.pg_batch`) under one contract: the
events and their partitions' next offsets in one transaction, duplicates by ``event_id``
skipped and counted, and a :class:`BatchOutcome` naming exactly the rows stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from promptd.storage.rows import (
    FEEDBACK_SOURCE_AT,
    FeedbackRow,
    FeedbackView,
    MetricRow,
    MetricView,
    feedback_views,
    metric_views,
)

TopicPartitionKey = tuple[str, int]

UPSERT_OFFSET: Final = """
INSERT INTO consumer_offsets (topic, partition, next_offset, updated_at, watermark)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (topic, partition) DO UPDATE SET
    next_offset = excluded.next_offset, updated_at = excluded.updated_at,
    watermark = coalesce(excluded.watermark, consumer_offsets.watermark)
"""
INSERT_WATERMARK: Final = "INSERT INTO batch_watermarks (ingested_at, watermark) VALUES (?, ?)"
ADD_COUNTER: Final = """
INSERT INTO counters (name, value) VALUES (?, ?)
ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value
"""

#: Counter names kept in the ``counters`` table (dead letters add ``dead_lettered.<reason>``).
STORED_METRICS: Final = "stored.metric"
STORED_FEEDBACK: Final = "stored.feedback"
#: Of the stored feedback, evaluators' results (``source`` set).
STORED_EVALUATIONS: Final = "stored.evaluation"
DUPLICATES: Final = "duplicates"
DEAD_LETTERED: Final = "dead_lettered"
#: Prefix of what ingestion counted of OpenTelemetry spans (``otlp.spans.call``, ...).
OTLP_COUNTERS: Final = "otlp"


@dataclass(frozen=True, slots=True)
class BatchTime:
    """The event-time facts of one batch (see monitoring/eventtime.py): when it is stored,
    the window watermark it is windowed under (``None``: none) and the partitions'
    watermarks once it is in."""

    ingested_at: float
    watermark: float | None = None
    partition_watermarks: Mapping[TopicPartitionKey, float] | None = None

    def offset_rows(
        self, offsets: Mapping[TopicPartitionKey, int]
    ) -> list[tuple[str, int, int, float, float | None]]:
        """The parameters of :data:`UPSERT_OFFSET` for ``offsets``."""
        marks = self.partition_watermarks or {}
        now = self.ingested_at
        return [(t, p, o, now, marks.get((t, p))) for (t, p), o in offsets.items()]


def batch_counters(
    metrics_stored: int,
    feedback_stored: int,
    evaluations_stored: int,
    duplicates: int,
    dead_letters: Mapping[str, int],
    extra: Mapping[str, int],
) -> list[tuple[str, int]]:
    """The ``(name, increment)`` pairs one batch adds to ``counters`` (zeros left out):
    stored events (feedback including evaluators' results, counted apart too),
    duplicates, dead letters by reason, and ``extra`` (e.g. what the OTLP decoder
    counted of the batch's spans)."""
    counters = [
        (STORED_METRICS, metrics_stored),
        (STORED_FEEDBACK, feedback_stored),
        (STORED_EVALUATIONS, evaluations_stored),
        (DUPLICATES, duplicates),
        (DEAD_LETTERED, sum(dead_letters.values())),
        *((f"{DEAD_LETTERED}.{reason}", n) for reason, n in dead_letters.items()),
        *extra.items(),
    ]
    return [(k, v) for k, v in counters if v]


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What one batch write did, and the rows it newly stored (for batch listeners).

    ``last_metric_id`` and ``last_feedback_id`` are the highest row ids of the two event
    tables once the batch is in: every stored row up to them has been offered to the
    listeners by then (what a monitor snapshot records as covered).
    """

    metrics_stored: int
    feedback_stored: int
    duplicates: int
    metric_rows: tuple[MetricRow, ...] = ()
    #: Feedback from people and apps (``source`` is ``None``): what every reader of
    #: feedback counted before evaluators existed, and still does by default.
    feedback_rows: tuple[FeedbackRow, ...] = ()
    last_metric_id: int = 0
    last_feedback_id: int = 0
    # The ``ingested_at`` stored with the batch's rows (the rollouts' feedback join uses
    # it, so a replay from storage decides exactly as the live feed did).
    ingested_at: float = 0.0
    #: Evaluators' results (``source`` is ``eval:<name>``), in storage order.
    evaluation_rows: tuple[FeedbackRow, ...] = ()
    # The window watermark the batch is windowed under (``None``: none; see
    # monitoring/eventtime.py), stored in ``batch_watermarks`` by ``ingested_at``.
    watermark: float | None = None

    @property
    def stored(self) -> int:
        """Events newly stored by this batch."""
        return self.metrics_stored + self.feedback_stored

    @property
    def metrics(self) -> tuple[MetricView, ...]:
        """The new metric rows with names (built on each access: hot listeners read
        :attr:`metric_rows`)."""
        return metric_views(self.metric_rows)

    @property
    def feedback(self) -> tuple[FeedbackView, ...]:
        """The new feedback rows with names (built on each access)."""
        return feedback_views(self.feedback_rows)


def by_source(
    rows: Sequence[FeedbackRow],
) -> tuple[tuple[FeedbackRow, ...], tuple[FeedbackRow, ...]]:
    """Feedback from people and apps, and evaluators' results, each in storage order."""
    evaluations = tuple(row for row in rows if row[FEEDBACK_SOURCE_AT] is not None)
    if not evaluations:
        return tuple(rows), ()
    return tuple(row for row in rows if row[FEEDBACK_SOURCE_AT] is None), evaluations
