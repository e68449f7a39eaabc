"""The engine's SQL on a real SQLite file: results kept once, the cursor only forward, the
outbox's view, totals and retention."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from promptd.evaluation.calls import Call, Verdict
from promptd.evaluation.outbox import event_id
from promptd.evaluation.store import EvaluationStore
from promptd.storage.database import Database

T0 = 1_795_000_000.0


@pytest.fixture
async def store(store_target: Path | str) -> AsyncIterator[EvaluationStore]:
    """A store on a migrated database (a SQLite file, then PostgreSQL)."""
    db = await Database.open(store_target)
    yield EvaluationStore(db)
    await db.close()


def call(i: int) -> Call:
    return Call(f"r{i}", "p", "v1", "m", T0 + i, {"q": i}, f"a{i}")


def verdict(name: str, score: float | None, cost: float = 0.0) -> Verdict:
    if score is None:
        return Verdict(name, "judge", "invalid", None, "no score", cost)
    return Verdict(name, "judge", "scored", score, "why", cost)


async def save(store: EvaluationStore, i: int, *verdicts: Verdict, at: float) -> int:
    rows = [(v, event_id(f"r{i}", v.evaluator)) for v in verdicts]
    return await store.save([(call(i), rows)], at)


async def test_results_are_kept_once_and_published_through_the_outbox(
    store: EvaluationStore,
) -> None:
    """A second verdict for the same (call, evaluator) is not stored; the outbox sees
    scored results until they are marked, never invalid ones."""
    assert await save(store, 1, verdict("j", 0.5), verdict("c", 1.0), at=T0) == 2
    assert await save(store, 1, verdict("j", 0.9), at=T0 + 1) == 0
    assert await save(store, 2, verdict("j", None, 0.01), at=T0 + 2) == 1
    assert await store.decided([("r1", "j"), ("r1", "x"), ("r2", "j")]) == {
        ("r1", "j"),
        ("r2", "j"),
    }
    waiting = await store.unpublished(10)
    assert [(r.request_id, r.evaluator, r.score) for r in waiting] == [
        ("r1", "j", 0.5),
        ("r1", "c", 1.0),
    ]
    await store.mark_published([waiting[0].event_id], T0 + 3)
    assert [r.evaluator for r in await store.unpublished(10)] == ["c"]
    totals = await store.totals(T0 - 10, T0 + 1.5)
    assert totals["j"]["scored"] == 1
    assert totals["j"]["invalid"] == 1
    assert totals["j"]["cost_usd_today"] == pytest.approx(0.01)
    assert totals["c"]["unpublished"] == 1
    assert (await store.spent_since(T0)) == {"c": 0.0, "j": pytest.approx(0.01)}


async def test_cursor_only_moves_forward(store: EvaluationStore) -> None:
    """Saving an older position keeps the newer one."""
    assert await store.load_cursor() is None
    await store.save_cursor(10, T0)
    await store.save_cursor(7, T0 + 1)
    assert await store.load_cursor() == 10
    await store.save_cursor(12, T0 + 2)
    assert await store.load_cursor() == 12


async def test_retention_keeps_what_the_outbox_still_needs(store: EvaluationStore) -> None:
    """Old published and invalid results go; old unpublished ones and recent ones stay."""
    await save(store, 1, verdict("j", 0.5), at=T0)
    await save(store, 2, verdict("j", None), at=T0)
    await save(store, 3, verdict("j", 0.5), at=T0)
    await save(store, 4, verdict("j", 0.5), at=T0 + 100)
    published = [r.event_id for r in await store.unpublished(10) if r.request_id in ("r1", "r4")]
    await store.mark_published(published, T0 + 101)
    assert await store.purge_older_than(T0 + 50, chunk=1) == 2
    assert {r for r, _ in await store.decided([(f"r{i}", "j") for i in range(1, 5)])} == {
        "r3",
        "r4",
    }
