"""Which quality signal drives each decision is chosen per prompt in the settings
(``[[evaluation.signals]]``); people's feedback stays the default (issue 20)."""

from __future__ import annotations

import sqlite3

import pytest
from pydantic import ValidationError

from promptd.evaluation.config import EvaluationSettings
from promptd.evaluation.signals import sql_condition_any

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
    with pytest.raises(ValidationError, match="the monitor reads people's feedback only"):
        _settings(signals=[{"prompts": ["*"], "monitor": ["eval:valid"]}])
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
