"""Programs: text templates and chat configurations as the optimizer edits them (pure)."""

from __future__ import annotations

import pytest

from promptd.optimization.config import EvaluationSettings, LLMSettings
from promptd.optimization.evaluator import Evaluator
from promptd.optimization.examples import Example
from promptd.optimization.program import Program, check, seen_key

CHAT = Program.from_config(
    {
        "messages": [
            {"role": "system", "content": "Find the city."},
            {"role": "user", "content": "Message: {text}"},
        ],
        "model": "openai/small",
        "params": {"temperature": 0.1, "top_p": 0.9},
    }
)


def _ex(rid: str, text: str, answer: str | None) -> Example:
    return Example(rid, "v1", 0.0, {"text": text}, "x", 0.1, 1, None, answer)


def test_chat_demonstrations_are_user_assistant_turns_before_the_input() -> None:
    """Each demonstration is the input message filled with the example, then its answer."""
    out = CHAT.with_demos([_ex("a", "to {Lyon}", "Lyon"), _ex("b", "to Rome", None)], 100, 0.8)
    assert out.messages == (
        ("system", "Find the city."),
        ("user", "Message: to {{Lyon}}"),
        ("assistant", "Lyon"),
        ("user", "Message: {text}"),
    )
    rendered = out.render(_ex("z", "to Oslo", None))
    assert rendered is not None
    assert rendered[1] == {"role": "user", "content": "Message: to {Lyon}"}
    assert rendered[-1] == {"role": "user", "content": "Message: to Oslo"}
    assert out.with_demos([], 100, 0.8).without_demos() == CHAT
    assert (out.model, dict(out.params)) == ("openai/small", {"temperature": 0.1, "top_p": 0.9})


def test_chat_instruction_is_the_system_message() -> None:
    """Rewriting the instruction replaces (or adds) the system message, braces literal."""
    out = CHAT.with_instruction('Answer like {"city": "X"}')
    assert out.messages[0] == ("system", 'Answer like {{"city": "X"}}')
    assert out.instruction() == 'Answer like {{"city": "X"}}'
    bare = Program.from_config({"messages": [{"role": "user", "content": "{text}"}]})
    assert bare.with_instruction("Be brief.").messages == (
        ("system", "Be brief."),
        ("user", "{text}"),
    )


def test_text_programs_stay_text() -> None:
    """A text program's edits produce text programs: the app formats one string."""
    text = Program.text("Find the city.\nMessage: {text}")
    demo = text.with_demos([_ex("a", "to Lyon", "Lyon")], 100, 0.8)
    assert not demo.chat
    assert "Message: to Lyon" in demo.template
    assert demo.render(_ex("z", "to Oslo", None)) == [
        {"role": "user", "content": demo.template.format(text="to Oslo")}
    ]
    assert check(CHAT, text, set(), 1000) == "kind_changed"


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"messages": [{"role": "user", "content": "{text} {other}"}]}, "placeholders_changed"),
        ({"messages": [{"role": "user", "content": "Broken {text"}]}, "invalid_template"),
        (
            {
                "messages": [
                    {"role": "user", "content": "{text}"},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "invalid_template",
        ),
        ({"messages": [{"role": "user", "content": "x" * 2000 + "{text}"}]}, "too_long"),
        ({"messages": [{"role": "user", "content": "Fresh {text}"}]}, None),
    ],
)
def test_chat_candidates_are_checked(config: dict, reason: str | None) -> None:  # type: ignore[type-arg]
    """Placeholders over all messages, a final user message, length and duplicates."""
    assert check(Program.from_config(config), CHAT, set(), 1000) == reason


def test_duplicates_by_key() -> None:
    """A program seen before (or the base itself) is a duplicate."""
    other = CHAT.with_instruction("Other.")
    assert check(other, CHAT, {seen_key(other)}, 1000) == "duplicate"
    assert check(CHAT, CHAT, set(), 1000) == "duplicate"


def test_bad_configurations_are_named() -> None:
    """A configuration without messages or with an unknown role is refused."""
    with pytest.raises(ValueError, match="non-empty list"):
        Program.from_config({"messages": []})
    with pytest.raises(ValueError, match="role must be one of"):
        Program.from_config({"messages": [{"role": "robot", "content": "x"}]})


def test_evaluator_calls_a_configurations_model_and_parameters() -> None:
    """A chat configuration's model and parameters override the evaluation model's."""
    settings = EvaluationSettings(
        model=LLMSettings(model="openai/base", api_base="http://x/v1", temperature=0.0)
    )
    evaluator = Evaluator(llm=None, settings=settings)  # type: ignore[arg-type]
    chosen = evaluator.settings_for(CHAT)
    assert (chosen.model, chosen.temperature, chosen.extra) == (
        "openai/small",
        0.1,
        {"top_p": 0.9},
    )
    assert chosen.api_base == "http://x/v1"
    assert evaluator.settings_for(Program.text("{text}")) is settings.model
