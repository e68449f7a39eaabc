"""The embedding retriever: litellm over HTTP to a local server, within the run's budget
and cache, with the same exclusions as the lexical one; the SDK side searches the same
vectors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from promptd.demos import Demo, DemoSpec
from promptd.optimization.config import LLMSettings
from promptd.optimization.embeddings import RunEmbeddings
from promptd.optimization.llm import Budget, CachedLLM, LiteLLMClient
from promptd.optimization.pools import DemoPools
from promptd.optimization.store import OptimizationStore
from promptd.sdk.pools import build
from promptd.storage.database import Database
from promptd.storage.pools import PoolStore
from tests.optimize_fake_llm import FakeLLM, serving, word_vector

DEMOS = [
    Demo("t1", {"text": "ship boxes to lyon"}, "Lyon"),
    Demo("v1", {"text": "ship boxes to lyon today"}, "Lyon"),
    Demo("t2", {"text": "printer jam on floor two"}, "none"),
    Demo("t3", {"text": "ship lamps to oslo"}, "Oslo"),
]


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    """The local OpenAI-compatible server."""
    async with serving(lambda body: "unused") as server:
        yield server


async def test_pools_embedded_once_searched_by_cosine_without_other_splits(
    tmp_path: Path, fake: FakeLLM
) -> None:
    """A run stores an embedded snapshot (one batch paid), retrieves by cosine distance
    from the train split only and never the example itself; the same texts are never
    paid twice; the SDK, given the stored snapshot and an embed function, picks the
    same demos."""
    db = await Database.open(tmp_path / "e.db")
    try:
        model = LLMSettings(model="openai/embedder", api_base=fake.api_base)
        budget = Budget(10, 1.0)
        llm = CachedLLM(LiteLLMClient(0, 0.0), OptimizationStore(db), budget, "run", 1)
        pools = DemoPools(
            PoolStore(db), "p", lambda rid: rid.startswith("t"), RunEmbeddings(llm, model)
        )
        info = await pools.save(DEMOS, "optimizer:run", True, ("text",))
        assert (info.embedding_model, info.dim, info.size) == ("openai/embedder", 32, 4)
        assert fake.embedded == [[d.input["text"] for d in DEMOS]]  # type: ignore[index]
        spec = DemoSpec(info.pool_id, 2, None, "embedding")
        found = await pools.nearest(spec, ("text",), "t1", {"text": "ship boxes to lyon"})
        # Not itself (t1), not the validation example v1, though both are nearest.
        assert [d.id for d in found] == ["t3", "t2"]
        cut = DemoSpec(info.pool_id, 2, 0.2, "embedding")
        assert [d.id for d in await pools.nearest(cut, ("text",), "x", "ship to oslo")] == ["t3"]
        spent = budget.spent()
        await pools.nearest(spec, ("text",), "t1", {"text": "ship boxes to lyon"})
        assert budget.spent() == spent  # the input's vector came from the cache
        # The pool, then "ship to oslo": "ship boxes to lyon" is a demo's text, cached.
        assert fake.embedded[1:] == [["ship to oslo"]]

        stored = await PoolStore(db).get("p", info.pool_id)
        assert stored is not None
        key = (info.pool_id, "embedding", ("text",))
        loaded = build(key, stored.to_dict(), word_vector)
        chosen = loaded.choose(spec, {"text": "ship lamps to oslo please"})
        assert [d.id for d in chosen] == ["t3", "t1"]  # in the app, every split is served
    finally:
        await db.close()
