"""Nearest demonstrations: the BM25 distance, the cut-off, exclusions, ties, vectors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from promptd.retrieval import LexicalIndex, VectorIndex, decode_vectors, encode_vectors, top

TEXTS = [
    "my package to paris has not arrived",
    "the printer on floor three shows a paper jam",
    "I was charged twice for my march invoice",
    "my parcel to berlin is late",
    "the printer on floor five is broken",
]


def test_an_identical_input_is_at_distance_zero_and_an_unrelated_one_is_cut_off() -> None:
    """The demo equal to the input is first at distance 0; with no word in common the
    distance is 1, so any cut-off below 1 leaves nothing."""
    index = LexicalIndex(TEXTS)
    hits = index.nearest(TEXTS[1], 3, None)
    assert hits[0] == (1, pytest.approx(0.0, abs=1e-6))
    assert hits[1][0] == 4  # the other printer message
    assert all(0.0 <= d <= 1.0 for _, d in hits)
    assert [d for _, d in hits] == sorted(d for _, d in hits)
    assert index.nearest("quantum chromodynamics lecture", 3, 0.99) == []
    far = index.nearest("quantum chromodynamics lecture", 2, None)
    assert [d for _, d in far] == [1.0, 1.0]


def test_the_cut_off_keeps_only_close_demos() -> None:
    """``max_distance`` drops the demos farther than it, closest first."""
    index = LexicalIndex(TEXTS)
    query = "printer jam on floor three"
    every = index.nearest(query, 5, None)
    cut = every[1][1]
    assert index.nearest(query, 5, cut) == [h for h in every if h[1] <= cut]


def test_banned_entries_are_never_returned() -> None:
    """A banned position (the example itself, another split) is skipped, not counted."""
    index = LexicalIndex(TEXTS)
    hits = index.nearest(TEXTS[1], 2, None, banned={1})
    assert hits[0][0] == 4
    assert 1 not in [i for i, _ in hits]
    assert len(hits) == 2


def test_ties_go_to_the_lower_index() -> None:
    """Equal scores are ordered by position, so the app and the optimizer agree."""
    assert top(np.array([1.0, 3.0, 3.0, 0.5, 3.0]), 2, ()) == [1, 2]
    assert top(np.array([1.0, 3.0, 3.0, 0.5, 3.0]), 2, {1}) == [2, 4]
    assert top(np.array([1.0, 2.0]), 5, ()) == [1, 0]
    assert top(np.array([1.0]), 1, {0}) == []


def test_an_empty_pool_finds_nothing() -> None:
    """No demos: no hits, no error."""
    assert LexicalIndex([]).nearest("anything", 3, None) == []


def test_vector_distance_is_cosine_and_vectors_round_trip() -> None:
    """Cosine distance 0 for the same direction, 2 for the opposite; the base64 wire form
    gives the same matrix back, and a wrong size is refused."""
    vectors = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]], dtype=np.float32)
    index = VectorIndex(decode_vectors(encode_vectors(vectors), 2))
    hits = index.nearest([2.0, 0.0], 3, None)
    assert [i for i, _ in hits] == [0, 1, 2]
    assert [d for _, d in hits] == pytest.approx([0.0, 1.0, 2.0], abs=1e-6)
    assert index.nearest([2.0, 0.0], 3, 1.5) == hits[:2]
    with pytest.raises(ValueError, match="dimensions"):
        index.nearest([1.0, 0.0, 0.0], 1, None)
    with pytest.raises(ValueError, match="rows of 4"):
        decode_vectors(encode_vectors(vectors), 4)


def test_importing_promptd_loads_neither_bm25s_nor_numpy() -> None:
    """Apps that never use a pool pay nothing for retrieval at import."""
    code = (
        "import sys, promptd, promptd.demos, promptd.sdk.pools\n"
        "print(sorted(m for m in ('bm25s', 'numpy', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
