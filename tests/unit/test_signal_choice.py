"""Which quality signal drives each decision is chosen per prompt in the settings
(``[[evaluation.signals]]``); people's feedback stays the default (issue 20)."""

from __future__ import annotations

import sqlite3

import pytest
from pydantic import ValidationError

from promptd.evaluation.config import EvaluationSettings
from promptd.evaluation.signals import sql_condition_any
from promptd.monitoring.signals import MonitorSignals

CHECK = {"name": "valid", "type": "regex", "pattern": "x"}


def _settings(**values: object) -> EvaluationSettings:
    return EvaluationSettings.model_validate({"evaluators": [CHECK], **values})


def test_people_drive_every_decision_by_default() -> None:
    """Without a choice, or for a prompt no choice selects, every decision reads people's
    feedback; the first choice that selects a prompt is its own."""
    settings = _settings(
        signals=[
            {
                "prompts": ["support*"],
                "rollout": ["eval:valid"],
                "monitor": ["human"],
            },
            {"prompts": ["*"], "optimizer": ["eval:valid"]},
        ]
    )
    assert _settings().signals_for("any", "rollout") == ("human",)
    assert settings.signals_for("support-bot", "rollout") == ("eval:valid",)
    assert settings.signals_for("support-bot", "monitor") == ("human",)
    assert settings.signals_for("support-bot", "optimizer") == ("human",)
    assert settings.signals_for("other", "optimizer") == ("eval:valid",)
    assert settings.signals_for("other", "rollout") == ("human",)


def test_a_signal_must_name_an_evaluator_or_an_external_source() -> None:
    """A misspelt evaluator is refused at start, naming the choice, the decision and the
    known names; evaluations the app sends itself are declared in ``external``."""
    with pytest.raises(ValidationError, match=r"signals\[0\]\.rollout: 'eval:vaild' names no"):
        _settings(signals=[{"prompts": ["*"], "rollout": ["eval:vaild"]}])
    with pytest.raises(ValidationError, match="pattern"):
        _settings(signals=[{"prompts": ["*"], "rollout": ["people"]}])
    with pytest.raises(ValidationError, match=r"signals\[0\]\.monitor: 'eval:vaild' names no"):
        _settings(signals=[{"prompts": ["*"], "monitor": ["eval:vaild"]}])
    chosen = _settings(signals=[{"prompts": ["*"], "monitor": ["human", "eval:valid"]}])
    assert chosen.signals_for("p", "monitor") == ("human", "eval:valid")
    ok = _settings(
        external=["Relevance"], signals=[{"prompts": ["*"], "rollout": ["eval:Relevance"]}]
    )
    assert ok.signals_for("p", "rollout") == ("eval:Relevance",)


@pytest.mark.parametrize(
    ("signals", "expected"),
    [
        (["human"], [1]),
        (["eval:a"], [2]),
        (["human", "eval:b"], [1, 3]),
        (["eval:a", "eval:b", "eval:a"], [2, 3]),
    ],
)
def test_the_sql_condition_of_several_signals(signals: list[str], expected: list[int]) -> None:
    """The condition selects exactly the rows of the signals given (portable SQL with
    ``?`` parameters), here on a real SQLite table."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE f (id INTEGER, source TEXT)")
    db.executemany("INSERT INTO f VALUES (?, ?)", [(1, None), (2, "eval:a"), (3, "eval:b")])
    condition, params = sql_condition_any(signals)
    rows = db.execute(f"SELECT id FROM f WHERE {condition} ORDER BY id", params).fetchall()
    assert [r[0] for r in rows] == expected
    with pytest.raises(ValueError, match="no signal"):
        sql_condition_any([])


def test_the_monitor_counts_the_rows_of_each_prompts_signals() -> None:
    """Per prompt, the monitor counts exactly the feedback of its ``monitor`` signals:
    people's by default, an evaluator's, or both; a replay reads every row some prompt
    counts (one SQL condition) and the snapshot key names the choice."""
    default = MonitorSignals(_settings(signals=[{"prompts": ["*"], "rollout": ["eval:valid"]}]))
    assert (default.human_only, default.key, default.named) == (True, None, ("human",))
    assert MonitorSignals().human_only
    chosen = MonitorSignals(
        _settings(
            evaluators=[CHECK, {**CHECK, "name": "judge"}],
            signals=[
                {"prompts": ["eval-only"], "monitor": ["eval:judge"]},
                {"prompts": ["both*"], "monitor": ["human", "eval:valid"]},
            ],
        )
    )
    assert not chosen.human_only
    assert chosen.key is not None
    table = {
        (prompt, source): chosen.counts(prompt, source)
        for prompt in ("eval-only", "both-a", "other")
        for source in (None, "eval:judge", "eval:valid")
    }
    assert [k for k, v in table.items() if v] == [
        ("eval-only", "eval:judge"),
        ("both-a", None),
        ("both-a", "eval:valid"),
        ("other", None),
    ]
    assert not chosen.counts(None, None)  # an episode's feedback counts through its calls
    assert [default.counts("x", s) for s in (None, "eval:valid")] == [True, False]
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE f (id INTEGER, source TEXT)")
    rows = [(1, None), (2, "eval:judge"), (3, "eval:valid"), (4, "eval:other")]
    db.executemany("INSERT INTO f VALUES (?, ?)", rows)
    for signals, expected in ((chosen, [1, 2, 3]), (default, [1])):
        condition, params = signals.sql_condition("source")
        found = db.execute(f"SELECT id FROM f WHERE {condition} ORDER BY id", params).fetchall()
        assert [r[0] for r in found] == expected
