"""The validation gate: metrics, the paired bootstrap, and the gate over litellm."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from promptd.daemon.optimize_config import EvaluationSettings, LLMSettings
from promptd.daemon.optimize_gate import (
    Gate,
    exact_match,
    load_metric,
    paired_bootstrap,
    render,
    rouge_l,
    token_f1,
)
from promptd.daemon.optimize_llm import Budget, LiteLLMClient, close_litellm
from promptd.storage.examples import Example
from tests.optimize_fake_llm import FakeLLM, user_text

ACTIVE = "Answer the question: {q}"
BETTER = "CONCISE. Answer the question: {q}"
EQUAL = "Please answer the question: {q}"


def _example(i: int) -> Example:
    return Example(f"r{i}", "v1", 0.0, {"q": f"item {i}"}, "x", 0.2, 1, None, f"answer {i}")


def _answer(body: dict[str, Any]) -> str:
    text = user_text(body)
    if "SCORE" in text:  # the judge: 10 when the answer is right
        return "SCORE: 10" if re.search(r"Assistant's answer:\nanswer \d+", text) else "SCORE: 1"
    found = re.search(r"item (\d+)", text)
    return f"answer {found.group(1)}" if found and "CONCISE" in text else "I am not sure"


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    """The local OpenAI-compatible server answering like a model that likes CONCISE."""
    server = await FakeLLM(_answer).start()
    yield server
    await close_litellm()
    await server.stop()


def _gate(fake: FakeLLM, metric: str = "exact_match", seed: int = 7) -> Gate:
    model = LLMSettings(model="openai/test-model", api_base=fake.api_base)
    settings = EvaluationSettings(model=model, metric=metric, bootstrap_samples=1000)
    return Gate(settings, LiteLLMClient(Budget(1000, 10.0), 0, 0.0), seed)


def test_reference_metrics() -> None:
    """Exact match, token F1 and ROUGE-L agree with hand-computed values."""
    assert exact_match(" Paris ", "paris") == 1.0
    assert token_f1("the cat sat", "the cat") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0
    assert rouge_l("a b c d", "a c d") == pytest.approx(2 * 0.75 * 1 / 1.75)


def test_paired_bootstrap_is_seeded_and_strict() -> None:
    """Better scores give a high probability, equal ones zero, the same seed the same value."""
    better = paired_bootstrap([1, 1, 0, 1, 1], [0, 1, 0, 0, 1], 2000, seed=1)
    assert better > 0.9
    assert better == paired_bootstrap([1, 1, 0, 1, 1], [0, 1, 0, 0, 1], 2000, seed=1)
    assert paired_bootstrap([0.5] * 5, [0.5] * 5, 2000, seed=1) == 0.0


def test_user_callable_metric_is_loaded_by_import_path() -> None:
    """'package.module:function' names a user metric; a bad path is a clear error."""
    metric = load_metric("tests.unit.test_optimize_gate:length_metric")
    assert metric("abcd", "ab", _example(1)) == 0.5
    with pytest.raises(ValueError, match="not a callable"):
        load_metric("tests.unit.test_optimize_gate:NOPE")


def length_metric(prediction: str, reference: str, example: Example) -> float:
    """A user metric for the test above."""
    return len(reference) / len(prediction)


def test_render_fills_placeholders_or_reports_misfit() -> None:
    """Inputs fill the template; an input without the placeholder's key does not fit."""
    assert render(ACTIVE, _example(3)) == "Answer the question: item 3"
    assert render("{missing}", _example(3)) is None


@pytest.mark.parametrize("metric", ["exact_match", "llm_judge"])
async def test_better_candidate_passes_and_equal_one_does_not(fake: FakeLLM, metric: str) -> None:
    """On held-out examples through litellm, a better candidate reaches 0.8, an equal one 0."""
    gate = _gate(fake, metric)
    examples = gate.usable([_example(i) for i in range(8)], [ACTIVE, BETTER, EQUAL])
    assert len(examples) == 8
    baseline = await gate.scores(ACTIVE, examples)
    better = gate.compare(await gate.scores(BETTER, examples), baseline)
    equal = gate.compare(await gate.scores(EQUAL, examples), baseline)
    assert better.confidence >= 0.8
    assert better.candidate_mean > better.baseline_mean
    assert equal.confidence == 0.0
    again = _gate(fake, metric).compare(await gate.scores(BETTER, examples), baseline)
    assert again.confidence == better.confidence
