"""Nearest demonstrations: a lexical index (BM25, with ``bm25s``) and a vector index.

Both answer ``nearest(query, k, max_distance, banned)``: the ``k`` closest entries as
``(index, distance)`` pairs, closest first, ties by index (so the app and the optimizer,
given the same pool and input, pick the same demos), none farther than
``max_distance``, none in ``banned``.

Distances:

* **lexical**: ``1 - BM25(input, demo) / BM25(input, input)``, clipped to ``[0, 1]``.
  The denominator is the score a demo identical to the input would get in this pool
  (same idf, same length normalisation), so 0 means "covers the input as well as the
  input itself", 1 "no word in common"; words the pool has never seen count in the
  denominator only. Tokens: ``bm25s``'s tokenizer (lower case, words of two or more
  characters, English stop words removed), BM25 with ``k1 = 1.5``, ``b = 0.75``;
* **embedding**: cosine distance ``1 - cos(input, demo)`` of the vectors (the pool's
  are computed by the daemon, the input's by the app or the daemon), in ``[0, 2]``.

numpy and bm25s are imported when an index is built (in the SDK's sender thread), never
by ``import promptd``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

#: BM25 parameters (bm25s's defaults, Lucene's variant).
K1 = 1.5
B = 0.75

Hit = tuple[int, float]


class Index(Protocol):
    """What a pool's demos are searched with."""

    def __len__(self) -> int:
        """Entries indexed."""
        ...

    def nearest(
        self, query: Any, k: int, max_distance: float | None, banned: Collection[int] = ()
    ) -> list[Hit]:
        """The ``k`` nearest entries (see the module docstring)."""
        ...


def top(scores: npt.NDArray[Any], k: int, banned: Collection[int]) -> list[int]:
    """Indices of the ``k`` highest ``scores``, highest first, ties by index, ``banned``
    left out. Partial selection, then an exact sort of the (few) candidates."""
    import numpy as np

    n = len(scores)
    if banned:
        scores = scores.copy()
        scores[list(banned)] = -np.inf
    take = min(k, n)
    if take <= 0:
        return []
    kth = np.partition(scores, n - take)[n - take]
    idx = np.flatnonzero(scores >= kth)
    order = np.lexsort((idx, -scores[idx]))
    return [int(i) for i in idx[order][:take] if scores[i] != -np.inf]


def within(order: list[int], distances: list[float], max_distance: float | None) -> list[Hit]:
    """The hits of ``order`` (closest first) up to the first one beyond ``max_distance``."""
    hits = []
    for i, distance in zip(order, distances, strict=True):
        if max_distance is not None and distance > max_distance:
            break
        hits.append((i, distance))
    return hits


class LexicalIndex:
    """BM25 over the demos' input texts (see the module docstring)."""

    def __init__(self, texts: Sequence[str]) -> None:
        import bm25s
        import numpy as np
        from bm25s.tokenization import Tokenizer

        self._np = np
        self.size = n = len(texts)
        if not n:  # bm25s cannot index nothing; an empty pool finds nothing
            return
        self._tokenizer = tokenizer = Tokenizer(stopwords="en")
        ids = tokenizer.tokenize(list(texts), update_vocab=True, show_progress=False)
        self._bm25 = bm25s.BM25(k1=K1, b=B, method="lucene")
        self._bm25.index((ids, tokenizer.get_vocab_dict()), show_progress=False)
        self._words = tokenizer.word_to_id
        self._stop = frozenset(tokenizer.stopwords or ())
        self._split = tokenizer.splitter
        self._avgdl = float(np.mean([len(d) for d in ids]))
        indptr = self._bm25.scores["indptr"]
        df = np.diff(indptr).astype(np.float64)
        self._idf = np.log1p((n - df + 0.5) / (df + 0.5))
        self._idf_unseen = math.log1p((n + 0.5) / 0.5)

    def __len__(self) -> int:
        return self.size

    def _terms(self, text: str) -> tuple[list[int], float]:
        """The query's known term ids (each once) and its self-score (the denominator)."""
        counts: dict[str, int] = {}
        length = 0
        for word in self._split(text.lower()):
            if word in self._stop:
                continue
            counts[word] = counts.get(word, 0) + 1
            length += 1
        norm = K1 * (1.0 - B + B * length / self._avgdl)
        known: list[int] = []
        best = 0.0
        for word, tf in counts.items():
            wid = self._words.get(word)
            idf = self._idf_unseen if wid is None else float(self._idf[wid])
            best += idf * tf / (tf + norm)
            if wid is not None:
                known.append(wid)
        return known, best

    def nearest(
        self, query: Any, k: int, max_distance: float | None, banned: Collection[int] = ()
    ) -> list[Hit]:
        """The nearest demos to the text ``query``."""
        np = self._np
        if not self.size:
            return []
        known, best = self._terms(str(query))
        if known:
            scores = self._bm25.get_scores_from_ids(known).astype(np.float64)
        else:
            scores = np.zeros(self.size)
        order = top(scores, k, banned)
        distances = [1.0 - min(float(scores[i]) / best, 1.0) if best > 0 else 1.0 for i in order]
        return within(order, distances, max_distance)


class VectorIndex:
    """Cosine similarity over the demos' vectors (rows normalised once)."""

    def __init__(self, vectors: npt.ArrayLike) -> None:
        import numpy as np

        self._np = np
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim != 2:
            raise ValueError(f"vectors must be a matrix, got shape {matrix.shape}")
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        self._matrix = matrix / np.where(norms == 0, 1.0, norms)
        self.size = int(matrix.shape[0])
        self.dim = int(matrix.shape[1])

    def __len__(self) -> int:
        return self.size

    def nearest(
        self, query: Any, k: int, max_distance: float | None, banned: Collection[int] = ()
    ) -> list[Hit]:
        """The nearest demos to the vector ``query``."""
        np = self._np
        if not self.size:
            return []
        vector = np.asarray(query, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.dim:
            raise ValueError(f"the input's vector has {vector.shape[0]} dimensions, not {self.dim}")
        norm = float(np.linalg.norm(vector))
        sims = (self._matrix @ (vector / (norm or 1.0))).astype(np.float64)
        order = top(sims, k, banned)
        return within(order, [1.0 - float(sims[i]) for i in order], max_distance)


def encode_vectors(vectors: npt.ArrayLike) -> str:
    """Vectors as base64 of little-endian float32 rows (the pool's wire form)."""
    import base64

    import numpy as np

    return base64.b64encode(np.asarray(vectors, dtype="<f4").tobytes()).decode()


def decode_vectors(text: str, dim: int) -> np.ndarray[Any, Any]:
    """Inverse of :func:`encode_vectors` (``ValueError`` when the size does not fit)."""
    import base64

    import numpy as np

    raw = np.frombuffer(base64.b64decode(text), dtype="<f4")
    if dim <= 0 or raw.size % dim:
        raise ValueError(f"{raw.size} numbers do not make rows of {dim}")
    return raw.reshape(-1, dim).astype(np.float32)
