"""Examples, snapshots and splits (the store on a real SQLite file; the split is pure)."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from promptd.optimization.examples import Example, ExampleStore, split, split_of
from promptd.storage.database import Database
from tests.optimize_helpers import Row, seed


@pytest.fixture
async def db(store_target: Path | str) -> AsyncIterator[Database]:
    """A migrated database, closed afterwards."""
    database = await Database.open(store_target)
    yield database
    await database.close()


def _ex(rid: str) -> Example:
    return Example(rid, "v1", 0.0, "in", "out", 0.5, 1, None, None)


def test_split_does_not_depend_on_order_or_on_other_examples() -> None:
    """An example's split is a function of its request id and the salt alone."""
    pool = [_ex(f"r{i}") for i in range(200)]
    a = split(pool, "salt", 0.4, 0.3)
    shuffled = pool[:]
    random.Random(1).shuffle(shuffled)
    b = split(shuffled + [_ex(f"new{i}") for i in range(50)], "salt", 0.4, 0.3)
    for name in ("train", "validation", "test"):
        ids_a = [e.request_id for e in getattr(a, name)]
        ids_b = [e.request_id for e in getattr(b, name) if not e.request_id.startswith("new")]
        assert ids_a == ids_b
    other_salt = split(pool, "other", 0.4, 0.3)
    assert [e.request_id for e in other_salt.test] != [e.request_id for e in a.test]


def test_split_shares_follow_the_settings() -> None:
    """Over 20,000 ids each share is within four binomial standard errors of its setting."""
    n = 20_000
    counts = {"train": 0, "validation": 0, "test": 0}
    for i in range(n):
        counts[split_of(f"req-{i}", "promptd", 0.5, 0.2)] += 1
    for name, share in (("train", 0.5), ("validation", 0.2), ("test", 0.3)):
        se = (share * (1 - share) / n) ** 0.5
        assert abs(counts[name] / n - share) < 4 * se


def test_reference_prefers_the_correction_then_a_well_rated_output() -> None:
    """The trusted answer is the correction, else the output when rated high enough."""
    corrected = Example("a", "v", 0.0, "i", "bad", 0.1, 1, None, "good")
    rated = Example("b", "v", 0.0, "i", "fine", 0.9, 1, None, None)
    poor = Example("c", "v", 0.0, "i", "bad", 0.3, 1, None, None)
    assert corrected.reference(0.8) == "good"
    assert rated.reference(0.8) == "fine"
    assert rated.reference(0.95) is None
    assert poor.reference(0.8) is None


async def test_snapshot_freezes_what_a_run_reads(db: Database) -> None:
    """Events stored after the snapshot (new calls, late feedback, a late correction)
    do not change the examples a run reads through it."""
    await seed(db, "p", [Row("r1", {"q": "a"}, "x", (1.0,)), Row("r2", {"q": "b"}, "y", (0.5,))])
    store = ExampleStore(db, max_age_s=86_400, limit=100)
    snap = await store.snapshot(time.time())
    before = await store.examples("p", snap)
    await seed(
        db,
        "p",
        [
            Row("r1", {"q": "a"}, "x", (0.0,), correction="fixed"),
            Row("r3", {"q": "c"}, "z", (1.0,)),
        ],
    )
    after_snapshot = await store.examples("p", snap)
    assert after_snapshot == before
    assert {e.request_id for e in before} == {"r1", "r2"}
    fresh = {e.request_id: e for e in await store.examples("p", await store.snapshot(time.time()))}
    assert set(fresh) == {"r1", "r2", "r3"}
    assert fresh["r1"].correction == "fixed"
    assert fresh["r1"].n_feedback == 2


async def test_examples_join_feedback_and_respect_age_and_cap(db: Database) -> None:
    """Examples carry mean score, comments and correction; old ones and the excess are out."""
    now = time.time()
    await seed(db, "p", [Row("old", {"q": "o"}, "o", (1.0,))], now=now - 10 * 86_400)
    await seed(
        db,
        "p",
        [
            Row("r1", {"q": "a"}, "good", (1.0, 0.5), comment="meh"),
            Row("r2", {"q": "b"}, "bad", (0.0,), correction="right"),
        ],
        now=now,
    )
    await seed(db, "other", [Row("x", {"q": "z"}, "o", (1.0,))], now=now)
    store = ExampleStore(db, max_age_s=86_400, limit=100)
    got = {e.request_id: e for e in await store.examples("p", await store.snapshot(now))}
    assert set(got) == {"r1", "r2"}
    assert got["r1"].score == pytest.approx(0.75)
    assert got["r1"].comments == "meh"
    assert got["r2"].correction == "right"
    assert got["r2"].input == {"q": "b"}
    capped = ExampleStore(db, max_age_s=30 * 86_400, limit=2)
    assert len(await capped.examples("p", await capped.snapshot(now))) == 2
