"""The daemon's demonstration pools: built on demand, refreshed on a schedule, pruned.

:class:`PoolBuilder` makes a prompt's pool as of now: the example store's examples
(the optimizer's, the same a run reads), split as every run splits them, the train
split's trusted ones (:func:`~promptd.optimization.pools.trusted_demos`), stored as a
snapshot (with their vectors when it is for the embedding retriever).

:class:`PoolRefresher` rebuilds, every ``knn.pool_refresh_minutes``, the pool of each
prompt whose active version takes its demos from one. The new snapshot is stored (a new
pool version) when its content changed; the served version keeps its pinned snapshot.
When the new snapshot holds at least ``knn.refresh_min_new`` demos the pinned one lacks,
it asks for a ``knn`` run (trigger ``pool_refresh``, under the usual policy): promoting
a refreshed pool is a new version, gated and rolled out like any other. Old snapshots
that no version pins are deleted after ``knn.pool_retention_days``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog

from promptd.demos import Demo, DemoSpec, fields_of, final_template, input_text
from promptd.monitoring.triggers import OptimizationTrigger
from promptd.optimization.config import OptimizationSettings
from promptd.optimization.embeddings import BATCH, EmbeddingClient, litellm_embed
from promptd.optimization.examples import ExampleStore, split
from promptd.optimization.pools import trusted_demos
from promptd.replacement.registry import Registry
from promptd.retrieval import encode_vectors
from promptd.storage.pools import PoolInfo, PoolStore

log = structlog.get_logger("promptd.optimizer")

#: Submits a run (the optimizer's ``submit``): the trigger and the strategies to use.
Submit = Callable[[OptimizationTrigger, Sequence[str]], Awaitable[object]]


class PoolBuilder:
    """A prompt's pool as of now (see the module docstring)."""

    def __init__(
        self,
        examples: ExampleStore,
        store: PoolStore,
        settings: OptimizationSettings,
        embed: EmbeddingClient = litellm_embed,
    ) -> None:
        self.examples = examples
        self.store = store
        self.settings = settings
        self.embed = embed

    async def demos(self, prompt: str) -> list[Demo]:
        """The trusted demos of ``prompt``'s train split, as a run started now sees them."""
        snapshot = await self.examples.snapshot(time.time())
        pool = await self.examples.examples(prompt, snapshot)
        limits = self.settings.splits
        train = split(pool, limits.salt, limits.train, limits.validation).train
        return trusted_demos(
            train, self.settings.evaluation.reference_min_score, self.settings.knn.max_pool
        )

    async def build(
        self, prompt: str, fields: tuple[str, ...], embedded: bool, origin: str
    ) -> tuple[PoolInfo, list[Demo]]:
        """Store the current pool of ``prompt`` (a no-op when it is stored already)."""
        demos = await self.demos(prompt)
        if not embedded:
            return await self.store.save(prompt, demos, origin), demos
        model = self.settings.knn.embedding
        if model is None:
            raise ValueError("no embedding model is configured ([optimization.knn.embedding])")
        texts = [input_text(d.input, fields) for d in demos]
        vectors: list[list[float]] = []
        for start in range(0, len(texts), BATCH):
            vectors += (await self.embed(model, texts[start : start + BATCH])).vectors
        info = await self.store.save(
            prompt,
            demos,
            origin,
            embedding_model=model.model,
            vectors=encode_vectors(vectors) if vectors else "",
            dim=len(vectors[0]) if vectors else 0,
        )
        return info, demos


class PoolRefresher:
    """The periodic refresh (see the module docstring)."""

    def __init__(self, builder: PoolBuilder, registry: Registry, submit: Submit) -> None:
        self.builder = builder
        self.registry = registry
        self.submit = submit
        self.knn = builder.settings.knn

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every ``pool_refresh_minutes`` until ``stop``; a failure is logged."""
        interval = self.knn.pool_refresh_minutes * 60.0
        while not stop.is_set():
            try:
                await self.refresh_all()
            except Exception:
                log.exception("demo_pool_refresh_failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()

    async def refresh_all(self) -> None:
        """One pass over every prompt whose active version takes demos from a pool."""
        for prompt in await self.registry.list_prompts():
            active = await self.registry.active(prompt.name)
            spec = DemoSpec.of(None if active is None else active.config)
            if spec is None or active is None or active.config is None:
                continue
            await self.refresh(prompt.name, spec, fields_of(final_template(active.config)))

    async def refresh(self, prompt: str, spec: DemoSpec, fields: tuple[str, ...]) -> PoolInfo:
        """Store the current snapshot of ``prompt``; ask for a run when it has enough
        demos the pinned snapshot lacks; prune unpinned old snapshots."""
        store = self.builder.store
        info, demos = await self.builder.build(
            prompt, fields, spec.retriever == "embedding", "refresh"
        )
        pinned = await store.get(prompt, spec.pool)
        known = {d.id for d in pinned.demos} if pinned is not None else set()
        new = sum(1 for d in demos if d.id not in known)
        log.info(
            "demo_pool_refreshed",
            prompt=prompt,
            pool=info.pool_id,
            seq=info.seq,
            size=info.size,
            pinned=spec.pool,
            new_demos=new,
        )
        threshold = self.knn.refresh_min_new
        if info.pool_id != spec.pool and threshold > 0 and new >= threshold:
            reason = f"{new} trusted examples are not in the pinned pool {spec.pool}"
            trigger = OptimizationTrigger(
                prompt, "pool_refresh", time.time(), reason, {"pool": info.pool_id}
            )
            await self.submit(trigger, ["knn"])
        await self._prune(prompt)
        return info

    async def _prune(self, prompt: str) -> None:
        pinned = set()
        for version in await self.registry.versions(prompt):
            spec = DemoSpec.of(version.config)
            if spec is not None:
                pinned.add(spec.pool)
        before = time.time() - self.knn.pool_retention_days * 86_400
        deleted = await self.builder.store.prune(prompt, pinned, before)
        if deleted:
            log.info("demo_pools_pruned", prompt=prompt, deleted=deleted)
