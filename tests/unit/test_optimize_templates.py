"""Templates as the optimizer sees them: instruction, input block, demonstrations (pure)."""

from __future__ import annotations

import pytest

from promptd.optimization.examples import Example
from promptd.optimization.strategies.base import parse_instruction
from promptd.optimization.templates import (
    DEMO_HEADING,
    check,
    input_block,
    instruction_of,
    render,
    sanitize,
    strip_demos,
    with_demos,
    with_instruction,
)
from promptd.replacement.registry import placeholders

BASE = "Extract the city.\nBe brief.\nMessage: {text}\nCity:"


def _ex(
    rid: str, text: str, correction: str | None, output: str = "x", score: float = 0.2
) -> Example:
    return Example(rid, "v1", 0.0, {"text": text}, output, score, 1, None, correction)


def test_instruction_and_input_block_split_at_the_first_placeholder_line() -> None:
    """The instruction is what precedes the first placeholder line; the rest is kept."""
    assert instruction_of(BASE) == "Extract the city.\nBe brief."
    assert input_block(BASE) == "Message: {text}\nCity:"
    assert instruction_of("{text}\nSummarize the above.") == ""


@pytest.mark.parametrize(
    ("proposal", "expected"),
    [
        # A whole template with the placeholder is kept as written.
        ("Find the city.\nMessage: {text}\nCity:", "Find the city.\nMessage: {text}\nCity:"),
        # Spaces inside a known placeholder are tolerated.
        ("Find the city in { text }", "Find the city in {text}"),
        # A lost placeholder: the proposal is an instruction, the input block is grafted.
        ("Answer with one word.", "Answer with one word.\n\nMessage: {text}\nCity:"),
        # Stray braces (a JSON example) stay literal; escaped ones stay escaped.
        (
            'Answer like {"city": "X"} or {{"c": 1}}',
            'Answer like {{"city": "X"}} or {{"c": 1}}\n\nMessage: {text}\nCity:',
        ),
        # An unknown placeholder is literal text, not a new variable.
        ("Use {context} and {text}", "Use {{context}} and {text}"),
    ],
)
def test_sanitize_makes_proposals_valid_templates(proposal: str, expected: str) -> None:
    """Every proposal becomes a template with exactly the base's placeholders."""
    out = sanitize(proposal, BASE)
    assert out == expected
    assert placeholders(out) == ["text"]


def test_demos_sit_between_instruction_and_input_as_filled_input_blocks() -> None:
    """Each demonstration is the input block filled with the example and its answer."""
    out = with_demos(BASE, [_ex("a", "to Lyon", "Lyon"), _ex("b", "to Rome", "Rome")], 100, 0.8)
    assert out == (
        "Extract the city.\nBe brief.\n\n"
        f"{DEMO_HEADING}\n\n"
        "Message: to Lyon\nCity: Lyon\n\n"
        "Message: to Rome\nCity: Rome\n\n"
        "Message: {text}\nCity:"
    )


def test_with_instruction_keeps_input_block_and_demos() -> None:
    """Replacing the instruction keeps the demonstrations and the input block."""
    with_demo = with_demos(BASE, [_ex("a", "to Lyon", "Lyon")], 100, 0.8)
    out = with_instruction(with_demo, "Reply with the city only.")
    assert out == (
        f"Reply with the city only.\n\n{DEMO_HEADING}\n\nMessage: to Lyon\nCity: Lyon\n\n"
        "Message: {text}\nCity:"
    )
    assert placeholders(out) == ["text"]


def test_demos_replace_not_stack_and_escape_braces() -> None:
    """A new demo block replaces the old one; braces in examples are escaped."""
    first = with_demos(BASE, [_ex("a", "to {Lyon}", "Lyon")], 100, 0.8)
    second = with_demos(first, [_ex("b", "to Rome", None, output="Rome", score=0.9)], 100, 0.8)
    assert second.count(DEMO_HEADING) == 1
    assert strip_demos(second) == "Extract the city.\nBe brief.\n\nMessage: {text}\nCity:"
    assert strip_demos(BASE) == BASE
    assert "City: Rome" in second
    assert "Lyon" not in second
    assert placeholders(first) == ["text"]
    rendered = render(first, _ex("z", "hello", None))
    assert rendered is not None
    assert "to {Lyon}" in rendered


def test_demos_skip_examples_without_a_trusted_answer() -> None:
    """A poorly rated output without correction is never shown as a good answer."""
    out = with_demos(BASE, [_ex("a", "to Oslo", None, output="wrong", score=0.3)], 100, 0.8)
    assert "wrong" not in out


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("", "empty"),
        ("x" * 60 + "{text}", "too_long"),
        ("Broken {text", "invalid_template"),
        ("No placeholder here", "placeholders_changed"),
        ("Extra {text} {other}", "placeholders_changed"),
        (BASE, "duplicate"),
        ("Seen {text}", "duplicate"),
        ("Fresh {text}", None),
    ],
)
def test_check_names_why_a_candidate_is_discarded(template: str, reason: str | None) -> None:
    """Invalid, changed, too long and repeated templates are discarded with a reason."""
    assert check(template, BASE, {"Seen {text}"}, max_chars=60) == reason


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("<instruction>Do X.</instruction>", "Do X."),
        # The last tagged block wins (a model that first echoes the current one).
        ("<instruction>old</instruction> better: <instruction>new</instruction>", "new"),
        ("Sure! <instruction>Open only", "Open only"),
        ("New instruction: Just do it.", "Just do it."),
        ("   ", None),
        ("<instruction></instruction>", None),
    ],
)
def test_parse_instruction_is_lenient_with_small_models(answer: str, expected: str | None) -> None:
    """Tagged, half-tagged and untagged answers all yield the instruction."""
    assert parse_instruction(answer) == expected
