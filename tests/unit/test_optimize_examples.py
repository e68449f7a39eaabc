"""The example store on a real SQLite file."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from promptd.storage.database import Database
from promptd.storage.examples import ExampleStore, split_held_out
from tests.optimize_helpers import Row, seed


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated database, closed afterwards."""
    database = await Database.open(tmp_path / "t.db")
    yield database
    await database.close()


ROWS = [
    Row("r1", {"q": "a"}, "good", (1.0, 0.9)),
    Row("r2", {"q": "b"}, "bad", (0.1,), comment="wrong", correction="right"),
    Row("r3", {"q": "c"}, "meh", (0.5,)),
    Row("r4", {"q": "d"}, "great", (1.0,)),
]


async def test_best_worst_and_corrections_join_feedback(db: Database) -> None:
    """Examples carry mean score, comments and the correction, ordered per query."""
    await seed(db, "p", ROWS)
    await seed(db, "other", [Row("x1", {"q": "z"}, "o", (1.0,))])
    store = ExampleStore(db, max_age_s=86_400, limit=100)
    now = time.time()
    best = await store.best_rated("p", now, 0.8)
    assert [e.request_id for e in best] == ["r4", "r1"]
    assert best[1].n_feedback == 2
    worst = await store.worst_rated("p", now, 0.5)
    assert [e.request_id for e in worst] == ["r2", "r3"]
    assert worst[0].comments == "wrong"
    assert worst[0].correction == "right"
    assert worst[0].input == {"q": "b"}
    corrected = await store.with_corrections("p", now)
    assert [e.request_id for e in corrected] == ["r2"]


async def test_age_limit_and_size_cap(db: Database) -> None:
    """Old examples are out of the store and every answer is capped."""
    now = time.time()
    await seed(db, "p", ROWS[:2], now=now - 10 * 86_400)
    await seed(db, "p", ROWS[2:], now=now)
    assert len(await ExampleStore(db, max_age_s=86_400, limit=100).recent("p", now)) == 2
    assert len(await ExampleStore(db, max_age_s=30 * 86_400, limit=3).recent("p", now)) == 3


async def test_held_out_split_is_stable_per_run(db: Database) -> None:
    """The same run id gives the same held-out set whatever the order; another run differs."""
    rows = [Row(f"r{i}", {"q": str(i)}, "o", (1.0,)) for i in range(40)]
    await seed(db, "p", rows)
    examples = await ExampleStore(db, 86_400, 100).recent("p", time.time())
    train, held = split_held_out(examples, "run-1", 10)
    _, held_again = split_held_out(list(reversed(examples)), "run-1", 10)
    _, held_other = split_held_out(examples, "run-2", 10)
    assert len(held) == 10
    assert len(train) == 30
    assert {e.request_id for e in held} == {e.request_id for e in held_again}
    assert {e.request_id for e in held} != {e.request_id for e in held_other}
    assert len(split_held_out(examples[:4], "run-1", 10)[1]) == 2
