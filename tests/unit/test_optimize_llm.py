"""The call cache, the budget and the evaluator, through litellm over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from promptd.optimization.config import EvaluationSettings, LLMSettings
from promptd.optimization.evaluator import Evaluator
from promptd.optimization.examples import Example
from promptd.optimization.llm import (
    Budget,
    BudgetExceeded,
    CachedLLM,
    LiteLLMClient,
    close_litellm,
)
from promptd.optimization.program import Program
from promptd.optimization.store import OptimizationStore
from promptd.storage.database import Database
from tests.optimize_fake_llm import RATE_LIMITED, FakeLLM, user_text


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated database file, closed afterwards."""
    database = await Database.open(tmp_path / "t.db")
    yield database
    await database.close()


@pytest.fixture
async def any_db(store_target: Path | str) -> AsyncIterator[Database]:
    """A migrated database on each backend (the tests of the call cache's SQL)."""
    database = await Database.open(store_target)
    yield database
    await database.close()


@pytest.fixture
async def fake_llm() -> AsyncIterator[Callable[..., Any]]:
    """Factory of local OpenAI-compatible servers, stopped afterwards."""
    servers: list[FakeLLM] = []

    async def start(responder: Any, **kw: Any) -> FakeLLM:
        server = await FakeLLM(responder, **kw).start()
        servers.append(server)
        return server

    yield start
    await close_litellm()
    for server in servers:
        await server.stop()


def _model(fake: FakeLLM, **kw: Any) -> LLMSettings:
    return LLMSettings(model="openai/test-model", api_base=fake.api_base, **kw)


def _llm(db: Database, budget: Budget, run: str = "run-1") -> CachedLLM:
    return CachedLLM(LiteLLMClient(2, 0.01), OptimizationStore(db), budget, run, 4)


def _msg(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_answers_are_paid_once_across_runs_and_restarts(
    any_db: Database, fake_llm: Callable[..., Any]
) -> None:
    """A stored answer is reused by the same run, another run and a new process."""
    fake = await fake_llm(lambda body: f"echo {user_text(body)}")
    model = _model(fake)
    first = _llm(any_db, Budget(10, 1.0))
    assert await first.complete(model, _msg("a"), "evaluation") == "echo a"
    assert await first.complete(model, _msg("a"), "evaluation") == "echo a"
    other_run = _llm(any_db, Budget(10, 1.0), run="run-2")
    assert await other_run.complete(model, _msg("a"), "evaluation") == "echo a"
    assert len(fake.requests) == 1
    assert (first.misses, first.hits, other_run.hits) == (1, 1, 1)
    spent = await OptimizationStore(any_db).spend("run-1")
    assert (spent.calls, spent.tokens) == (1, 150)
    assert (await OptimizationStore(any_db).spend("run-2")).calls == 0


async def test_nonce_and_parameters_make_distinct_calls(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """Proposals with different nonces, or another temperature, are new calls."""
    fake = await fake_llm(lambda body: "x")
    llm = _llm(db, Budget(10, 1.0))
    await llm.complete(_model(fake), _msg("p"), "proposer", nonce="run-1:0")
    await llm.complete(_model(fake), _msg("p"), "proposer", nonce="run-1:1")
    await llm.complete(_model(fake, temperature=0.1), _msg("p"), "proposer", nonce="run-1:1")
    await llm.complete(_model(fake), _msg("p"), "proposer", nonce="run-1:0")
    assert len(fake.requests) == 3


async def test_concurrent_identical_calls_share_one_request(
    any_db: Database, fake_llm: Callable[..., Any]
) -> None:
    """Two strategies asking the same thing at once cause one request."""

    async def slow(body: dict[str, Any]) -> str:
        await asyncio.sleep(0.2)
        return "done"

    fake = await fake_llm(slow)
    llm = _llm(any_db, Budget(10, 1.0))
    answers = await asyncio.gather(*(llm.complete(_model(fake), _msg("q"), "e") for _ in range(5)))
    assert answers == ["done"] * 5
    assert len(fake.requests) == 1


async def test_call_budget_is_exact_and_retries_count(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """max_calls=4 with one 429 retry: three distinct answers, then BudgetExceeded."""
    seen: list[str] = []

    def limited_once(body: dict[str, Any]) -> Any:
        seen.append(user_text(body))
        return RATE_LIMITED if len(seen) == 1 else "ok"

    fake = await fake_llm(limited_once)
    budget = Budget(4, 100.0)
    llm = _llm(db, budget)
    for text in ("a", "b", "c"):
        await llm.complete(_model(fake), _msg(text), "e")
    with pytest.raises(BudgetExceeded) as err:
        await llm.complete(_model(fake), _msg("d"), "e")
    assert err.value.what == "llm_calls"
    assert budget.calls == 4
    assert len(fake.requests) == 4


async def test_token_cost_and_time_budgets(db: Database, fake_llm: Callable[..., Any]) -> None:
    """Tokens, dollars (configured prices) and the deadline each stop the next call."""
    fake = await fake_llm(lambda body: "ok", prompt_tokens=100, completion_tokens=50)
    tokens = _llm(db, Budget(100, 100.0, max_tokens=200))
    await tokens.complete(_model(fake), _msg("1"), "e")
    await tokens.complete(_model(fake), _msg("2"), "e")
    with pytest.raises(BudgetExceeded, match="tokens"):
        await tokens.complete(_model(fake), _msg("3"), "e")
    priced = _model(fake, input_cost_per_token=0.001, output_cost_per_token=0.002)
    cost = _llm(db, Budget(100, 0.15), run="run-c")
    await cost.complete(priced, _msg("c1"), "e")
    with pytest.raises(BudgetExceeded, match="cost_usd"):
        await cost.complete(priced, _msg("c2"), "e")
    assert cost.budget.cost_usd == pytest.approx(0.2)
    late = _llm(db, Budget(100, 100.0, deadline=time.monotonic() - 1), run="run-t")
    with pytest.raises(BudgetExceeded, match="time"):
        await late.complete(_model(fake), _msg("t"), "e")


async def test_reserve_holds_budget_back_until_released(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """With half the calls held back the search stops at half; release frees the rest."""
    fake = await fake_llm(lambda body: "ok")
    budget = Budget(4, 100.0)
    budget.hold_back(0.5, 0.0)
    llm = _llm(db, budget)
    await llm.complete(_model(fake), _msg("1"), "e")
    await llm.complete(_model(fake), _msg("2"), "e")
    with pytest.raises(BudgetExceeded):
        await llm.complete(_model(fake), _msg("3"), "e")
    budget.release()
    await llm.complete(_model(fake), _msg("3"), "e")
    assert len(fake.requests) == 3


def _example(rid: str, text: str, reference: str | None) -> Example:
    return Example(rid, "v1", 0.0, {"text": text}, "old", 0.1, 1, None, reference)


async def test_evaluator_renders_calls_and_scores(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """Each usable example is rendered, answered and scored against its reference; an
    example without reference is not usable for a reference metric."""
    fake = await fake_llm(lambda body: "Paris" if "Paris" in user_text(body) else "no idea")
    settings = EvaluationSettings(model=_model(fake, temperature=0.0), metric="exact_match")
    evaluator = Evaluator(_llm(db, Budget(10, 1.0)), settings)
    ok, wrong = _example("a", "in Paris", "Paris"), _example("b", "in Rome", "Rome")
    assert not evaluator.usable(_example("c", "x", None), Program.text("City of {text}"))
    assert not evaluator.usable(ok, Program.text("City of {missing}"))
    assert await evaluator.scores(Program.text("City of {text}"), [ok, wrong]) == [1.0, 0.0]
    # The examples are evaluated concurrently: the requests may arrive in any order.
    sent = sorted(r["messages"][0]["content"] for r in fake.requests)
    assert sent == ["City of in Paris", "City of in Rome"]
    assert [len(r["messages"]) for r in fake.requests] == [1, 1]
    assert {r["temperature"] for r in fake.requests} == {0.0}


async def test_evaluator_scores_a_refused_request_zero(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """A request the provider refuses (400) scores 0 for that template, with the error."""
    refused = (400, {"error": {"message": "context too long", "type": "invalid_request_error"}})
    fake = await fake_llm(lambda body: refused if "long" in user_text(body) else "Paris")
    evaluator = Evaluator(
        _llm(db, Budget(10, 1.0)), EvaluationSettings(model=_model(fake), metric="exact_match")
    )
    scored = await evaluator.run(Program.text("{text}"), [_example("a", "long", "Paris")])
    assert scored[0].score == 0.0
    assert scored[0].error is not None
    assert "context too long" in scored[0].error


async def test_llm_judge_scores_with_the_judge_model(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """llm_judge asks the judge and reads SCORE: n as n/10; no reference needed."""

    def answer(body: dict[str, Any]) -> str:
        text = user_text(body)
        return "SCORE: 7" if "You grade" in text else "an answer"

    fake = await fake_llm(answer)
    settings = EvaluationSettings(model=_model(fake), metric="llm_judge")
    evaluator = Evaluator(_llm(db, Budget(10, 1.0)), settings)
    example = _example("a", "hi", None)
    assert evaluator.usable(example, Program.text("{text}"))
    assert await evaluator.scores(Program.text("{text}"), [example]) == [pytest.approx(0.7)]
    assert len(fake.requests) == 2


async def test_calls_queued_behind_a_spent_budget_are_cancelled(
    db: Database, fake_llm: Callable[..., Any]
) -> None:
    """When the budget runs out mid-evaluation, the example calls still queued are
    cancelled: releasing the reserve for the gate right after does not let them spend it."""
    fake = await fake_llm(lambda body: "Paris")
    budget = Budget(40, 100.0)
    budget.hold_back(0.75, 0.0)  # the search may spend 10 calls
    llm = CachedLLM(LiteLLMClient(0, 0.0), OptimizationStore(db), budget, "run-q", 1)
    evaluator = Evaluator(llm, EvaluationSettings(model=_model(fake), metric="exact_match"))
    examples = [_example(f"e{i}", f"city {i}", "Paris") for i in range(30)]
    with pytest.raises(BudgetExceeded):
        await evaluator.scores(Program.text("{text}"), examples)
    budget.release()
    await asyncio.sleep(0.5)
    assert len(fake.requests) == 10
    assert budget.calls == 10
