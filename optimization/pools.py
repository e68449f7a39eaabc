"""Demonstration pools on the optimizer's side: what goes in one, and retrieval in a run.

A pool holds the **trusted** examples of a prompt's **train split**: those with a
correction, or whose own output was rated at least the trusted threshold, one per
distinct input (:func:`trusted_demos`). Only the train split, by the same deterministic
hash as every run's split: so no pool ever holds a validation or test example, and a
version that pins a pool can be scored on validation and gated on test without any
example seeing its own answer.

:class:`DemoPools` is a run's access to pools: it stores the pool a search builds, and
retrieves the nearest demos for an example being scored, from the pool a program pins,
with two exclusions that hold whatever the pool holds: never the example itself, never
an example outside the train split.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from promptd.demos import Demo, DemoSpec, as_text, input_text
from promptd.optimization.embeddings import RunEmbeddings
from promptd.optimization.examples import Example
from promptd.retrieval import Index, LexicalIndex, VectorIndex, decode_vectors, encode_vectors
from promptd.storage.pools import PoolInfo, PoolStore


def trusted_demos(examples: Sequence[Example], min_score: float, cap: int) -> list[Demo]:
    """The examples with a trusted answer as demos, one per distinct input, in order,
    at most ``cap``."""
    unique: dict[str, Demo] = {}
    for e in examples:
        answer = e.reference(min_score)
        if answer is None or len(unique) >= cap:
            continue
        unique.setdefault(as_text(e.input).strip().lower(), Demo(e.request_id, e.input, answer))
    return list(unique.values())


class PoolUnavailable(LookupError):
    """A program pins a pool that is not stored (or lacks the vectors it needs)."""


@dataclass
class _Loaded:
    info: PoolInfo
    demos: tuple[Demo, ...]
    vectors: Any
    # Positions of demos outside the train split: never retrieved in a run.
    outside: frozenset[int]
    position: dict[str, int]
    indexes: dict[tuple[str, tuple[str, ...]], Index] = field(default_factory=dict)


class DemoPools:
    """A run's pools (see the module docstring)."""

    def __init__(
        self,
        store: PoolStore,
        prompt: str,
        in_train: Callable[[str], bool],
        embeddings: RunEmbeddings | None = None,
    ) -> None:
        self.store = store
        self.prompt = prompt
        self.in_train = in_train
        self.embeddings = embeddings
        self._loaded: dict[str, _Loaded] = {}
        self._lock = asyncio.Lock()

    async def save(
        self, demos: Sequence[Demo], origin: str, embedded: bool, fields: tuple[str, ...] = ()
    ) -> PoolInfo:
        """Store ``demos`` as a snapshot (with the vectors of their inputs' ``fields``
        when ``embedded``)."""
        if not embedded:
            return await self.store.save(self.prompt, demos, origin)
        if self.embeddings is None:
            raise PoolUnavailable("no embedding model is configured ([optimization.knn.embedding])")
        vectors = await self.embeddings.vectors([input_text(d.input, fields) for d in demos])
        dim = len(vectors[0]) if vectors else 0
        return await self.store.save(
            self.prompt,
            demos,
            origin,
            embedding_model=self.embeddings.settings.model,
            vectors=encode_vectors(vectors) if vectors else "",
            dim=dim,
        )

    async def nearest(
        self, spec: DemoSpec, fields: tuple[str, ...], request_id: str, value: Any
    ) -> list[Demo]:
        """The demos ``spec`` retrieves for the example (``request_id``, its input
        ``value``): never itself, never one outside the train split."""
        pool = await self._load(spec.pool)
        index = await self._index(pool, spec.retriever, fields)
        text = input_text(value, fields)
        query: Any = text
        if spec.retriever == "embedding":
            assert self.embeddings is not None
            [query] = await self.embeddings.vectors([text])
        banned = set(pool.outside)
        own = pool.position.get(request_id)
        if own is not None:
            banned.add(own)
        hits = index.nearest(query, spec.k, spec.max_distance, banned)
        return [pool.demos[i] for i, _distance in hits]

    async def _load(self, pool_id: str) -> _Loaded:
        async with self._lock:
            loaded = self._loaded.get(pool_id)
            if loaded is None:
                stored = await self.store.get(self.prompt, pool_id)
                if stored is None:
                    raise PoolUnavailable(f"prompt {self.prompt!r} has no pool {pool_id!r}")
                demos = stored.demos
                vectors = None
                if stored.vectors and stored.info.dim:
                    vectors = decode_vectors(stored.vectors, stored.info.dim)
                loaded = _Loaded(
                    stored.info,
                    demos,
                    vectors,
                    frozenset(i for i, d in enumerate(demos) if not self.in_train(d.id)),
                    {d.id: i for i, d in enumerate(demos)},
                )
                self._loaded[pool_id] = loaded
            return loaded

    async def _index(self, pool: _Loaded, retriever: str, fields: tuple[str, ...]) -> Index:
        key = (retriever, fields if retriever == "lexical" else ())
        index = pool.indexes.get(key)
        if index is not None:
            return index
        if retriever == "embedding":
            if pool.vectors is None or self.embeddings is None:
                raise PoolUnavailable(
                    f"pool {pool.info.pool_id!r} cannot be searched by embedding: "
                    + ("it has no vectors" if pool.vectors is None else "no embedding model")
                )
            index = VectorIndex(pool.vectors)
        else:
            texts = [input_text(d.input, fields) for d in pool.demos]
            index = await asyncio.to_thread(LexicalIndex, texts)
        pool.indexes[key] = index
        return index
