"""Candidate selection: the best on validation unless its lead is noise (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from promptd.optimization.candidates import Option, distance, paired_se, select
from promptd.optimization.examples import Example
from promptd.optimization.program import Program

TEMPLATE = "Read the message.\nMessage: {text}\nCity:"


def _demos(n: int) -> list[Example]:
    return [
        Example(f"r{i}", "v1", 0.0, {"text": f"Ship to City{i} soon."}, None, 0.0, 1, None, f"C{i}")
        for i in range(n)
    ]


def test_a_lead_within_one_standard_error_goes_to_the_smaller_change() -> None:
    """The real-model case: the same demonstrations under the original instruction and
    under a nonsense one, 0.947 against 0.955 on 26 validation examples (one example
    apart). The candidate that keeps the instruction is selected."""
    active = Program.text(TEMPLATE)
    demos = _demos(3)
    kept = active.with_demos(demos, 1000, 0.8)
    nonsense = active.with_instruction("Output: 10x more than the input, if possible.").with_demos(
        demos, 1000, 0.8
    )
    assert distance(kept, active) < distance(nonsense, active)
    base = [0.2] * 26
    kept_scores = [1.0] * 24 + [0.8, 0.8]  # 0.9846...
    nonsense_scores = [1.0] * 25 + [0.8]  # one example better
    options = [
        Option(nonsense_scores, distance(nonsense, active)),
        Option(kept_scores, distance(kept, active)),
    ]
    picked = select(options, base, tolerance_se=1.0)
    assert picked is not None
    assert (picked.index, picked.best) == (1, 0)
    assert "within 1 standard error" in picked.reason
    # With the rule off, the best mean wins.
    assert select(options, base, tolerance_se=0.0).index == 0  # type: ignore[union-attr]


def test_a_lead_beyond_the_noise_keeps_the_best() -> None:
    """A candidate better on many examples is selected although it changes more."""
    base = [0.0] * 30
    small = Option([0.5] * 30, distance=1)
    big = Option([1.0] * 20 + [0.5] * 10, distance=9)
    picked = select([small, big], base, tolerance_se=1.0)
    assert picked is not None
    assert picked.index == 1
    assert picked.reason.startswith("best validation mean")


def test_only_candidates_that_beat_the_active_version_are_eligible() -> None:
    """A close, small change that does not beat the active version is never selected;
    with none beating it, there is no selection."""
    base = [0.5] * 10
    below = Option([0.5] * 9 + [0.4], distance=0)
    above = Option([0.5] * 9 + [0.6], distance=5)
    picked = select([below, above], base, tolerance_se=2.0)
    assert picked is not None
    assert picked.index == 1
    assert select([below], base, tolerance_se=2.0) is None


def test_ties_go_to_the_closer_then_the_earlier_candidate() -> None:
    """Identical scores: the smaller change; identical changes: the earlier one."""
    base = [0.0] * 5
    same = [1.0] * 5
    assert select([Option(same, 3), Option(same, 1)], base, 1.0).index == 1  # type: ignore[union-attr]
    assert select([Option(same, 2), Option(same, 2)], base, 1.0).index == 0  # type: ignore[union-attr]


def test_paired_standard_error_matches_numpy() -> None:
    """The standard error is that of the per-example differences."""
    rng = np.random.default_rng(1)
    a, b = rng.random(40), rng.random(40)
    expected = np.std(a - b, ddof=1) / np.sqrt(40)
    assert paired_se(list(a), list(b)) == pytest.approx(expected)
    assert paired_se([1.0, 0.0], [1.0]) == float("inf")


def test_distance_counts_changed_lines_and_model_changes() -> None:
    """A replaced instruction line counts once; a changed model counts one more."""
    active = Program.text(TEMPLATE)
    assert distance(active, active) == 0
    assert distance(active.with_instruction("Reply with the city only."), active) == 1
    chat = Program.from_config({"messages": [{"role": "user", "content": "Say {text}"}]})
    assert distance(chat.with_model("openai/other", {}), chat) == 1
