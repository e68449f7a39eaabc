"""A rollout's pre-period history: the per-unit figures (pure), the query over a real
SQLite file, and its saved copy."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

import pytest
from structlog.testing import capture_logs

from promptd.replacement import preperiod
from promptd.replacement.history import FIGURES, History
from promptd.storage.database import Database
from promptd.storage.repository import EventRepository
from promptd.storage.rows import FeedbackRow, MetricRow
from promptd.storage.snapshots import Snapshot, SnapshotStore

START = 1_795_000_000.0


def test_figures_are_per_unit_means_centred_over_the_units_that_have_them() -> None:
    """Each figure is the unit's mean (ln of the mean latency), less the mean of that
    figure over the units that have it; a unit without a figure gets 0, and the centres
    of the per-call input size are the pre-period calls' mean size."""
    rows = [
        # unit, calls, ok, latency, quality n/sum, cost n/sum, chars n/sum, feedback n/sum
        ("a", 4, 3, 400.0, 0, 0.0, 4, 0.04, 4, 400, 2, 1.0),
        ("b", 2, 2, 100.0, 2, 1.0, 2, 0.06, 2, 1000, 0, 0.0),
        ("c", 0, 0, 0.0, 0, 0.0, 0, 0.0, 0, 0, 0, 0.0),  # no calls: not a unit with history
    ]
    history = History.from_sums(rows, START - 100, START)
    assert set(history.units) == {"a", "b"}
    col = {name: FIGURES.index(name) for name in FIGURES}
    a, b = history.units["a"], history.units["b"]
    assert a[col["feedback_score"]] == 0.0  # the only unit with feedback sits at its mean
    assert b[col["feedback_score"]] == 0.0  # no feedback: at the mean
    assert history.centres["feedback_score"] == 0.5
    assert a[col["success_rate"]] == pytest.approx(0.75 - 0.875)
    assert a[col["error_rate"]] == pytest.approx(0.25 - 0.125)
    assert a[col["log_latency"]] == pytest.approx(
        math.log(100.0) - math.log(50.0) / 2 - math.log(100.0) / 2
    )
    assert a[col["quality"]] == 0.0
    assert b[col["quality"]] == 0.0
    assert history.counts == {"feedback_score": 1, "success_rate": 2, "quality": 1,
                              "log_latency": 2, "error_rate": 2, "cost": 2}  # fmt: skip
    assert b[col["cost"]] == pytest.approx(0.03 - 0.02)
    assert history.centre("input_chars") == pytest.approx(1400 / 6)
    assert history.centre("log_input_chars") == pytest.approx(math.log1p(1400 / 6))
    assert History.from_sums([], 0.0, 1.0).units == {}


def test_encoding_round_trips_and_a_garbled_copy_is_refused() -> None:
    """The table decodes to what was encoded (the same digest); another table has another
    digest; bytes that are not a table raise ValueError."""
    rows = [("a", 4, 3, 400.0, 0, 0.0, 4, 0.04, 4, 400, 2, 1.0), ("b", 2, 2, 100.0, 2, 1.0, 2,
            0.06, 0, 0, 0, 0.0)]  # fmt: skip
    history = History.from_sums(rows, START - 100, START)
    back = History.decode(history.encode())
    assert (back.units, back.centres, back.counts) == (history.units, history.centres,
                                                       history.counts)  # fmt: skip
    assert back.digest() == history.digest()
    assert History.from_sums(rows[:1], START - 100, START).digest() != history.digest()
    for garbage in (b"", b"\x81\xa1x\x01", History.empty().encode()[:-3]):
        with pytest.raises(ValueError, match="not a rollout history"):
            History.decode(garbage)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A real SQLite file."""
    database = await Database.open(tmp_path / "h.db")
    yield database
    await database.close()


def _call(rid: str, ts: float, unit: str | None, latency: float, ok: bool, prompt: str = "p",
          chars: int | None = None, episode: str | None = None) -> MetricRow:  # fmt: skip
    return (f"m-{rid}", ts, prompt, "v1", "m", rid, unit, latency, ok, None, None, None,
            None, 0.01, chars, episode, None, None, None, None)  # fmt: skip


def _feedback(fid: str, rid: str, score: float, source: str | None = None) -> FeedbackRow:
    return (f"f-{fid}", START - 50, "p", "v1", None, rid, score, "q", None, None, None, source)


async def _store(db: Database, at: float, metrics: list[MetricRow],
                 feedback: list[FeedbackRow] = ()) -> None:  # type: ignore[assignment]  # fmt: skip
    clock = SimpleNamespace(time=lambda: at)
    with patch("promptd.storage.repository.time", clock):
        await EventRepository(db).store_batch(metrics, list(feedback), {})


async def test_the_query_reads_the_window_stored_before_the_start(db: Database) -> None:
    """Only the prompt's calls stamped in [start − lookback, start) and stored before the
    start count, by unit (unit_id, else episode_id; a call with neither has no unit); a
    call's feedback is averaged over its pieces (people's, or the signals asked for),
    feedback stored after the start is not."""
    await _store(db, START - 10, [
        _call("1", START - 50, "u1", 100.0, True, chars=100),
        _call("2", START - 40, "u1", 300.0, False, chars=300),
        _call("3", START - 30, None, 50.0, True, episode="e1"),
        _call("4", START - 30, None, 50.0, True),  # no unit
        _call("5", START - 500, "u2", 10.0, True),  # before the window
        _call("6", START - 20, "u2", 10.0, True, prompt="other"),
    ], [_feedback("a", "1", 1.0), _feedback("b", "1", 0.0), _feedback("c", "2", 1.0),
        _feedback("j", "2", 0.0, source="eval:judge")])  # fmt: skip
    # Stored after the start: a late call stamped in the window, and late feedback.
    await _store(db, START + 5, [_call("7", START - 20, "u3", 10.0, True)],
                 [_feedback("d", "3", 1.0)])  # fmt: skip
    history = await preperiod.compute(db, ["p"], START - 100, START)
    assert set(history.units) == {"u1", "e1"}
    col = {name: FIGURES.index(name) for name in FIGURES}
    # u1: calls 1 and 2, feedback 0.5 (call 1's mean) and 1.0: 0.75; e1 has none.
    assert history.centres["feedback_score"] == pytest.approx(0.75)
    assert history.counts["feedback_score"] == 1
    assert history.units["u1"][col["success_rate"]] == pytest.approx(0.5 - 0.75)
    assert history.centres["log_latency"] == pytest.approx((math.log(200.0) + math.log(50.0)) / 2)
    assert history.centre("input_chars") == pytest.approx(200.0)
    # A rollout decided on an evaluator's scores reads its scores instead of people's.
    judged = await preperiod.compute(db, ["p"], START - 100, START, ("eval:judge",))
    assert judged.centres["feedback_score"] == 0.0
    assert judged.counts["feedback_score"] == 1


async def test_the_saved_copy_is_used_and_a_bad_one_recomputed(db: Database) -> None:
    """The first load computes and saves the table; the next one reads the saved copy even
    after the events are gone (retention); an unreadable copy is computed again, with a
    warning."""
    await _store(db, START - 10, [_call("1", START - 50, "u1", 100.0, True)])
    store = SnapshotStore(db)
    first, source = await preperiod.load(db, store, "ro-1", ["p"], START, 100.0)
    assert (source, set(first.units)) == ("computed", {"u1"})
    async with db.transaction() as conn:
        await conn.execute("DELETE FROM metric_events")
    again, source = await preperiod.load(db, store, "ro-1", ["p"], START, 100.0)
    assert (source, again.digest()) == ("saved", first.digest())
    await store.save(Snapshot(preperiod.name("ro-1"), START, 0, 0, preperiod.FORMAT, b"junk"))
    with capture_logs() as logs:
        fresh, source = await preperiod.load(db, store, "ro-1", ["p"], START, 100.0)
    assert (source, fresh.units) == ("computed", {})
    assert [entry["event"] for entry in logs] == ["rollout_history_unreadable"]
