"""Demonstration pools in storage: every snapshot of a prompt's pool, never changed.

A snapshot is named by its content (:func:`pool_id`: a hash of its demos and of the
embedding model its vectors come from), so saving the same content twice is one
snapshot, whoever saves it (the refresher, a knn run, a run resumed after a restart).
Each prompt's snapshots are numbered in order (``seq``). Versions pin a snapshot by id
(the registry checks it exists); :meth:`PoolStore.prune` removes old snapshots no
version pins. The SQL is portable (``?`` parameters, standard statements).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final

from promptd.demos import Demo
from promptd.storage.database import Database

_INFO: Final = "prompt, pool_id, seq, created_at, origin, size, embedding_model, dim"


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """A snapshot's identity and size (without its demos)."""

    prompt: str
    pool_id: str
    seq: int
    created_at: float
    origin: str
    size: int
    embedding_model: str | None = None
    dim: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the API."""
        return {
            "prompt": self.prompt,
            "pool": self.pool_id,
            "seq": self.seq,
            "created_at": self.created_at,
            "origin": self.origin,
            "size": self.size,
            "embedding_model": self.embedding_model,
            "dim": self.dim,
        }


@dataclass(frozen=True, slots=True)
class StoredPool:
    """A snapshot with its demos and, for embedding retrieval, their vectors."""

    info: PoolInfo
    demos: tuple[Demo, ...]
    # base64 float32 rows in the order of ``demos`` (see promptd.retrieval).
    vectors: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """What ``GET /v1/prompts/{name}/pools/{pool}`` returns (the SDK's form)."""
        out = self.info.to_dict() | {"demos": [d.to_dict() for d in self.demos]}
        if self.vectors is not None:
            out["vectors"] = self.vectors
        return out


def pool_id(demos: Sequence[Demo], embedding_model: str | None = None) -> str:
    """The content's name: ``pool-`` and 16 hex digits of a hash of the demos (in order)
    and the embedding model."""
    body = json.dumps(
        [[d.to_dict() for d in demos], embedding_model],
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return "pool-" + hashlib.sha256(body.encode()).hexdigest()[:16]


def _info(row: Sequence[Any]) -> PoolInfo:
    return PoolInfo(
        prompt=row[0],
        pool_id=row[1],
        seq=int(row[2]),
        created_at=float(row[3]),
        origin=row[4],
        size=int(row[5]),
        embedding_model=row[6],
        dim=None if row[7] is None else int(row[7]),
    )


class PoolStore:
    """The ``demo_pools`` table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def save(
        self,
        prompt: str,
        demos: Sequence[Demo],
        origin: str,
        embedding_model: str | None = None,
        vectors: str | None = None,
        dim: int | None = None,
    ) -> PoolInfo:
        """Store a snapshot (the existing one when the same content is stored already)."""
        pid = pool_id(demos, embedding_model)
        body = json.dumps([d.to_dict() for d in demos], ensure_ascii=False, separators=(",", ":"))
        async with self.db.transaction() as conn:
            async with conn.execute(
                "SELECT count(*), coalesce(max(seq), 0), "
                "(SELECT count(*) FROM demo_pools WHERE prompt = ? AND pool_id = ?) "
                "FROM demo_pools WHERE prompt = ?",
                (prompt, pid, prompt),
            ) as cur:
                row = await cur.fetchone()
            assert row is not None
            if int(row[2]) == 0:
                await conn.execute(
                    "INSERT INTO demo_pools (prompt, pool_id, seq, created_at, origin, size, "
                    "embedding_model, dim, demos, vectors) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        prompt,
                        pid,
                        int(row[1]) + 1,
                        time.time(),
                        origin,
                        len(demos),
                        embedding_model,
                        dim,
                        body,
                        vectors,
                    ),
                )
        info = await self.info(prompt, pid)
        assert info is not None
        return info

    async def info(self, prompt: str, pool: str) -> PoolInfo | None:
        """One snapshot's identity, or ``None``."""
        async with self.db.reader.execute(
            f"SELECT {_INFO} FROM demo_pools WHERE prompt = ? AND pool_id = ?", (prompt, pool)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else _info(row)

    async def get(self, prompt: str, pool: str) -> StoredPool | None:
        """One snapshot with its demos, or ``None``."""
        async with self.db.reader.execute(
            f"SELECT {_INFO}, demos, vectors FROM demo_pools WHERE prompt = ? AND pool_id = ?",
            (prompt, pool),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        demos = tuple(Demo.from_dict(d) for d in json.loads(row[8]))
        return StoredPool(_info(row), demos, row[9])

    async def list(self, prompt: str) -> list[PoolInfo]:
        """Every snapshot of ``prompt``, newest first."""
        async with self.db.reader.execute(
            f"SELECT {_INFO} FROM demo_pools WHERE prompt = ? ORDER BY seq DESC", (prompt,)
        ) as cur:
            rows = await cur.fetchall()
        return [_info(r) for r in rows]

    async def latest(self, prompt: str, embedding_model: str | None = None) -> PoolInfo | None:
        """The newest snapshot of ``prompt`` (for ``embedding_model``'s vectors, when
        given; else any)."""
        for info in await self.list(prompt):
            if embedding_model is None or info.embedding_model == embedding_model:
                return info
        return None

    async def prune(self, prompt: str, keep: Collection[str], before: float) -> int:
        """Delete ``prompt``'s snapshots created before ``before`` that are not in
        ``keep`` (the pinned ones) and not the newest; returns how many."""
        pools = await self.list(prompt)
        doomed = [p.pool_id for p in pools[1:] if p.pool_id not in keep and p.created_at < before]
        if not doomed:
            return 0
        async with self.db.transaction() as conn:
            for pid in doomed:
                await conn.execute(
                    "DELETE FROM demo_pools WHERE prompt = ? AND pool_id = ?", (prompt, pid)
                )
        return len(doomed)
