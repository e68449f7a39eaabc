"""Event time: the rules that decide where, and whether, an event counts in the windows.

One set of rules, applied identically by the live monitor, by the replay of a snapshot's
tail and by a full rebuild from storage, so that whatever the order, delay and restart
pattern of the input, the rebuilt windows equal the live ones. Everything a rule needs is
stored with the batch an event came in: its ``ingested_at`` (on every row) and the
batch's window watermark (table ``batch_watermarks``).

Watermarks (Flink's model: an operator's watermark is the minimum over its inputs)
--------------------------------------------------------------------------------
* A **partition watermark** is the newest event time ingestion has read from that
  partition: the largest ``min(ts, ingested_at)`` of its stored events. It is stored with
  the partition's offset (``consumer_offsets.watermark``), in the batch's transaction,
  so a restart resumes it exactly.
* The **window watermark** of a batch is the minimum of the partition watermarks of the
  partitions that still have records to read when the batch is taken: the batch's own
  partitions and every assigned partition whose high-water mark is above its stored
  offset. A partition with nothing left to read is *idle* and does not hold event time
  back. Flink needs an idleness timeout because a source cannot know whether more data
  is coming; a Kafka consumer can, from the high-water mark of every fetch answer. A
  partition never read before has no watermark, which holds the window watermark at
  "none" (nothing is late) until it has been read.
* Because a batch's own partitions are in the minimum, an event is only ever judged
  against event time its own partition had already reached: a partition read in order
  never has a late event, whatever order the partitions are read in. That is what lets
  catch-up after an outage fill the windows instead of dropping the backlog.

The admission rule (per event, given its batch)
-----------------------------------------------
1. **Future:** an event stamped more than ``max_future_s`` after its batch was stored is
   not windowed (counted in ``future_events``: the producer's clock is wrong). One stamped
   after its batch was stored but within ``max_future_s`` is windowed **at the moment it
   was stored** (``ingested_at``): a clock running a little ahead neither hides the event
   nor moves event time past the present.
2. **Late:** an event whose (clamped) time is more than ``lateness_s`` before its batch's
   window watermark is not windowed (counted in ``late_events``).
3. Otherwise it lands in the bucket of its (clamped) time. The windows fold old buckets
   on the wall clock; an event too old for every tier (older than the baseline) is
   counted as late.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from promptd.storage.repository import BatchTime

#: "No watermark": nothing is late against it.
NO_WATERMARK: Final = -math.inf

Partition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Admission:
    """The admission rule for the events of one batch (see the module docstring)."""

    #: Events whose clamped time is below this are late.
    accept_from: float
    #: Events stamped after this are windowed at this time (the batch's ``ingested_at``).
    clamp_at: float
    #: Events stamped after this are rejected (``ingested_at + max_future_s``).
    future_limit: float

    @classmethod
    def of(
        cls, ingested_at: float, watermark: float | None, lateness_s: float, max_future_s: float
    ) -> Admission:
        """The rule for a batch stored at ``ingested_at`` under window ``watermark``."""
        mark = NO_WATERMARK if watermark is None else watermark
        return cls(mark - lateness_s, ingested_at, ingested_at + max_future_s)

    def time_of(self, ts: float) -> float | None:
        """Where an event stamped ``ts`` is windowed, or ``None`` when it is not."""
        if ts > self.clamp_at:
            if ts > self.future_limit:
                return None
            ts = self.clamp_at
        return None if ts < self.accept_from else ts


#: Admits every event at its own time (direct use of the windows, e.g. in tests).
ADMIT_ALL: Final = Admission(NO_WATERMARK, math.inf, math.inf)


class PartitionClock:
    """Partition watermarks of the assigned partitions, and each batch's window watermark.

    Pure bookkeeping: ingestion loads the stored watermarks on assignment, takes
    :meth:`batch_time` for each batch, stores it with the batch and :meth:`apply` es its
    partition watermarks once the write committed.
    """

    def __init__(self) -> None:
        self._marks: dict[Partition, float] = {}
        self._last_stamp = 0.0

    def load(self, marks: Mapping[Partition, float | None]) -> None:
        """Replace the watermarks by stored ones (``None``: never read)."""
        self._marks = {k: v for k, v in marks.items() if v is not None}

    def watermark(self, partition: Partition) -> float:
        """One partition's watermark (:data:`NO_WATERMARK` when never read)."""
        return self._marks.get(partition, NO_WATERMARK)

    def window_watermark(self, partitions: Iterable[Partition]) -> float:
        """The minimum watermark over ``partitions``: the batch's own and those with
        records left to read."""
        return min(map(self.watermark, partitions), default=NO_WATERMARK)

    def advanced(
        self, newest: Mapping[Partition, float], ingested_at: float
    ) -> dict[Partition, float]:
        """The watermarks of the partitions in ``newest`` (their newest event ``ts`` in a
        batch) once that batch, stored at ``ingested_at``, is in."""
        return {key: max(self.watermark(key), min(ts, ingested_at)) for key, ts in newest.items()}

    def batch_time(
        self,
        partitions: Iterable[Partition],
        unread: Iterable[Partition],
        newest: Mapping[Partition, float],
        ingested_at: float,
    ) -> BatchTime:
        """The event-time facts of a batch read from ``partitions`` and stored at
        ``ingested_at``, while ``unread`` partitions still had records to read; ``newest``
        is the newest event ``ts`` of each partition in the batch."""
        watermark = self.window_watermark([*partitions, *unread])
        return BatchTime(
            ingested_at, stored_watermark(watermark), self.advanced(newest, ingested_at)
        )

    def apply(self, marks: Mapping[Partition, float]) -> None:
        """Take the watermarks of a committed batch (from :meth:`advanced`)."""
        self._marks.update(marks)

    def stamp(self) -> float:
        """The ``ingested_at`` of the next batch: the wall clock, strictly increasing, so
        that a batch's rows are told apart from every other batch's by it."""
        self._last_stamp = max(time.time(), math.nextafter(self._last_stamp, math.inf))
        return self._last_stamp


def stored_watermark(value: float) -> float | None:
    """A window watermark as stored (``None`` for :data:`NO_WATERMARK`)."""
    return None if value == NO_WATERMARK else value
