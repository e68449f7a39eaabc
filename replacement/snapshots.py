"""Snapshots of live rollouts' aggregates, so that a restart replays only recent events.

Without a snapshot, resuming a rollout replays every stored event of its prompt since the
rollout started (:func:`~.replay.replay`): days of traffic for a slow rollout. With one,
the accumulator is loaded as it was and only the events stored after the snapshot are
replayed, in the same storage order, so the aggregates (cells, unit buckets, the calls
feedback may still join) are what they would be after the full replay.

One snapshot per live rollout, named ``rollout:<id>`` in the ``snapshots`` table; it is
ignored when it was built for another configuration of the accumulator (versions, primary
metric, buckets, join window, future bound, the catalog's metrics and their covariates,
the units' history; a pipeline rollout's members, salt and step weights) or another
encoding (:data:`FORMAT`), and when it does not decode (a warning, then the full replay:
a snapshot is a cache).
"""

from __future__ import annotations

import json
from typing import Any, Final

import msgspec

from promptd.replacement.observations import RolloutAccumulator
from promptd.storage.snapshots import Snapshot

#: Version of the encoding; a snapshot of another format is ignored (the rollout then
#: replays from storage). 2: cells keyed by metric name, calls filed by their event time
#: (a future timestamp taken as the storage time), units of the current step only.
#: 3: each metric's covariate sums in its cells, the calls' covariates, errors clustered.
FORMAT: Final = 3


def name(rollout_id: str) -> str:
    """The snapshot's name for a rollout."""
    return f"rollout:{rollout_id}"


def config_key(acc: RolloutAccumulator) -> str:
    """What a snapshot must have been built with to be loaded into ``acc``."""
    return json.dumps({"format": FORMAT, **acc.config()}, sort_keys=True)


def encode(state: dict[str, Any]) -> bytes:
    """Snapshot bytes of an accumulator's :meth:`~RolloutAccumulator.state`."""
    return msgspec.msgpack.encode(state)


def take(
    rollout_id: str, acc: RolloutAccumulator, covered: tuple[int, int], taken_at: float
) -> tuple[Snapshot, dict[str, Any]]:
    """The snapshot of ``acc`` (holding every event row up to ``covered``), unencoded:
    call :func:`finish` (off the event loop) for the bytes."""
    header = Snapshot(name(rollout_id), taken_at, covered[0], covered[1], config_key(acc), b"")
    return header, acc.state()


def finish(header: Snapshot, state: dict[str, Any]) -> Snapshot:
    """The snapshot with its data encoded."""
    return Snapshot(
        header.name,
        header.taken_at,
        header.metric_id,
        header.feedback_id,
        header.config,
        encode(state),
    )


class SnapshotDamaged(ValueError):
    """A snapshot that does not decode; the accumulator it was loaded into may be half
    filled and must be replaced."""


def load(acc: RolloutAccumulator, snap: Snapshot) -> bool:
    """Load ``snap`` into ``acc``; ``False`` (and ``acc`` untouched) when it does not fit.

    Raises :class:`SnapshotDamaged` when the data does not decode (then ``acc`` may hold
    part of it: build a new one).
    """
    if snap.config != config_key(acc):
        return False
    try:
        state: dict[str, Any] = msgspec.msgpack.decode(snap.data)
        steps = state["step_starts"]
        if acc.step_starts[: len(steps)] != steps:
            return False  # not this rollout's history
        acc.load_state(state)
    except Exception as exc:
        raise SnapshotDamaged(f"does not decode: {exc!r}"[:500]) from exc
    return True
