"""The pure parts of evaluation: budget, cursor, outage state, code checks, the judge's
messages and score, and the configuration's errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from promptd.evaluation.budget import Budget
from promptd.evaluation.calls import Call
from promptd.evaluation.checks import contains, json_schema, length, regex, run_check
from promptd.evaluation.config import EvaluationSettings, JudgeEvaluator
from promptd.evaluation.cursor import Cursor
from promptd.evaluation.health import Health
from promptd.evaluation.judge import messages, reference_text, score_of
from promptd.events import MetricEvent
from promptd.storage.rows import metric_row

DAY = 86_400.0


def test_budget_counts_starts_per_minute_and_dollars_per_day() -> None:
    """Three per minute: the fourth waits for the minute to pass; a day's dollars stop
    evaluations until the next UTC day; a restart restores today's spending."""
    b = Budget(per_minute=3, usd_per_day=1.0)
    t = 10 * DAY + 100.0
    assert [b.admit(t + i) for i in range(4)] == [None, None, None, "budget_rate"]
    assert b.admit(t + 60.5) is None  # the first start left the window
    b.spend(0.6, t + 61)
    b.spend(0.5, t + 62)
    assert b.admit(t + 200) == "budget_cost"
    assert b.admit(11 * DAY + 1) is None  # a new day
    restored = Budget(usd_per_day=1.0)
    restored.restore(1.0, t)
    assert restored.admit(t + 1) == "budget_cost"
    assert Budget().admit(t) is None


def test_cursor_stops_at_the_oldest_undecided_call() -> None:
    """The position is the start of the oldest range with calls outstanding; a held range
    (a start's re-read) stays open until released; feedback-only batches open nothing."""
    c = Cursor(100)
    reread = c.open(150, 0, held=True)
    assert reread == 150
    first = c.open(160, 2)
    assert first == 160
    assert c.open(160, 0) is None
    second = c.open(170, 1)
    assert c.position == 100
    c.add(reread)
    c.release(reread)
    assert c.position == 100
    c.settle(reread)
    assert c.position == 150
    c.settle(160)
    c.settle(170)
    assert c.position == 150
    c.settle(160)
    assert c.position == 170
    assert second == 170
    assert c.outstanding == 0
    with pytest.raises(KeyError):
        c.settle(170)


def test_outage_after_failures_in_a_row_with_probes() -> None:
    """Down after N failures in a row, one probe per interval while down, up again on a
    success."""
    h = Health(failures_to_down=3, probe_interval_s=30.0)
    assert h.failed(0.0, "e") is None
    assert h.succeeded() is None
    assert [h.failed(t, "e") for t in (1.0, 2.0, 3.0)] == [None, None, "down"]
    assert not h.up
    assert not h.may_try(10.0)
    assert h.may_try(33.0)
    assert not h.may_try(34.0)
    assert h.failed(34.0, "still") is None
    assert h.succeeded() == "up"
    assert h.may_try(35.0)


def _call(output: object, inp: object = None) -> Call:
    return Call("r1", "p", "v-secret-variant", "m", 1.0, inp, output)


def _settings(*evaluators: dict[str, object]) -> EvaluationSettings:
    return EvaluationSettings.model_validate({"evaluators": list(evaluators)})


def test_code_checks() -> None:
    """JSON and its schema (the version's, or the check's own), regex, contains, length."""
    s = _settings(
        {"name": "js", "type": "json_schema"},
        {"name": "own", "type": "json_schema", "schema": {"type": "array"}},
        {"name": "re", "type": "regex", "pattern": r"^\d+$", "mode": "fullmatch"},
        {"name": "has", "type": "contains", "texts": ["Refund", "days"], "ignore_case": True},
        {"name": "any", "type": "contains", "texts": ["x", "days"], "require": "any"},
        {"name": "len", "type": "length", "min_chars": 2, "max_chars": 5},
    ).by_name()
    schema = {"type": "object", "required": ["answer"]}
    assert json_schema(s["js"], _call('{"answer": 1}'), schema).passed
    assert json_schema(s["js"], _call({"answer": 1}), schema).passed
    bad = json_schema(s["js"], _call('{"other": 1}'), schema)
    assert not bad.passed
    assert "answer" in bad.detail
    assert "not JSON" in json_schema(s["js"], _call("nope"), schema).detail
    assert json_schema(s["js"], _call("[1]"), None).passed
    assert json_schema(s["own"], _call("[1]"), schema).passed
    assert regex(s["re"], _call("123")).passed
    assert not regex(s["re"], _call("123a")).passed
    assert contains(s["has"], _call("refund within 30 DAYS")).passed
    assert not contains(s["has"], _call("refund")).passed
    assert contains(s["any"], _call("3 days")).passed
    assert [length(s["len"], _call(t)).score for t in ("a", "ab", "abcde", "abcdef")] == [
        0,
        1,
        1,
        0,
    ]


def passes_if_short(output: str, input: object) -> float:
    """A user function for the tests: 1 for short outputs, 0.5 else; raises on 'boom'."""
    if output == "boom":
        raise RuntimeError("boom")
    return 1.0 if len(output) < 5 else 0.5


def test_function_check() -> None:
    """A user function by "module:name": its score, and an exception is a failed check."""
    s = _settings({"name": "fn", "type": "function", "function": f"{__name__}:passes_if_short"})
    check = s.evaluators[0]
    assert run_check(check, _call("ok"), None).score == 1.0
    assert run_check(check, _call("longer"), None).score == 0.5
    failed = run_check(check, _call("boom"), None)
    assert failed.score == 0.0
    assert "raised" in failed.detail


def test_judge_messages_never_show_the_variant() -> None:
    """The judge sees the rubric, input, output and the reference, never the variant or
    the prompt's name."""
    judge = _settings(
        {"name": "j", "type": "judge", "model": "m", "rubric": "Be correct."}
    ).evaluators[0]
    assert isinstance(judge, JudgeEvaluator)
    msgs = messages(judge, _call("the answer", {"q": "why"}), "the reference")
    text = "\n".join(m["content"] for m in msgs)
    assert "Be correct." in text
    assert "the answer" in text
    assert '"why"' in text
    assert "the reference" in text
    assert "v-secret-variant" not in text
    assert "1 to 5" in text
    no_ref = "\n".join(m["content"] for m in messages(judge, _call("a"), None))
    assert "Reference" not in no_ref
    assert reference_text('{"answer": "42"}') == '{"answer": "42"}'
    assert reference_text('"plain"') == "plain"


@pytest.mark.parametrize(
    ("answer", "score"),
    [
        ("5", 1.0),
        ("1", 0.0),
        ("Score: 4\nbecause ...", 0.75),
        ('{"score": 2, "why": "x"}', 0.25),
        ("3.5/5", 0.625),
        ("Yes, it is correct.", 1.0),
        ("No.", 0.0),
        ("7", None),
        ("0", None),
        ("I cannot tell", None),
        ("", None),
    ],
)
def test_judge_score(answer: str, score: float | None) -> None:
    """The first number on the scale, a JSON score, or yes/no; else invalid."""
    assert score_of(answer, (1.0, 5.0))[0] == score


@pytest.mark.parametrize(
    ("evaluators", "message"),
    [
        ([{"name": "a", "type": "regex", "pattern": "("}], "pattern does not compile"),
        ([{"name": "a", "type": "regex", "pattern": "x", "patern": "y"}], "Extra inputs"),
        ([{"name": "a", "type": "magic"}], "does not match any of the expected tags"),
        ([{"name": "bad name", "type": "length", "max_chars": 1}], "should match pattern"),
        ([{"name": "a", "type": "length"}], "set min_chars, max_chars or both"),
        ([{"name": "a", "type": "function", "function": "nowhere.mod:fn"}], "cannot import"),
        (
            [{"name": "a", "type": "json_schema", "schema": {"type": "wrong"}}],
            "not a valid JSON schema",
        ),
        (
            [{"name": "a", "type": "judge", "model": "m", "rubric": "r", "scale": [5, 1]}],
            "low < high",
        ),
        (
            [{"name": "a", "type": "judge", "model": "m", "rubric": "r", "only_if": ["nope"]}],
            "only_if names no code check",
        ),
        ([{"name": "a", "type": "length", "max_chars": 1}] * 2, "names must be unique"),
        ([{"name": "a", "type": "length", "max_chars": 1, "sample_rate": 0}], "greater than 0"),
    ],
)
def test_configuration_errors_are_clear(evaluators: list[dict[str, object]], message: str) -> None:
    """Unknown keys, bad values and inconsistent evaluators are refused, saying why."""
    with pytest.raises(ValidationError, match=message):
        _settings(*evaluators)


def test_a_call_is_read_from_a_stored_row_by_column_name() -> None:
    """A stored metric row (every optional column set, input_chars among them) gives the
    call its ids and captured input and output, not the columns beside them."""
    event = MetricEvent(
        event_id="e1", ts=1_700_000_000.0, prompt="qa", variant="v2", model="m",
        request_id="r1", unit_id="u", latency_ms=5.0, success=True, tokens_in=3,
        tokens_out=4, cost_usd=0.1, input_chars=12, episode_id="ep",
        input={"question": "why?"}, output="because", attributes={"k": "v"},
    )  # fmt: skip
    call = Call.from_row(metric_row(event))
    assert (call.request_id, call.prompt, call.variant, call.model, call.ts) == (
        "r1", "qa", "v2", "m", 1_700_000_000.0,
    )  # fmt: skip
    assert (call.input, call.output) == ({"question": "why?"}, "because")
    assert Call.from_row(metric_row(event.model_copy(update={"output": None}))).output is None
