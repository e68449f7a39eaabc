"""Search strategies on the synthetic city task, with litellm over real HTTP and a real
SQLite call cache: scores feed the search, budgets hold, replays are free."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import promptd.optimization.strategies as registry
from promptd.optimization.config import OptimizationSettings
from promptd.optimization.evaluator import Evaluator
from promptd.optimization.examples import Example, split
from promptd.optimization.llm import Budget, CachedLLM, LiteLLMClient, close_litellm
from promptd.optimization.program import Program
from promptd.optimization.store import OptimizationStore
from promptd.optimization.strategies import get_strategy, known_strategies, register_strategy
from promptd.optimization.strategies.base import Candidate, SearchContext, SearchResult
from promptd.optimization.templates import DEMO_HEADING
from promptd.replacement.registry import placeholders
from promptd.storage.database import Database
from tests.optimize_fake_llm import FakeLLM, user_text
from tests.optimize_task import GOOD_INSTRUCTION, TEMPLATE, is_proposer, responder, rows


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated database, closed afterwards."""
    database = await Database.open(tmp_path / "t.db")
    yield database
    await database.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeLLM]:
    """The scripted model and proposer over HTTP."""
    server = await FakeLLM(responder).start()
    yield server
    await close_litellm()
    await server.stop()


def _examples(n: int = 120) -> list[Example]:
    return [
        Example(r.request_id, "v1", 0.0, r.input, r.output, r.scores[0], 1, None, r.correction)
        for r in rows(n)
    ]


def _settings(fake: FakeLLM, **over: Any) -> OptimizationSettings:
    model = {"model": "openai/test-model", "api_base": fake.api_base, "temperature": 0.0}
    return OptimizationSettings.model_validate(
        {
            "proposer": model,
            "evaluation": {"model": model, "metric": "token_f1"},
            "retry_backoff_s": 0.01,
            **over,
        }
    )


class Harness:
    """A SearchContext on the synthetic task, recording checkpointed candidates."""

    def __init__(
        self,
        db: Database,
        settings: OptimizationSettings,
        max_calls: int = 1000,
        baseline: Program | None = None,
    ):
        self.settings = settings
        self.budget = Budget(max_calls, 100.0)
        self.llm = CachedLLM(LiteLLMClient(0, 0.0), OptimizationStore(db), self.budget, "run-1", 4)
        self.evaluator = Evaluator(self.llm, settings.evaluation)
        parts = split(_examples(), "promptd", 0.4, 0.3)
        self.train = parts.train
        self.baseline = baseline or Program.text(TEMPLATE)
        self.validation = [e for e in parts.validation if self.evaluator.usable(e, self.baseline)]
        self.checkpointed: list[Candidate] = []

    async def context(self) -> SearchContext:
        async def hook(cand: Candidate) -> None:
            self.checkpointed.append(cand)

        baseline = await self.evaluator.scores(self.baseline, self.validation)
        return SearchContext(
            run_id="run-1",
            prompt="city",
            seed=1234,
            baseline=self.baseline,
            train=self.train,
            validation=self.validation,
            evaluator=self.evaluator,
            llm=self.llm,
            settings=self.settings,
            seen={TEMPLATE},
            on_candidate=hook,
            baseline_val_mean=sum(baseline) / len(baseline),
        )

    async def search(self, name: str) -> tuple[SearchResult, SearchContext]:
        ctx = await self.context()
        return await get_strategy(name).search(ctx), ctx


def _best(result: SearchResult) -> Candidate:
    return max(result.candidates, key=lambda c: c.val_mean or 0.0)


async def test_fewshot_random_search_scores_demo_sets_from_train_only(
    db: Database, fake: FakeLLM
) -> None:
    """Each demo set is scored on validation; demos come from corrected train examples."""
    h = Harness(db, _settings(fake, fewshot={"num_candidates": 4, "max_demos": 3}))
    result, ctx = await h.search("fewshot")
    assert len(result.candidates) == 4
    train_ids = {e.request_id for e in h.train}
    for cand in result.candidates:
        assert set(cand.details["demos"]) <= train_ids
        assert DEMO_HEADING in cand.program.template
        assert placeholders(cand.program.template) == ["text"]
        assert cand.val_n == len(h.validation)
    assert _best(result).val_mean == pytest.approx(1.0)
    assert ctx.baseline_val_mean == pytest.approx(2 / 11)  # token F1 of the chatty answer
    assert h.checkpointed == result.candidates


async def test_fewshot_gives_a_chat_prompt_demonstrations_as_turns(
    db: Database, fake: FakeLLM
) -> None:
    """A chat configuration gets its demonstrations as user/assistant turns."""
    chat = Program.from_config(
        {
            "messages": [
                {"role": "system", "content": "Read the message."},
                {"role": "user", "content": "Message: {text}\nCity:"},
            ]
        }
    )
    h = Harness(db, _settings(fake, fewshot={"num_candidates": 2}), baseline=chat)
    result, _ = await h.search("fewshot")
    best = _best(result)
    assert best.program.chat
    roles = [r for r, _ in best.program.messages]
    assert roles[0] == "system"
    assert roles[-1] == "user"
    assert "assistant" in roles
    assert best.val_mean == pytest.approx(1.0)
    assert best.summary()["config"]["messages"][1]["role"] == "user"


async def test_fewshot_without_trusted_answers_says_so(db: Database, fake: FakeLLM) -> None:
    """No correction and no well-rated output: a note, no candidate."""
    h = Harness(db, _settings(fake))
    h.train = [
        Example(e.request_id, "v1", 0.0, e.input, e.output, 0.1, 1, None, None) for e in h.train
    ]
    result, _ = await h.search("fewshot")
    assert result.candidates == []
    assert "nothing to demonstrate" in result.notes[0]


async def test_instruction_search_feeds_scores_back_to_the_proposer(
    db: Database, fake: FakeLLM
) -> None:
    """Round 2 shows every earlier instruction with its validation score; the good
    instruction wins; proposals without the placeholder still fill the input."""
    h = Harness(db, _settings(fake, instruction={"n_candidates": 3, "depth": 2}))
    result, _ = await h.search("instruction")
    proposer_prompts = [user_text(b) for b in fake.requests if is_proposer(b)]
    assert len(proposer_prompts) == 6
    assert not any("with their scores" in p for p in proposer_prompts[:3])
    assert all("with their scores" in p for p in proposer_prompts[3:])
    assert "Score 0.18: Read the message." in proposer_prompts[3]
    best = _best(result)
    assert best.program.template.startswith(GOOD_INSTRUCTION)
    assert best.val_mean is not None
    assert best.val_mean > 0.85
    assert all(placeholders(c.program.template) == ["text"] for c in result.candidates)


async def test_mipro_runs_a_tpe_study_and_rescores_the_top(db: Database, fake: FakeLLM) -> None:
    """Trials score minibatches; the top pairs are re-scored on all of validation."""
    settings = _settings(
        fake,
        mipro={
            "num_instructions": 3,
            "num_demo_sets": 3,
            "num_trials": 8,
            "minibatch_size": 4,
            "top_k_full_eval": 2,
        },
    )
    h = Harness(db, settings)
    result, _ = await h.search("mipro")
    assert 1 <= len(result.candidates) <= 2
    assert all(c.val_n == len(h.validation) for c in result.candidates)
    assert _best(result).val_mean is not None
    assert _best(result).val_mean > 0.85  # type: ignore[operator]


async def test_mipro_tries_the_models_a_configuration_allows(db: Database, fake: FakeLLM) -> None:
    """A chat configuration's ``tunable.models`` is a dimension of the TPE study."""
    chat = Program.from_config(
        {
            "messages": [{"role": "user", "content": "Message: {text}\nCity:"}],
            "tunable": {"models": ["openai/good-model"]},
        }
    )
    settings = _settings(
        fake,
        mipro={"num_instructions": 2, "num_demo_sets": 1, "num_trials": 8, "minibatch_size": 4},
        fewshot={"max_demos": 1},
    )
    h = Harness(db, settings, baseline=chat)
    h.train = []  # no demonstrations: only the instruction and the model can help
    result, _ = await h.search("mipro")
    best = _best(result)
    assert best.program.model == "openai/good-model"
    assert best.val_mean == pytest.approx(1.0)
    assert best.program.extra("tunable") == {"models": ["openai/good-model"]}


async def test_a_replayed_search_pays_nothing(db: Database, fake: FakeLLM) -> None:
    """The same run searching again (a resume) finds every answer in the cache."""
    settings = _settings(
        fake,
        mipro={
            "num_instructions": 3,
            "num_demo_sets": 3,
            "num_trials": 6,
            "minibatch_size": 4,
            "top_k_full_eval": 2,
        },
    )
    first, _ = await Harness(db, settings).search("mipro")
    paid = len(fake.requests)
    again = Harness(db, settings)
    second, _ = await again.search("mipro")
    assert len(fake.requests) == paid
    assert again.llm.misses == 0
    assert [c.program for c in second.candidates] == [c.program for c in first.candidates]


async def test_search_stops_at_the_budget_keeping_scored_candidates(
    db: Database, fake: FakeLLM
) -> None:
    """A budget spent mid-search stops it; fully scored candidates are kept."""
    h = Harness(db, _settings(fake, fewshot={"num_candidates": 10}), max_calls=60)
    result, _ = await h.search("fewshot")
    assert result.stopped is not None
    assert "llm_calls" in result.stopped
    assert h.budget.calls <= 60
    assert len(fake.requests) <= 60
    assert all(c.val_n == len(h.validation) for c in result.candidates)


async def test_gepa_adapter_uses_promptd_evaluator_proposer_and_budget(
    db: Database, fake: FakeLLM
) -> None:
    """GEPA (the real package) evolves the instruction through promptd's adapter: the model
    sees rendered templates, reflection goes to the proposer, the budget holds."""
    import gepa  # noqa: F401  (the dev extra installs it: missing, the test fails)

    h = Harness(db, _settings(fake, gepa={"max_metric_calls": 80}), max_calls=150)
    result, _ = await h.search("gepa")
    model_prompts = [user_text(b) for b in fake.requests if not is_proposer(b)]
    assert all("Message: Please ship" in p for p in model_prompts if "```" not in p)
    reflections = [p for p in model_prompts if "within ``` blocks" in p]
    assert reflections, "gepa reflected through the proposer"
    assert "The correct answer is:" in reflections[0]
    assert h.budget.calls <= 150
    best = _best(result)
    assert best.program.template.startswith(GOOD_INSTRUCTION)
    assert placeholders(best.program.template) == ["text"]


async def test_gepa_stops_when_the_run_is_cancelled(db: Database) -> None:
    """Cancelling the run ends gepa's worker thread promptly; no call follows."""
    import gepa  # noqa: F401  (the dev extra installs it: missing, the test fails)

    async def slow(body: dict[str, Any]) -> str:
        await asyncio.sleep(0.3)
        return responder(body)

    server = await FakeLLM(slow).start()
    try:
        h = Harness(db, _settings(server, gepa={"max_metric_calls": 500}))
        ctx = await h.context()
        task = asyncio.create_task(get_strategy("gepa").search(ctx))
        await asyncio.sleep(1.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
        count = len(server.requests)
        await asyncio.sleep(1.0)
        assert len(server.requests) == count
    finally:
        await close_litellm()
        await server.stop()


class Constant:
    """A custom strategy proposing one fixed template."""

    name = "constant"

    def unavailable(self, settings: OptimizationSettings) -> str | None:
        """Always available."""
        return None

    async def search(self, ctx: SearchContext) -> SearchResult:
        """Score one template."""
        result = SearchResult()
        await ctx.evaluate(Program.text(f"{GOOD_INSTRUCTION}\n{{text}}"), self.name, "x", result)
        return result


async def test_custom_strategies_register_without_editing_promptd(
    db: Database, fake: FakeLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """register_strategy adds one; an installed package's entry point adds another."""
    register_strategy("constant", Constant, replace=True)
    result, _ = await Harness(db, _settings(fake)).search("constant")
    assert result.candidates[0].val_mean is not None
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("constant", Constant)
    dist = tmp_path / "plugin" / "promptd_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: promptd-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(
            """
            [promptd.strategies]
            plugged = tests.unit.test_optimize_search:Constant
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path / "plugin"))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert "plugged" in known_strategies()
    assert isinstance(get_strategy("plugged"), Constant)
    with pytest.raises(KeyError, match="known"):
        get_strategy("nope")
    assert "tests.unit.test_optimize_search" in sys.modules


async def test_mipro_samples_with_tpe_not_at_random() -> None:
    """mipro's study on a 6 x 6 grid whose best cell is (4, 2) (a separable objective):
    TPE asks for the best cell in many of 40 trials, where uniform sampling would ask
    for it about once (40 / 36); the count is far in the tail of that binomial."""
    from scipy import stats

    from promptd.optimization.strategies.mipro import study

    rows = [0.0, 0.1, 0.2, 0.3, 0.9, 0.1]
    cols = [0.1, 0.0, 0.8, 0.2, 0.1, 0.0]
    asked: list[tuple[int, int, int, int]] = []

    async def objective(choice: tuple[int, int, int, int]) -> float:
        asked.append(choice)
        return rows[choice[0]] + cols[choice[1]]

    values = await study((6, 6, 1, 1), 40, 1234, objective)
    assert len(asked) == 40
    hits = len(values[(4, 2, 0, 0)])
    assert hits >= 6
    assert stats.binom.sf(hits - 1, 40, 1 / 36) < 1e-3
    # The later trials concentrate on the good row and column (uniformly: 20 / 6 each).
    late = asked[20:]
    assert sum(c[0] == 4 for c in late) >= 8
    assert sum(c[1] == 2 for c in late) >= 8
