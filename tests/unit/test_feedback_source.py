"""Evaluators' results (feedback with a ``source``) are stored, but every reader of feedback
that existed before them still counts only feedback from people and apps: the live batch
listeners, the monitor's rebuild and snapshot tail, the optimizer's examples and episodes,
and the rollouts' replay. Real SQLite file; each reader is run before and after evaluators'
results are stored, and must answer the same."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from promptd.events import FeedbackEvent, MetricEvent
from promptd.optimization.episodes import EpisodeStore
from promptd.optimization.examples import ExampleStore, Snapshot
from promptd.replacement.observations import RolloutAccumulator
from promptd.replacement.pipelines import Pipeline
from promptd.replacement.replay import replay
from promptd.storage.alerts import history_aggregates, raw_events
from promptd.storage.database import Database
from promptd.storage.repository import EventRepository
from promptd.storage.schema import MIGRATIONS
from promptd.storage.snapshots import tail_events
from promptd.storage.sqlite import _statements

T0 = time.time() - 600


@pytest.fixture
async def db(store_target: Path | str) -> AsyncIterator[Database]:
    """A migrated database (a SQLite file, then PostgreSQL), closed afterwards."""
    database = await Database.open(store_target)
    yield database
    await database.close()


def call(i: int, episode: str | None = None, prompt: str = "p") -> MetricEvent:
    """Call ``r{i}`` of ``prompt`` (v1 or v2), captured, maybe in an episode."""
    body = {"event_id": f"m{i}", "ts": T0 + i, "prompt": prompt, "variant": f"v{1 + i % 2}"}
    body |= {"model": "m", "request_id": f"r{i}", "latency_ms": 5.0, "success": True}
    body |= {"input": {"q": str(i)}, "output": f"a{i}", "episode_id": episode}
    return MetricEvent.model_validate(body)


def score(eid: str, value: float, source: str | None = None, **target: Any) -> FeedbackEvent:
    """Feedback ``eid``; with ``source``, an evaluator's result."""
    body = {"event_id": eid, "ts": T0 + 100, "score": value, "source": source, **target}
    return FeedbackEvent.model_validate(body)


def human() -> list[FeedbackEvent]:
    """People's feedback on some calls, on an episode, with a correction."""
    out = [
        score(f"h{i}", 0.25 * (i % 5), prompt="p", variant="v1", request_id=f"r{i}")
        for i in (1, 3, 5)
    ]
    out.append(score("hc", 1.0, prompt="p", variant="v2", request_id="r2", correction="fixed"))
    out.append(score("he", 0.5, episode_id="ep1"))
    return out


def evaluations() -> list[FeedbackEvent]:
    """Evaluators' results on the same calls and episode, and on calls people left alone."""
    out = [
        score(
            f"e{i}",
            0.9,
            f"eval:judge-{i % 2}",
            prompt="p",
            variant=f"v{1 + i % 2}",
            request_id=f"r{i}",
        )
        for i in range(8)
    ]
    out.append(
        score("ec", 0.1, "eval:judge", prompt="p", variant="v2", request_id="r2", correction="x")
    )
    out.append(score("ee", 0.0, "eval:judge", episode_id="ep1"))
    return out


async def readers(db: Database, snapshot: Snapshot) -> dict[str, Any]:
    """What every reader of feedback answers (bounded by ``snapshot`` where it applies)."""
    out: dict[str, Any] = {}
    out["aggregates"] = await history_aggregates(db, T0 - 10, T0 + 1000, 60.0, 30.0, 300.0)
    out["raw"] = [rows async for rows in raw_events(db, T0 - 10)]
    tail = [row for rows in [r async for r in tail_events(db, 0, 0)] for row in rows]
    # Row ids of the tail differ (evaluations take ids); everything else must not.
    out["tail"] = [row[:-1] for row in tail]
    examples = ExampleStore(db, 3600.0, 100)
    out["examples"] = await examples.examples("p", snapshot)
    steps = [
        {"prompt": "p", "bindings": {"q": "input.q"}},
        {"prompt": "s", "bindings": {"q": "p.output"}},
    ]
    pipeline = Pipeline.from_dict({"name": "two", "steps": steps})
    out["episodes"] = await EpisodeStore(db, 3600.0, 100).episodes(pipeline, snapshot)
    acc = RolloutAccumulator(
        baseline_version="v1",
        candidate_version="v2",
        primary_metric="feedback_score",
        step_starts=[T0 - 3600],
        feedback_max_delay_s=3600.0,
        buckets=8,
    )
    counts = await replay(db, acc, {"p": ("v1", "v2")}, T0 - 3600)
    out["replay"] = (counts, acc.state())
    return out


async def test_readers_ignore_evaluators_results(db: Database) -> None:
    """Storing evaluators' results changes no reader's answer; live listeners get them
    apart from people's feedback (``evaluation_rows``)."""
    repo = EventRepository(db)
    await repo.store_batch(
        [*(call(i, "ep1" if i < 2 else None) for i in range(8)), call(8, "ep1", "s")], [], {}
    )
    stored = await repo.store_batch([], human(), {})
    assert [row[0] for row in stored.feedback_rows] == [e.event_id for e in human()]
    assert stored.evaluation_rows == ()
    before_f = await db.reader.execute_fetchall("SELECT max(id) FROM feedback_events")
    snapshot = Snapshot(time.time(), int(next(iter(before_f))[0]), 9)
    before = await readers(db, snapshot)
    assert before["examples"]
    assert before["episodes"]
    assert before["replay"][0][1] > 0

    outcome = await repo.store_batch([], [*evaluations(), *human()[:1]], {})
    assert outcome.feedback_rows == ()  # the human repeat is a duplicate
    assert [row[0] for row in outcome.evaluation_rows] == [e.event_id for e in evaluations()]
    assert {row[-1] for row in outcome.evaluation_rows} == {
        "eval:judge",
        "eval:judge-0",
        "eval:judge-1",
    }
    after_f = await db.reader.execute_fetchall("SELECT max(id) FROM feedback_events")
    after = await readers(db, Snapshot(snapshot.now, int(next(iter(after_f))[0]), 9))
    assert after == before


async def test_source_column_is_stored_and_old_rows_are_human(tmp_path: Path) -> None:
    """The evaluation migration keeps every feedback row, with no source (people's)."""
    path = tmp_path / "v12.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:12]:
        for statement in _statements(migration.sql):
            conn.execute(statement)
    conn.execute("PRAGMA user_version=12")
    conn.execute(
        "INSERT INTO feedback_events (event_id, ts, prompt, variant, request_id, score, kind, "
        "ingested_at) VALUES ('old', ?, 'p', 'v1', 'r1', 0.5, 'q', ?)",
        (T0, T0),
    )
    conn.close()
    db = await Database.open(path)
    try:
        await EventRepository(db).store_batch([], evaluations()[:1], {})
        rows = await db.reader.execute_fetchall(
            "SELECT event_id, source FROM feedback_events ORDER BY id"
        )
        assert [tuple(r) for r in rows] == [("old", None), ("e0", "eval:judge-0")]
    finally:
        await db.close()


@pytest.mark.parametrize("source", ["eval:judge", "eval:a", "eval:x.y_z-1", "eval:" + "j" * 64])
def test_evaluator_sources_are_accepted(source: str) -> None:
    """``eval:<name>`` is an evaluator's result."""
    assert score("e", 0.5, source, episode_id="ep").source == source


@pytest.mark.parametrize("source", ["human", "eval:", "eval:-x", "eval:x\n", "eval:" + "j" * 65])
def test_other_sources_are_clear_errors(source: str) -> None:
    """Anything else is refused, saying what the form is."""
    with pytest.raises(ValueError, match=r"eval:<evaluator>|at most"):
        score("e", 0.5, source, episode_id="ep")


async def test_signals_select_their_rows(db: Database) -> None:
    """A signal by name selects its feedback in SQL and in a stored batch alike."""
    from promptd.evaluation.signals import parse_signal, rows_of, sql_condition

    repo = EventRepository(db)
    outcome = await repo.store_batch([], [*human(), *evaluations()], {})
    for signal in ("human", "eval:judge", "eval:judge-0", "eval:none"):
        where, params = sql_condition(signal)
        found = await db.reader.execute_fetchall(
            f"SELECT event_id FROM feedback_events WHERE {where} ORDER BY id", params
        )
        rows = rows_of(signal, outcome.feedback_rows, outcome.evaluation_rows)
        assert [r[0] for r in rows] == [str(r[0]) for r in found], signal
    assert len(rows_of("human", outcome.feedback_rows, outcome.evaluation_rows)) == 5
    with pytest.raises(ValueError, match="use 'human' or 'eval:"):
        parse_signal("people")


async def test_the_optimizer_reads_the_signals_a_prompt_chooses(db: Database) -> None:
    """Chosen per prompt, an evaluator's scores are the examples' scores (alone, or
    averaged with people's per call); people's correction stays the reference."""
    repo = EventRepository(db)
    await repo.store_batch([call(i) for i in range(8)], [], {})
    await repo.store_batch([], [*human(), *evaluations()], {})
    last = await db.reader.execute_fetchall("SELECT max(id) FROM feedback_events")
    snapshot = Snapshot(time.time(), int(next(iter(last))[0]), 8)

    async def scores(*signals: str) -> dict[str, float]:
        store = ExampleStore(db, 3600.0, 100, signals_of=lambda prompt: signals)
        return {e.request_id: e.score for e in await store.examples("p", snapshot)}

    assert await scores("human") == {"r1": 0.25, "r3": 0.75, "r5": 0.0, "r2": 1.0}
    assert await scores("eval:judge-0") == {f"r{i}": 0.9 for i in (0, 2, 4, 6)}
    both = await scores("human", "eval:judge-1")
    assert both["r1"] == pytest.approx((0.25 + 0.9) / 2)
    assert both["r7"] == pytest.approx(0.9)
    store = ExampleStore(db, 3600.0, 100, signals_of=lambda prompt: ("eval:judge",))
    [r2] = await store.examples("p", snapshot)
    assert (r2.request_id, r2.score, r2.correction) == ("r2", 0.1, "fixed")
