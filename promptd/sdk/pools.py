"""Demonstration pools in the app: fetched with routing, kept in memory, searched per call.

When a version's configuration takes its demos from a pool (see :mod:`promptd.demos`),
the routing refresh (sender thread) fetches the pinned snapshot once
(``GET {daemon_url}/v1/prompts/{name}/pools/{pool}``; a snapshot never changes), builds
its index there, and only then serves the routing: no call sees a version whose pool is
not loaded. A pool no served version pins any more is dropped.

On the call path, :meth:`LoadedPool.choose` takes the input's text, finds the ``k``
nearest demos (lexical: ``bm25s``, in the app's process; embedding: the input's vector
from the app's ``embed`` function, or from ``POST {daemon_url}/v1/prompts/{name}/embed``
when the app leaves it to the daemon) and returns them.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from promptd.demos import Demo, DemoSpec, fields_of, final_template, input_text

#: An app's embedding function: the input's text to its vector (the pool's model).
Embed = Callable[[str], Sequence[float]]
#: What identifies a loaded pool: the snapshot, how it is searched, over which fields.
PoolKey = tuple[str, str, tuple[str, ...]]


def pool_key(spec: DemoSpec, config: Mapping[str, Any]) -> PoolKey:
    """The key under which a configuration's pool is loaded."""
    return (spec.pool, spec.retriever, fields_of(final_template(config)))


class LoadedPool:
    """One snapshot in memory with its index."""

    __slots__ = ("demos", "embed", "fields", "index", "key", "model")

    def __init__(
        self,
        key: PoolKey,
        demos: Sequence[Demo],
        index: Any,
        model: str | None = None,
        embed: Callable[[str], Sequence[float]] | None = None,
    ) -> None:
        self.key = key
        self.demos = demos
        self.index = index
        self.fields = key[2]
        self.model = model
        self.embed = embed

    def choose(self, spec: DemoSpec, values: Mapping[str, Any] | str) -> list[Demo]:
        """The ``spec.k`` demos nearest to the input ``values``."""
        text = input_text(values, self.fields)
        if spec.retriever == "embedding":
            assert self.embed is not None
            query: Any = self.embed(text)
        else:
            query = text
        return [self.demos[i] for i, _d in self.index.nearest(query, spec.k, spec.max_distance)]


def build(key: PoolKey, body: Mapping[str, Any], embed: Embed | None) -> LoadedPool:
    """A pool from its JSON snapshot (``ValueError`` when it cannot be searched as asked)."""
    from promptd.retrieval import LexicalIndex, VectorIndex, decode_vectors

    demos = [Demo.from_dict(d) for d in body.get("demos", [])]
    pool_id, retriever, fields = key
    if retriever == "embedding":
        vectors, dim = body.get("vectors"), body.get("dim")
        if not vectors or not dim:
            raise ValueError(f"pool {pool_id} has no embeddings")
        index: Any = VectorIndex(decode_vectors(vectors, int(dim)))
        return LoadedPool(key, demos, index, body.get("embedding_model"), embed)
    index = LexicalIndex([input_text(d.input, fields) for d in demos])
    return LoadedPool(key, demos, index)


def daemon_embedder(daemon_url: str, prompt: str, timeout_s: float) -> Embed:
    """An ``embed`` that asks the daemon (its configured embedding model)."""
    url = f"{daemon_url.rstrip('/')}/v1/prompts/{quote(prompt, safe='')}/embed"

    def embed(text: str) -> Sequence[float]:
        request = urllib.request.Request(
            url,
            data=json.dumps({"text": text}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            vector = json.loads(response.read())["vector"]
        return [float(x) for x in vector]

    return embed
