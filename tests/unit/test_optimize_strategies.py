"""Strategies: placeholders survive, bad proposals are discarded, budgets and 429s are handled."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from promptd.daemon.optimize_config import LLMSettings, OptimizationSettings
from promptd.daemon.optimize_llm import Budget, LiteLLMClient, close_litellm
from promptd.daemon.optimize_strategies import (
    DEMO_HEADING,
    FewShot,
    Gepa,
    Instruction,
    StrategyContext,
    parse_proposal,
)
from promptd.replacement.registry import placeholders
from promptd.storage.examples import Example
from tests.optimize_fake_llm import RATE_LIMITED, FakeLLM

TEMPLATE = "Summarize {document} for {audience}."


def _ex(i: int, score: float, inp: str, out: str = "ok", **kw: Any) -> Example:
    fields: dict[str, Any] = {"comments": None, "correction": None, **kw}
    return Example(f"r{i}", "v1", 0.0, {"document": inp}, out, score, 1, **fields)


def _ctx(settings: OptimizationSettings, llm: LiteLLMClient | None = None) -> StrategyContext:
    worst = [_ex(9, 0.1, "long text", "too long", comments="too verbose", correction="short")]
    best = [
        _ex(1, 1.0, "cats purr {loudly}", "Cats purr."),
        _ex(2, 0.9, "Cats purr {loudly}", "dup input"),
        _ex(3, 0.95, "stock markets fell sharply", "Markets fell."),
        _ex(4, 0.9, "rain tomorrow in paris", "Rain in Paris."),
    ]
    return StrategyContext(
        prompt="p",
        run_id="run-1",
        template=TEMPLATE,
        existing_templates={TEMPLATE},
        best=best,
        worst=worst,
        settings=settings,
        llm=llm,
    )


def _settings(fake: FakeLLM | None = None, **over: Any) -> OptimizationSettings:
    proposer = LLMSettings(model="openai/test-model", api_base=fake.api_base) if fake else None
    return OptimizationSettings(proposer=proposer, retry_backoff_s=0.01, **over)


@pytest.fixture
async def fake_llm() -> AsyncIterator[Callable[..., Any]]:
    """Factory of local OpenAI-compatible servers, stopped afterwards."""
    servers: list[FakeLLM] = []

    async def start(responder: Any) -> FakeLLM:
        server = await FakeLLM(responder).start()
        servers.append(server)
        return server

    yield start
    await close_litellm()
    for server in servers:
        await server.stop()


async def test_fewshot_demos_keep_placeholders_and_are_deduplicated() -> None:
    """Demonstrations are escaped, deduplicated, capped, and add no placeholder."""
    result = await FewShot().propose(_ctx(_settings(fewshot={"max_demos": 3})))
    assert len(result.candidates) == 2
    full = result.candidates[0].template
    assert full.startswith(TEMPLATE)
    assert DEMO_HEADING in full
    assert placeholders(full) == ["audience", "document"]
    assert "{{loudly}}" in full
    assert "dup input" not in full
    assert full.count("Input:") == 3
    assert full.format(document="D", audience="A").count("{loudly}") == 1


async def test_fewshot_without_good_examples_explains() -> None:
    """No well-rated examples: no candidate, and a note saying why."""
    ctx = _ctx(_settings())
    ctx.best = []
    result = await FewShot().propose(ctx)
    assert result.candidates == []
    assert result.note


def _proposal(template: str) -> str:
    return f"<template>{template}</template><rationale>shorter</rationale>"


async def test_instruction_keeps_good_proposals_and_discards_bad(fake_llm: Any) -> None:
    """Lost/added placeholders, malformed answers, duplicates and overlong ones are dropped."""
    answers = iter(
        [
            _proposal("Summarize {document} briefly for {audience}."),
            _proposal("Summarize {document}."),  # lost {audience}
            _proposal("Summarize {document} for {audience} in {language}."),  # added
            "Sure! Here is a better prompt: Summarize {document}",  # malformed
            _proposal(TEMPLATE),  # duplicate of the active version
            _proposal("Summarize {document} for {audience}." + " very" * 100),  # too long
        ]
    )
    fake = await fake_llm(lambda body: next(answers))
    settings = _settings(fake, instruction={"n_candidates": 6}, max_template_chars=200)
    client = LiteLLMClient(Budget(100, 10.0), 0, 0.0)
    result = await Instruction().propose(_ctx(settings, client))
    assert [c.template for c in result.candidates] == [
        "Summarize {document} briefly for {audience}."
    ]
    assert result.candidates[0].rationale == "shorter"
    assert dict(result.discarded) == {
        "placeholders_changed": 2,
        "malformed": 1,
        "duplicate": 1,
        "too_long": 1,
    }
    sent = fake.requests[0]["messages"]
    assert "too verbose" in sent[1]["content"]
    assert "Correct answer: short" in sent[1]["content"]
    assert "{document}" in sent[0]["content"]


async def test_instruction_depth_feeds_previous_round(fake_llm: Any) -> None:
    """With depth 2 the second round sees the first round's proposals."""
    counter = iter(range(100))
    fake = await fake_llm(lambda body: _proposal(f"V{next(counter)}: {{document}} {{audience}}"))
    settings = _settings(fake, instruction={"n_candidates": 2, "depth": 2})
    result = await Instruction().propose(_ctx(settings, LiteLLMClient(Budget(100, 1.0), 0, 0)))
    assert len(result.candidates) == 4
    assert "Earlier proposals" in fake.requests[-1]["messages"][1]["content"]


async def test_rate_limited_answers_are_retried(fake_llm: Any) -> None:
    """A 429 is retried with backoff and the proposal still arrives."""
    calls = iter([RATE_LIMITED, RATE_LIMITED, _proposal("New {document} {audience}")])
    fake = await fake_llm(lambda body: next(calls))
    client = LiteLLMClient(Budget(100, 10.0), max_retries=3, backoff_s=0.01)
    settings = _settings(fake, instruction={"n_candidates": 1})
    result = await Instruction().propose(_ctx(settings, client))
    assert [c.template for c in result.candidates] == ["New {document} {audience}"]
    assert client.retries == 2
    assert len(fake.requests) == 3


async def test_rate_limits_beyond_retries_are_counted_not_raised(fake_llm: Any) -> None:
    """When retries run out the proposal counts as an LLM error; the strategy returns."""
    fake = await fake_llm(lambda body: RATE_LIMITED)
    client = LiteLLMClient(Budget(100, 10.0), max_retries=1, backoff_s=0.01)
    result = await Instruction().propose(
        _ctx(_settings(fake, instruction={"n_candidates": 1}), client)
    )
    assert result.candidates == []
    assert result.discarded["llm_error"] == 1


@pytest.mark.parametrize(
    ("budget", "expected_calls"),
    [(Budget(max_calls=2, max_cost_usd=100.0), 2), (Budget(max_calls=100, max_cost_usd=0.001), 1)],
)
async def test_budget_stops_generation_cleanly(
    fake_llm: Any, budget: Budget, expected_calls: int
) -> None:
    """Calls and cost budgets stop proposals early; what was produced is kept."""
    counter = iter(range(100))
    fake = await fake_llm(lambda body: _proposal(f"V{next(counter)} {{document}} {{audience}}"))
    # 100 + 50 tokens at these prices cost 0.0015 per call: the second call is over budget.
    llm = LLMSettings(
        model="openai/test-model",
        api_base=fake.api_base,
        input_cost_per_token=0.00001,
        output_cost_per_token=0.00001,
    )
    settings = OptimizationSettings(proposer=llm, instruction={"n_candidates": 1, "depth": 3})
    result = await Instruction().propose(_ctx(settings, LiteLLMClient(budget, 0, 0.0)))
    assert result.stopped is not None
    assert len(fake.requests) == expected_calls
    assert len(result.candidates) == expected_calls
    assert budget.exhausted is not None


async def test_gepa_absent_gives_a_clear_note() -> None:
    """Without the gepa package the strategy explains how to get it instead of crashing."""
    if Gepa.available():
        pytest.skip("gepa is installed here")
    result = await Gepa().propose(_ctx(_settings()))
    assert result.candidates == []
    assert "pip install gepa" in (result.note or "")


def test_parse_proposal() -> None:
    """Tags are required; the rationale is optional."""
    assert parse_proposal("x <template> T {a} </template>") == ("T {a}", "instruction rewrite")
    assert parse_proposal("no tags") is None
