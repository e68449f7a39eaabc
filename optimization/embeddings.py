"""Embeddings through litellm, for the embedding retriever of dynamic demonstrations.

The daemon embeds a pool's demos when it stores the pool, a run embeds the inputs it
retrieves for, and ``POST /v1/prompts/{name}/embed`` embeds an app's input when the app
leaves that to the daemon. Within a run every vector goes through the run's budget (one
call per batch) and the persistent call cache (one entry per text), like every answer,
so a resumed run pays for none again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from promptd.optimization.config import LLMSettings
from promptd.optimization.llm import CachedLLM, Completion, LLMError, call_key, load_litellm

#: Texts per embedding request.
BATCH: Final = 64
#: Longest text embedded (characters); longer inputs are cut.
MAX_TEXT_CHARS: Final = 8_000


@dataclass(frozen=True, slots=True)
class Embedded:
    """Vectors of a batch of texts, with what they cost."""

    vectors: list[list[float]]
    tokens: int = 0
    cost_usd: float = 0.0


class EmbeddingClient(Protocol):
    """Anything that embeds texts (litellm in production)."""

    async def __call__(self, llm: LLMSettings, texts: list[str]) -> Embedded:
        """One vector per text, in order."""
        ...


async def litellm_embed(llm: LLMSettings, texts: list[str]) -> Embedded:
    """``litellm.aembedding`` with the model's settings (``LLMError`` when it fails)."""
    litellm = load_litellm()
    try:
        response = await litellm.aembedding(
            model=llm.model,
            input=texts,
            api_base=llm.api_base,
            api_key=llm.api_key(),
            timeout=llm.request_timeout_s,
            **llm.extra,
        )
    except Exception as exc:
        raise LLMError(llm.model, f"{type(exc).__name__}: {exc}") from exc
    rows = sorted(response.data, key=lambda d: _field(d, "index"))
    vectors = [list(map(float, _field(d, "embedding"))) for d in rows]
    if len(vectors) != len(texts):
        raise LLMError(llm.model, f"{len(vectors)} embeddings for {len(texts)} texts")
    usage = getattr(response, "usage", None)
    tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
    return Embedded(vectors, tokens, tokens * llm.input_cost_per_token)


def _field(item: Any, name: str) -> Any:
    return item[name] if isinstance(item, dict) else getattr(item, name)


class RunEmbeddings:
    """Vectors of texts within a run: cache first, then budget, then the model."""

    def __init__(
        self, llm: CachedLLM, settings: LLMSettings, client: EmbeddingClient = litellm_embed
    ) -> None:
        self.llm = llm
        self.settings = settings
        self.client = client

    def _key(self, text: str) -> str:
        return call_key(self.settings, [{"role": "embedding", "content": text}])

    async def vectors(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order (paid only for texts never embedded before)."""
        clipped = [t[:MAX_TEXT_CHARS] for t in texts]
        found: dict[str, list[float]] = {}
        for text in dict.fromkeys(clipped):
            stored = await self.llm.store.get_call(self._key(text))
            if stored is not None:
                found[text] = json.loads(stored.text)
        missing = [t for t in dict.fromkeys(clipped) if t not in found]
        for start in range(0, len(missing), BATCH):
            batch = missing[start : start + BATCH]
            found.update(zip(batch, await self._paid(batch), strict=True))
        return [found[t] for t in clipped]

    async def _paid(self, batch: list[str]) -> list[list[float]]:
        budget, store = self.llm.budget, self.llm.store
        budget.check()
        budget.spend(1, 0, 0.0)
        await store.note_spend(self.llm.run_id, budget.spent())
        embedded = await self.client(self.settings, batch)
        budget.spend(0, embedded.tokens, embedded.cost_usd)
        for i, (text, vector) in enumerate(zip(batch, embedded.vectors, strict=True)):
            completion = Completion(json.dumps(vector), embedded.tokens if i == 0 else 0)
            await store.put_call(
                self._key(text),
                self.llm.run_id,
                "embedding",
                self.settings.model,
                [{"role": "embedding", "content": text}],
                completion,
                budget.spent() if i == 0 else None,
            )
        return embedded.vectors
