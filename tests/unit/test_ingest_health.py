"""Pure decisions of ingestion safety: reset detection, liveness and readiness, and the
data directory lock."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from promptd.daemon.health import IngestState, liveness, readiness
from promptd.daemon.ingest import OffsetReset, find_resets
from promptd.daemon.lock import DataDirLock, DataDirLockedError
from promptd.daemon.settings import KafkaSettings

KAFKA = KafkaSettings(stall_timeout_s=120.0, readiness_timeout_s=10.0)
NOW = 1_000.0


@pytest.mark.parametrize(
    ("stored", "highwaters", "expected"),
    [
        ({("t", 0): 50}, {("t", 0): 20}, [OffsetReset("t", 0, 50, 20, "log_behind_stored_offset")]),
        ({("t", 0): 50}, {("t", 0): 50}, []),  # caught up
        ({("t", 0): 50}, {("t", 0): 80}, []),  # behind: ordinary lag
        ({("t", 0): 50}, {("t", 0): None}, []),  # not fetched yet
        ({}, {("t", 0): 0}, []),  # nothing stored for it
        (
            {("t", 0): 5, ("t", 1): 9},
            {("t", 0): 0, ("t", 1): 9},
            [OffsetReset("t", 0, 5, 0, "log_behind_stored_offset")],
        ),
    ],
)
def test_find_resets_flags_only_offsets_past_the_high_water_mark(
    stored: dict[tuple[str, int], int],
    highwaters: dict[tuple[str, int], int | None],
    expected: list[OffsetReset],
) -> None:
    """A stored offset beyond the fetched high-water mark is a reset; anything else is not."""
    assert find_resets(stored, highwaters) == expected


def ready_state(**over: object) -> IngestState:
    """A consumer that is connected, assigned, caught up and heard from the broker now."""
    state = IngestState(
        connected=True,
        started_at=NOW - 100,
        last_poll_at=NOW,
        last_progress_at=NOW,
        last_answer_at=NOW,
        assigned=frozenset({("t", 0)}),
        unassigned_since=None,
    )
    for key, value in over.items():
        setattr(state, key, value)
    return state


@pytest.mark.parametrize(
    ("over", "ready", "alive", "reason"),
    [
        ({}, True, True, "ok"),
        ({"last_answer_at": NOW - 9}, True, True, "ok"),
        ({"last_answer_at": NOW - 11}, False, True, "no answer from the broker for 11 s"),
        ({"connected": False, "last_error": "boom"}, False, True, "consumer not connected: boom"),
        ({"write_error": "disk full"}, False, True, "storage writes failing: disk full"),
        ({"write_started_at": NOW - 11}, False, True, "a storage write has not finished"),
        ({"write_started_at": NOW - 2}, True, True, "ok"),
        ({"group_conflict": "shared"}, False, True, "shared"),
        ({"halted": "database gone"}, False, False, "ingestion halted: database gone"),
        # Lag with no progress for longer than stall_timeout_s: dead, and not ready.
        ({"lag": {("t", 0): 3}, "last_progress_at": NOW - 121}, False, False, "3 records of lag"),
        ({"lag": {("t", 0): 3}, "last_progress_at": NOW - 60}, True, True, "ok"),
        # A rebalance shorter than the limit does not flap; a first assignment is awaited.
        ({"assigned": frozenset(), "unassigned_since": NOW - 2}, True, True, "ok"),
        ({"assigned": frozenset(), "unassigned_since": NOW - 11}, False, True, "no partitions"),
        (
            {"assigned": frozenset(), "unassigned_since": NOW - 1, "last_answer_at": None},
            False,
            True,
            "no partitions",
        ),
    ],
)
def test_probes_answer_from_the_state(
    over: dict[str, object], ready: bool, alive: bool, reason: str
) -> None:
    """/readyz and /healthz verdicts for each condition, with the reason shown."""
    state = ready_state(**over)
    verdict = readiness(state, KAFKA, NOW)
    assert verdict.ok is ready
    assert reason in verdict.reason
    assert liveness(state, KAFKA, NOW).ok is alive


def test_write_failure_is_named_when_the_consumer_also_stalled() -> None:
    """A stall caused by failing writes names the write error in both probes."""
    state = ready_state(
        write_error="IntegrityError('full')", lag={("t", 0): 3}, last_progress_at=NOW - 200
    )
    assert "IntegrityError('full')" in readiness(state, KAFKA, NOW).reason
    assert "IntegrityError('full')" in liveness(state, KAFKA, NOW).reason


def test_second_lock_on_a_data_dir_names_the_holder(tmp_path: Path) -> None:
    """A second lock on a held data dir fails naming the holder's pid, host and start."""
    first = DataDirLock(tmp_path / "data")
    holder = first.acquire()
    assert holder.pid == os.getpid()
    with pytest.raises(DataDirLockedError) as refused:
        DataDirLock(tmp_path / "data").acquire()
    message = str(refused.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()} since " in message
    assert refused.value.holder == holder
    first.release()
    DataDirLock(tmp_path / "data").acquire()  # free again once released


def test_lock_replaces_stale_owned_files_and_removes_them_on_release(tmp_path: Path) -> None:
    """Files only the holder may have (runtime.json) are removed when the lock is taken
    (they are stale) and when it is released."""
    data = tmp_path / "data"
    data.mkdir()
    stale = data / "runtime.json"
    stale.write_text(json.dumps({"pid": 999_999_999}))
    lock = DataDirLock(data, owned_files=("runtime.json",))
    lock.acquire()
    assert not stale.exists()
    stale.write_text("{}")
    lock.release()
    assert not stale.exists()
    assert not lock.held
