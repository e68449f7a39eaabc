"""Demonstration pools: what is trusted, versioned snapshots, pinning, and retrieval in a
run that never shows an example itself or anything outside the train split."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from promptd.demos import Demo
from promptd.optimization.config import EvaluationSettings, LLMSettings
from promptd.optimization.evaluator import Evaluator
from promptd.optimization.examples import Example, split_of
from promptd.optimization.llm import Budget, CachedLLM, LiteLLMClient
from promptd.optimization.pools import DemoPools, PoolUnavailable, trusted_demos
from promptd.optimization.program import Program
from promptd.optimization.store import OptimizationStore
from promptd.replacement.registry import NewVersion, Registry, Unprocessable
from promptd.storage.database import Database
from promptd.storage.pools import PoolStore

SALT, TRAIN, VALIDATION = "s", 0.5, 0.25
CONFIG: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "Name the city."},
        {"role": "user", "content": "Message: {text}"},
    ]
}


def example(rid: str, text: str, *, correction: str | None = None, score: float = 0.0) -> Example:
    """A captured call with its output, rating and correction."""
    return Example(rid, "v1", 0.0, {"text": text}, "chatty", score, 1, None, correction)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated SQLite file."""
    database = await Database.open(tmp_path / "pools.db")
    yield database
    await database.close()


def test_trusted_demos_are_corrections_and_well_rated_outputs_once_per_input() -> None:
    """A correction is trusted, an output rated at the threshold too, a low one not; the
    same input twice gives one demo; the cap holds."""
    examples = [
        example("a", "to Lyon", correction="Lyon"),
        example("b", "to Oslo", score=0.8),
        example("c", "to Rome", score=0.79),
        example("d", "TO LYON", correction="Lyon"),
        example("e", "to Kyiv", correction="Kyiv"),
    ]
    demos = trusted_demos(examples, 0.8, 10)
    assert [(d.id, d.answer) for d in demos] == [("a", "Lyon"), ("b", "chatty"), ("e", "Kyiv")]
    assert [d.id for d in trusted_demos(examples, 0.8, 2)] == ["a", "b"]


async def test_snapshots_are_named_by_content_numbered_and_pruned(db: Database) -> None:
    """Saving the same demos twice is one snapshot; a new content is the next number;
    pruning keeps the newest and the pinned ones."""
    store = PoolStore(db)
    first = await store.save("p", [Demo("a", "x", "1")], "manual")
    again = await store.save("p", [Demo("a", "x", "1")], "refresh")
    assert (again.pool_id, again.seq, again.origin) == (first.pool_id, 1, "manual")
    second = await store.save("p", [Demo("a", "x", "1"), Demo("b", "y", "2")], "refresh")
    third = await store.save("p", [Demo("c", "z", "3")], "refresh")
    assert (second.seq, third.seq, second.size) == (2, 3, 2)
    assert [p.seq for p in await store.list("p")] == [3, 2, 1]
    assert (await store.latest("p")) == third
    stored = await store.get("p", second.pool_id)
    assert stored is not None
    assert [d.id for d in stored.demos] == ["a", "b"]
    assert await store.prune("p", keep={first.pool_id}, before=float("inf")) == 1
    assert [p.seq for p in await store.list("p")] == [3, 1]
    assert await store.list("other") == []


async def test_a_version_pins_a_snapshot_that_exists(db: Database) -> None:
    """A version with pool demos and no snapshot named pins the newest; one naming a
    missing snapshot, or any before a pool exists, is refused with 422."""
    registry = Registry(db)
    await registry.register("p", NewVersion.model_validate({"config": CONFIG}))
    dynamic = {**CONFIG, "demos": {"source": "pool", "k": 3}}
    with pytest.raises(Unprocessable, match="no demonstration pool yet"):
        await registry.register("p", NewVersion.model_validate({"config": dynamic}))
    info = await PoolStore(db).save("p", [Demo("a", {"text": "to Lyon"}, "Lyon")], "manual")
    version = await registry.register("p", NewVersion.model_validate({"config": dynamic}))
    assert version.config is not None
    assert version.config["demos"] == {
        "source": "pool",
        "pool": info.pool_id,
        "k": 3,
        "retriever": "lexical",
        "max_chars": 1000,
    }
    missing = {**CONFIG, "demos": {"source": "pool", "pool": "pool-0000", "k": 2}}
    with pytest.raises(Unprocessable, match="no demonstration pool 'pool-0000'"):
        await registry.register("p", NewVersion.model_validate({"config": missing}))


def _ids_by_split(n: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for i in range(n):
        rid = f"r{i}"
        out[split_of(rid, SALT, TRAIN, VALIDATION)].append(rid)
    return out


async def test_a_scored_example_never_retrieves_itself_nor_another_split(
    db: Database, tmp_path: Path
) -> None:
    """Even from a pool that holds every split (all inputs alike, each example's own
    input identical to its demo), the evaluator shows a validation or test example only
    train-split demos, never itself; a train example never sees itself either."""
    by_split = _ids_by_split(60)
    # Other splits first: on equal distances the lower position would win.
    every = [*by_split["test"], *by_split["validation"], *by_split["train"]]
    demos = [Demo(rid, {"text": f"ship boxes to Lyon order {rid}"}, "Lyon") for rid in every]
    info = await PoolStore(db).save("p", demos, "test")
    pools = DemoPools(
        PoolStore(db), "p", lambda rid: split_of(rid, SALT, TRAIN, VALIDATION) == "train"
    )
    llm = CachedLLM(LiteLLMClient(0, 0.0), OptimizationStore(db), Budget(10, 1.0), "run", 1)
    evaluator = Evaluator(
        llm, EvaluationSettings(model=LLMSettings(model="openai/x"), metric="exact_match"), pools
    )
    demos_spec = {"source": "pool", "pool": info.pool_id, "k": 5, "retriever": "lexical"}
    program = Program.from_config({**CONFIG, "demos": demos_spec})
    train = set(by_split["train"])
    for split_name, ids in by_split.items():
        for rid in ids[:6]:
            text = f"ship boxes to Lyon order {rid}"
            messages = await evaluator.render(program, example(rid, text))
            assert messages is not None
            shown = [m["content"] for m in messages[1:-1:2]]
            assert len(shown) == 5, split_name
            shown_ids = [s.rsplit(" ", 1)[1] for s in shown]
            assert rid not in shown_ids
            assert set(shown_ids) <= train, (split_name, shown_ids)
    # Without the run's pools, a pool program cannot be rendered: said, not ignored.
    bare = Evaluator(llm, EvaluationSettings(model=LLMSettings(model="openai/x")))
    with pytest.raises(PoolUnavailable):
        await bare.render(program, example("r0", "x"))
    missing = Program.from_config({**CONFIG, "demos": {**demos_spec, "pool": "pool-gone"}})
    with pytest.raises(PoolUnavailable, match="pool-gone"):
        await evaluator.render(missing, example("r0", "x"))


class FakeExamples:
    """The example store's two reads, over a list the test changes."""

    def __init__(self, examples: list[Example]) -> None:
        self.items = examples

    async def snapshot(self, now: float) -> Any:
        return now

    async def examples(self, prompt: str, snapshot: Any) -> list[Example]:
        return list(self.items)


async def test_a_refresh_stores_a_new_snapshot_and_asks_for_a_run_when_enough_is_new(
    db: Database,
) -> None:
    """The refresher stores the train split's trusted demos as a new snapshot; the
    served version keeps its pin; a run is asked for only when the new snapshot has at
    least ``refresh_min_new`` demos the pinned one lacks, and only the train split
    ever enters a pool."""
    from promptd.optimization.config import OptimizationSettings
    from promptd.optimization.pool_refresh import PoolBuilder, PoolRefresher

    settings = OptimizationSettings(
        splits={"salt": SALT, "train": TRAIN, "validation": VALIDATION},
        knn={"refresh_min_new": 3},
    )
    rows = [example(f"r{i}", f"ship to town {i}", correction=f"T{i}") for i in range(40)]
    source = FakeExamples(rows[:20])
    store = PoolStore(db)
    builder = PoolBuilder(source, store, settings)  # type: ignore[arg-type]
    registry = Registry(db)
    await registry.register("p", NewVersion.model_validate({"config": CONFIG}))
    first, demos = await builder.build("p", ("text",), False, "manual")
    assert demos
    assert {d.id for d in demos} == {
        e.request_id
        for e in rows[:20]
        if split_of(e.request_id, SALT, TRAIN, VALIDATION) == "train"
    }
    dynamic = {**CONFIG, "demos": {"source": "pool", "k": 2}}
    served = await registry.register(
        "p", NewVersion.model_validate({"config": dynamic, "activate": True})
    )
    assert served.config is not None
    submitted: list[Any] = []

    async def submit(trigger: Any, strategies: Any) -> None:
        submitted.append((trigger, list(strategies)))

    refresher = PoolRefresher(builder, registry, submit)
    await refresher.refresh_all()  # nothing new: the same snapshot, no run
    assert [p.seq for p in await store.list("p")] == [1]
    assert submitted == []
    source.items = rows  # twenty more calls, some of them in the train split
    await refresher.refresh_all()
    infos = await store.list("p")
    assert [p.seq for p in infos] == [2, 1]
    [(trigger, strategies)] = submitted
    assert (trigger.kind, strategies) == ("pool_refresh", ["knn"])
    assert trigger.details == {"pool": infos[0].pool_id}
    active = await registry.active("p")
    assert active is not None
    assert active.config is not None
    assert active.config["demos"]["pool"] == first.pool_id  # the pin did not move


class Sampler:
    """A model answering by the sampling temperature: each sample its own answer."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.calls: list[float | None] = []

    async def complete(self, llm: LLMSettings, messages: list[Any], purpose: str) -> Any:
        from promptd.optimization.llm import Completion

        self.calls.append(llm.temperature)
        return Completion(self.answers[(len(self.calls) - 1) % len(self.answers)], 1)


async def test_an_ensemble_pays_n_samples_and_keeps_their_vote(db: Database) -> None:
    """A program voting over three samples makes three calls at its temperature (each
    cached apart) and scores the majority answer; a replay pays nothing."""
    model = LLMSettings(model="openai/x", temperature=0.0)
    sampler = Sampler(["Paris", "lyon", "Lyon."])
    llm = CachedLLM(sampler, OptimizationStore(db), Budget(10, 1.0), "run", 1)
    evaluator = Evaluator(llm, EvaluationSettings(model=model, metric="exact_match"))
    voting = Program.from_config(
        {**CONFIG, "ensemble": {"n": 3, "temperature": 0.7, "answer": "label"}}
    )
    [scored] = await evaluator.run(voting, [example("r1", "to Lyon", correction="lyon")])
    assert sampler.calls == [0.7, 0.7, 0.7]
    assert scored.output == "lyon"
    assert scored.score == 1.0
    await evaluator.run(voting, [example("r1", "to Lyon", correction="lyon")])
    assert len(sampler.calls) == 3


def test_the_knn_grid_fits_the_budget_with_room_for_a_candidate() -> None:
    """The minibatch shrinks so that the grid plus its best on all of validation fit the
    calls left; with too few, only the middle setting is tried; unbounded, the setting."""
    from promptd.optimization.strategies.knn import Setting, _fit

    grid = [Setting("lexical", k) for k in (1, 2, 4)]
    assert _fit(grid, 16, 12, float("inf")) == (12, grid)
    assert _fit(grid, 6, 12, 100) == (6, grid)
    size, kept = _fit(grid, 16, 12, 22)
    assert (size, kept) == (5, grid)
    assert len(grid) * size + (12 - size) <= 22
    assert _fit(grid, 16, 12, 12) == (1, [grid[1]])
