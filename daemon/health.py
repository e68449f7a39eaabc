"""What ``/healthz`` and ``/readyz`` answer, decided from the ingestor's state, pure.

- **Liveness** (``/healthz``) fails when the process cannot get better by waiting: the
  consumer holds lag and has stored nothing for ``kafka.stall_timeout_s``, the poll loop
  hangs, or ingestion was halted (database file replaced or deleted). A supervisor
  should restart it.
- **Readiness** (``/readyz``) fails whenever events are not flowing into storage right
  now: any liveness failure, storage writes failing, the broker silent or no partitions
  assigned for ``kafka.readiness_timeout_s``, or a consumer group shared with another
  member. It recovers by itself once the cause is gone.

Every timer here lives in :class:`IngestState`, which outlives the consumer's restarts:
a consumer that restarts after each failed write does not reset any of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from promptd.daemon.settings import KafkaSettings


@dataclass(slots=True)
class IngestState:
    """Live view of the consumer for health checks and ``/v1/status``.

    Times are ``time.monotonic()`` seconds unless named ``*_wall``.
    """

    connected: bool = False
    started_at: float = field(default_factory=time.monotonic)
    last_poll_at: float = field(default_factory=time.monotonic)
    # Last stored batch, or last moment with nothing to store (lag 0): the stall timer.
    last_progress_at: float = field(default_factory=time.monotonic)
    # Last fetch answer from the broker on any assigned partition (or the assignment).
    last_answer_at: float | None = None
    assigned: frozenset[tuple[str, int]] = frozenset()
    unassigned_since: float | None = field(default_factory=time.monotonic)
    lag: dict[tuple[str, int], int] = field(default_factory=dict)
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    stalled: bool = False
    last_error: str | None = None
    # Set while the last storage write failed (cleared by the next one that succeeds).
    write_error: str | None = None
    write_started_at: float | None = None
    group_conflict: str | None = None
    # A fatal condition: ingestion stopped for good in this process.
    halted: str | None = None
    offset_resets: int = 0

    @property
    def total_lag(self) -> int:
        """Sum of the known per-partition lags."""
        return sum(self.lag.values())


@dataclass(frozen=True, slots=True)
class Verdict:
    """An answer of a probe: ``ok`` and the reason shown to the operator."""

    ok: bool
    reason: str


def is_stalled(state: IngestState, kafka: KafkaSettings, now: float) -> bool:
    """Lag is known, and nothing was stored nor caught up for ``stall_timeout_s``."""
    return state.total_lag > 0 and now - state.last_progress_at > kafka.stall_timeout_s


def liveness(state: IngestState, kafka: KafkaSettings, now: float) -> Verdict:
    """``/healthz``: false only when waiting will not help."""
    if state.halted:
        return Verdict(False, f"ingestion halted: {state.halted}")
    if is_stalled(state, kafka, now):
        cause = f" (storage writes failing: {state.write_error})" if state.write_error else ""
        return Verdict(
            False,
            f"consumer holds {state.total_lag} records of lag and stored nothing for "
            f"{now - state.last_progress_at:.0f} s{cause}",
        )
    if state.connected and now - state.last_poll_at > kafka.stall_timeout_s:
        return Verdict(False, "the consumer loop has not polled within stall_timeout_s")
    return Verdict(True, "ok")


def readiness(state: IngestState, kafka: KafkaSettings, now: float) -> Verdict:
    """``/readyz``: true only while events flow from Kafka into storage."""
    limit = kafka.readiness_timeout_s
    storage = _storage_problem(state, now, limit)
    if storage and not state.halted:
        return Verdict(False, storage)
    alive = liveness(state, kafka, now)
    if not alive.ok:
        return alive
    problem = _broker_problem(state, now, limit) or state.group_conflict
    return Verdict(False, problem) if problem else Verdict(True, "ok")


def _storage_problem(state: IngestState, now: float, limit: float) -> str | None:
    if state.write_error:
        return f"storage writes failing: {state.write_error}"
    if state.write_started_at is not None and now - state.write_started_at > limit:
        return f"a storage write has not finished for {now - state.write_started_at:.0f} s"
    return None


def _broker_problem(state: IngestState, now: float, limit: float) -> str | None:
    if not state.connected:
        return f"consumer not connected: {state.last_error or 'starting'}"
    if not state.assigned:
        since = state.unassigned_since if state.unassigned_since is not None else now
        # Before the first assignment at once; later only past the limit, so that a
        # rebalance of a second or two does not flap the probe.
        if state.last_answer_at is None or now - since > limit:
            return f"no partitions assigned (for {now - since:.0f} s)"
    if state.last_answer_at is not None and now - state.last_answer_at > limit:
        return f"no answer from the broker for {now - state.last_answer_at:.0f} s"
    return None
