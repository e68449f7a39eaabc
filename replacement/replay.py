"""Rebuilding a live rollout's aggregates from storage at start-up.

The stored calls and feedback of the rollout's prompt are fed to the
:class:`~promptd.replacement.observations.RolloutAccumulator` in the order they were
stored (merged on ``ingested_at``, calls first within a batch, as the live feed does), so
the feedback joins — which depend on the stored ingestion times — come out exactly as they
did before the restart, however late the feedback was.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from itertools import chain
from typing import Any

from promptd.evaluation.signals import HUMAN, sql_condition_any
from promptd.replacement.observations import RolloutAccumulator
from promptd.storage.database import Database
from promptd.storage.repository import EventRepository

_CHUNK = 2000


async def _rows(db: Database, sql: str, params: tuple[Any, ...]) -> AsyncIterator[Any]:
    async with db.reader.execute(sql, params) as cur:
        while rows := await cur.fetchmany(_CHUNK):
            for row in rows:
                yield row


async def replay(
    db: Database,
    acc: RolloutAccumulator,
    served: str | Mapping[str, Sequence[str]],
    since: float,
    after: tuple[int, int] = (0, 0),
) -> tuple[int, int]:
    """Feed the rollout's stored events since ``since`` to ``acc``; returns (calls, feedback).

    ``served``: the rollout's prompt (its baseline and candidate versions are read), or
    each prompt of a pipeline rollout with the versions it serves. Only events stored at
    or after ``since`` (the rollout's start) were fed live, so only those are replayed;
    with ``after`` (metric and feedback row ids a snapshot of ``acc`` covers), only the
    rows stored after those.
    """
    if isinstance(served, str):
        served = {served: (acc.baseline_version, acc.candidate_version)}
    events = EventRepository(db)
    metric_floor = await events.first_id_since("metric_events", since)
    # Feedback carries the app's timestamp, normally after its call's; the scan floor
    # leaves room for feedback stamped up to the join window before the rollout (the
    # live feed ignores what is stamped earlier: the same rule).
    fb_since = acc.feedback_floor if acc.step_starts else since
    feedback_floor = await events.first_id_since("feedback_events", fb_since)
    metric_floor, feedback_floor = (
        max(metric_floor, after[0] + 1),
        max(feedback_floor, after[1] + 1),
    )
    pairs = " OR ".join(
        f"(prompt = ? AND variant IN ({', '.join('?' * len(v))}))" for v in served.values()
    )
    calls = _rows(
        db,
        "SELECT ingested_at, ts, variant, coalesce(unit_id, episode_id, request_id), "
        "latency_ms, success, quality, cost_usd, request_id, episode_id, prompt, input_chars "
        f"FROM metric_events WHERE id >= ? AND ts >= ? AND ingested_at >= ? AND ({pairs}) "
        "ORDER BY id",
        (metric_floor, since, since, *chain.from_iterable((p, *v) for p, v in served.items())),
    )
    prompts = list(served)
    signals = acc.read_signals()
    # People's feedback, then the evaluators', as the live feed offers a batch's (the
    # rollout's signals, and people's paired with its evaluator's for the drift check).
    people = [HUMAN] if HUMAN in signals else []
    evaluators = [s for s in signals if s != HUMAN]
    streams: list[AsyncIterator[Any]] = [calls]
    for chosen in (people, evaluators):
        if chosen:
            streams.append(_feedback(db, chosen, prompts, (feedback_floor, fb_since, since)))
    n_calls = n_feedback = 0
    async for row in _merged(streams):
        if len(row) == _CALL_WIDTH:
            at, ts, variant, unit, latency, success, quality, cost, request_id, episode = row[:10]
            ok, prompt, size = bool(success), row[10], row[11]
            acc.add_metric(
                ts, variant, unit, latency, ok, quality, cost, request_id, at, episode, prompt, size
            )
            n_calls += 1
        else:
            acc.add_feedback(row[1], row[2], row[0], row[3], row[4], row[5])
            n_feedback += 1
    return n_calls, n_feedback


_CALL_WIDTH = 12


def _feedback(
    db: Database, signals: Sequence[str], prompts: Sequence[str], floors: tuple[Any, ...]
) -> AsyncIterator[Any]:
    """The stored feedback of ``signals`` from ``floors`` (row id, ts, ingested_at) on: on
    a call of ``prompts``, or on a whole episode (all read, as the live feed offers it
    all: a call of the episode may still come within the join window)."""
    sources, params = sql_condition_any(signals)
    return _rows(
        db,
        "SELECT ingested_at, request_id, score, episode_id, ts, source FROM feedback_events "
        f"WHERE id >= ? AND ts >= ? AND ingested_at >= ? AND {sources} AND ("
        f"(prompt IN ({', '.join('?' * len(prompts))}) AND request_id IS NOT NULL) "
        "OR request_id IS NULL) ORDER BY id",
        (*floors, *params, *prompts),
    )


async def _merged(streams: Sequence[AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """The rows of ``streams`` (each in storage order) merged on ``ingested_at`` (their
    first column), the earlier stream first on a tie: a batch's calls, then its people's
    feedback, then its evaluators' results, as the live feed sees them."""
    heads = [await anext(stream, None) for stream in streams]
    while True:
        live = [(row[0], i) for i, row in enumerate(heads) if row is not None]
        if not live:
            return
        _, index = min(live)
        row = heads[index]
        yield row
        heads[index] = await anext(streams[index], None)
