"""Snapshots of the monitor's windows, so that a restart replays only recent events.

Without a snapshot a start replays every stored event of the last ``rebuild_horizon_s``
(an hour by default) through the windows, and older history as SQL aggregates: 14 s for
a million events. With one, it decodes the snapshot (the windows exactly as they were,
latency histograms included) and replays only the events stored after it, in the order
ingestion handed them to the monitor. Counts, sums and histograms are then what a daemon
that never stopped would hold; history older than the replay horizon even keeps its
latency quantiles, which the SQL aggregates cannot restore.

A snapshot is ignored (and the full rebuild runs, with a warning) when the window
configuration changed since it was taken, when it is older than the baseline window, or
when it does not decode: it is a cache, never a reason not to start. The encoding is
msgpack of :meth:`~.windows.WindowStore.state`, tagged with :data:`FORMAT`.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Final

import msgspec
import structlog

from promptd.storage.database import Database
from promptd.storage.snapshots import Snapshot, SnapshotStore, last_ids, tail_events

from .signals import MonitorSignals
from .windows import WindowConfig, WindowStore

log = structlog.get_logger("promptd.monitoring")

#: The snapshot's name in the ``snapshots`` table.
NAME: Final = "monitor.windows"
#: Version of the encoding; a snapshot of another format is ignored. 2: the windows no
#: longer keep an admission rule of their own (event time per batch, see .eventtime).
FORMAT: Final = 2


def config_key(config: WindowConfig, signals: MonitorSignals | None = None) -> str:
    """What a snapshot must have been built with to be loaded (format, config and, when
    some prompt's windows count other feedback than people's, the choice of signals)."""
    key: dict[str, Any] = {"format": FORMAT, **config.model_dump(mode="json")}
    if signals is not None and signals.key is not None:
        key["signals"] = signals.key
    return json.dumps(key, sort_keys=True)


def encode(store: WindowStore) -> bytes:
    """The snapshot bytes of ``store`` (call it while nothing mutates the store)."""
    return msgspec.msgpack.encode(store.state())


def decode(config: WindowConfig, data: bytes) -> WindowStore:
    """The store saved in ``data`` (built with ``config``)."""
    state: dict[str, Any] = msgspec.msgpack.decode(data)
    return WindowStore.from_state(config, state)


def take(
    store: WindowStore,
    covered: tuple[int, int],
    taken_at: float,
    signals: MonitorSignals | None = None,
) -> Snapshot:
    """A snapshot of ``store``, which holds every event row up to ``covered`` (its
    feedback counted as ``signals`` say)."""
    key = config_key(store.config, signals)
    return Snapshot(NAME, taken_at, covered[0], covered[1], key, encode(store))


async def restore(
    config: WindowConfig, db: Database, now: float, signals: MonitorSignals | None = None
) -> tuple[WindowStore, tuple[int, int]] | None:
    """The windows from the stored snapshot plus the events stored after it, and the row
    ids they cover; ``None`` when there is no usable snapshot (then rebuild). A snapshot
    taken under another choice of ``signals`` is not usable."""
    started = time.perf_counter()
    snap = await SnapshotStore(db).load(NAME)
    if snap is None:
        return None
    reason = None
    if snap.config != config_key(config, signals):
        reason = "window configuration or monitor signals changed"
    elif now - snap.taken_at > config.baseline_seconds:
        reason = "older than the baseline window"
    elif _went_back(await last_ids(db), (snap.metric_id, snap.feedback_id)):
        # Row ids were handed out again (the tables were emptied): the tail is unknown.
        reason = "event tables went back"
    if reason is not None:
        log.warning("windows_snapshot_ignored", reason=reason, taken_at=round(snap.taken_at))
        return None
    try:
        store = await asyncio.to_thread(decode, config, snap.data)
    except Exception as exc:
        # A cache that does not decode (a damaged row, a bug in an older encoder): the
        # full rebuild gives the same windows, only slower.
        log.warning("windows_snapshot_ignored", reason=f"does not decode: {exc!r}"[:500])
        return None
    covered, replayed = await replay_tail(store, db, (snap.metric_id, snap.feedback_id), signals)
    store.expire(now)
    log.info(
        "windows_restored",
        snapshot_age_s=round(now - snap.taken_at, 1),
        snapshot_bytes=len(snap.data),
        tail_events=replayed,
        series=len(store.series("model")),
        duration_s=round(time.perf_counter() - started, 3),
    )
    return store, covered


def _went_back(stored: tuple[int, int], covered: tuple[int, int]) -> bool:
    return stored[0] < covered[0] or stored[1] < covered[1]


async def replay_tail(
    store: WindowStore,
    db: Database,
    covered: tuple[int, int],
    signals: MonitorSignals | None = None,
) -> tuple[tuple[int, int], int]:
    """Window the events stored after ``covered`` (feedback as ``signals`` say, people's
    by default); returns the new cover and the count."""
    signals = signals or MonitorSignals()
    mid, fid = covered
    replayed = 0
    async for rows in tail_events(db, mid, fid, sources=signals.sql_condition()):
        replayed += store.replay(signals.select(rows))
        for row in rows:
            if row[1]:
                fid = max(fid, row[15])
            else:
                mid = max(mid, row[15])
        await asyncio.sleep(0)
    return (mid, fid), replayed
