"""Loading a rollout's pre-period history: its saved copy, else the stored events.

The table (:class:`.history.History`) is computed once, when the rollout starts, from the
events stored before the start (``storage/history.py``), and saved under
``rollout:<id>:history`` in the snapshots table. A restart loads the saved copy, so the
rollout keeps the covariates it started with even when retention has since deleted the
old events; a copy that is missing or does not decode is computed again from the stored
events (the same result while they are kept) and the restart says so in its log.

Nothing here blocks the event loop: the query runs on the database's reader thread, and
building, encoding and decoding the table run in a worker thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Final, Literal

import structlog

from promptd.evaluation.signals import HUMAN, sql_condition_any
from promptd.replacement.history import History
from promptd.storage.database import Database
from promptd.storage.history import unit_sums
from promptd.storage.snapshots import Snapshot, SnapshotStore

log = structlog.get_logger("promptd.rollout")

#: The encoding's version in the saved copy's ``config``; another is computed again.
FORMAT: Final = "history:1"

Source = Literal["saved", "computed"]


def name(rollout_id: str) -> str:
    """The saved copy's name in the snapshots table."""
    return f"rollout:{rollout_id}:history"


async def compute(
    db: Database,
    prompts: Sequence[str],
    since: float,
    until: float,
    signals: Sequence[str] = (HUMAN,),
) -> History:
    """The history of the units of ``prompts`` from the events stamped in ``[since,
    until)`` and stored before ``until``; a unit's feedback figure is over the feedback of
    ``signals`` (the rollout's primary metric's)."""
    rows = await unit_sums(db, prompts, since, until, sql_condition_any(signals))
    return await asyncio.to_thread(History.from_sums, rows, since, until)


async def load(
    db: Database,
    store: SnapshotStore,
    rollout_id: str,
    prompts: Sequence[str],
    start: float,
    lookback_s: float,
    signals: Sequence[str] = (HUMAN,),
) -> tuple[History, Source]:
    """The rollout's history: the saved copy, else computed and saved."""
    saved = await store.load(name(rollout_id))
    if saved is not None and saved.config == FORMAT:
        try:
            return await asyncio.to_thread(History.decode, saved.data), "saved"
        except ValueError as exc:
            log.warning("rollout_history_unreadable", rollout_id=rollout_id, error=str(exc))
    elif saved is not None:
        log.warning("rollout_history_unreadable", rollout_id=rollout_id, error=saved.config)
    history = await compute(db, prompts, start - lookback_s, start, signals)
    await save(store, rollout_id, history)
    return history, "computed"


async def save(store: SnapshotStore, rollout_id: str, history: History) -> None:
    """Save ``history`` as the rollout's copy."""
    data = await asyncio.to_thread(history.encode)
    await store.save(Snapshot(name(rollout_id), time.time(), 0, 0, FORMAT, data))
