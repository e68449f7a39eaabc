"""A synthetic task for the optimizer's tests: city extraction with a scripted model.

The scripted model (served over HTTP by :class:`~tests.optimize_fake_llm.FakeLLM`, so
litellm's real request path runs) answers a prompt by what the prompt contains, the way
a weak model responds to instructions and demonstrations:

* with demonstrations (``Examples of good answers:``, or earlier assistant turns in a
  chat): the city alone (token F1 1.0);
* with an instruction asking for the city name only: the city alone, except on inputs
  whose hash is in the lowest fifth, where it adds words (token F1 0.5);
* otherwise: a chatty sentence around the city (token F1 0.2).

The scripted proposer answers instruction requests: a good instruction when asked to be
precise about the answer's form, or when shown earlier scores (the COPRO rounds), and a
neutral one otherwise. Everything is deterministic, so tests can assert exact outcomes.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final

from promptd.optimization.templates import DEMO_HEADING
from tests.optimize_fake_llm import user_text
from tests.optimize_helpers import Row

CITIES: Final = ("Lyon", "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Lisbon")
TEMPLATE: Final = "Read the message.\nMessage: {text}\nCity:"
GOOD_INSTRUCTION: Final = "Reply with the city name only."
NEUTRAL_INSTRUCTION: Final = "Read the message carefully and think about it."


def rows(n: int, *, prefix: str = "r", corrected_every: int = 2) -> list[Row]:
    """``n`` captured calls: chatty outputs rated low, every other one corrected."""
    out = []
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        text = f"Please ship {i + 2} boxes to {city} by order {prefix}{i}."
        correction = city if i % corrected_every == 0 else None
        output = f"The city mentioned in the text is {city}, I think."
        # Uncorrected calls are rated well only when their output is right (never here),
        # so they have no reference and serve as proposer context only.
        out.append(Row(f"{prefix}{i}", {"text": text}, output, (0.2,), None, correction))
    return out


def _city(prompt: str) -> str:
    found = re.findall(r"to ([A-Z][a-z]+) by order", prompt)
    return found[-1] if found else "Nowhere"


def _weak_input(prompt: str) -> bool:
    order = re.findall(r"by order (\S+)\.", prompt)
    key = order[-1] if order else prompt
    return hashlib.sha256(key.encode()).digest()[0] < 52  # about a fifth


def model_answer(prompt: str) -> str:
    """The scripted model's answer to a rendered prompt."""
    city = _city(prompt)
    if DEMO_HEADING in prompt:
        return city
    if GOOD_INSTRUCTION.lower() in prompt.lower():
        return f"{city} is the city" if _weak_input(prompt) else city
    return f"The city mentioned in the text is {city}, I think."


def proposer_answer(prompt: str) -> str:
    """The scripted proposer's answer."""
    if "within ``` blocks" in prompt:  # gepa's reflection prompt
        return f"```\n{GOOD_INSTRUCTION}\n```"
    if "exact form of the answer" in prompt or "with their scores" in prompt:
        return f"Sure.\n<instruction>{GOOD_INSTRUCTION}</instruction>"
    if "step by step" in prompt:
        return "I cannot help with that."  # no tags: taken as an instruction as is
    return f"<instruction>{NEUTRAL_INSTRUCTION}</instruction>"


def is_proposer(body: dict[str, Any]) -> bool:
    """Whether a request is a proposer call (it has the proposer's system message)."""
    messages = body.get("messages", [])
    return bool(messages) and messages[0].get("role") == "system"


def responder(body: dict[str, Any]) -> str:
    """The scripted server: proposer calls and model calls."""
    text = user_text(body)
    if (is_proposer(body) and "expert prompt engineer" in text) or "within ``` blocks" in text:
        return proposer_answer(text)
    if any(m.get("role") == "assistant" for m in body.get("messages", [])):
        return _city(text)  # demonstrations as chat turns
    if body.get("model") == "good-model":
        return _city(text)  # a stronger model a configuration may switch to
    return model_answer(text)
