"""The LLM judge: the messages it is sent and how its answer becomes a score (pure).

The judge sees the rubric, the call's input and output and, when people corrected the
call and ``use_reference`` is on, the correction as a reference answer. It never sees
the prompt's name, its variant or its template, so it cannot favour an arm of a rollout
by what it is told.

Its answer is read as: a JSON object with a ``score``; else the first number in the
text; else a word (yes/pass/good/true: the top of the scale; no/fail/bad/false: the
bottom). A number outside the scale, or no number at all, makes the answer invalid
(stored and counted, never published).
"""

from __future__ import annotations

import json
import re
from typing import Final

from .calls import Call, as_text
from .config import JudgeEvaluator

_NUMBER: Final = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_YES: Final = frozenset({"yes", "pass", "passed", "good", "true", "correct"})
_NO: Final = frozenset({"no", "fail", "failed", "bad", "false", "incorrect", "wrong"})
_WORD: Final = re.compile(r"[a-z]+")
#: Characters of the input, output and reference shown to the judge (each).
MAX_SHOWN: Final = 8000


def messages(judge: JudgeEvaluator, call: Call, reference: str | None) -> list[dict[str, str]]:
    """The chat messages of one judgement."""
    low, high = judge.scale
    system = judge.system_prompt.format(rubric=judge.rubric, low=_num(low), high=_num(high))
    block = ""
    if reference is not None and judge.use_reference:
        block = f"\nReference answer (written by a person):\n{reference[:MAX_SHOWN]}\n"
    user = judge.user_prompt.format(
        input=call.input_text[:MAX_SHOWN],
        output=call.output_text[:MAX_SHOWN],
        reference_block=block,
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _num(value: float) -> str:
    return f"{value:g}"


def score_of(text: str, scale: tuple[float, float]) -> tuple[float | None, str]:
    """The 0..1 score of the judge's answer (``None`` when unreadable) and why."""
    low, high = scale
    stripped = text.strip()
    raw = _json_score(stripped)
    if raw is None:
        found = _NUMBER.search(stripped)
        raw = float(found.group()) if found is not None else None
    if raw is not None:
        if not low <= raw <= high:
            return None, f"score {raw:g} is outside {_num(low)}..{_num(high)}"
        return (raw - low) / (high - low), f"{raw:g} on {_num(low)}..{_num(high)}"
    for word in _WORD.findall(stripped.lower()):
        if word in _YES:
            return 1.0, f"{word!r} read as the top of the scale"
        if word in _NO:
            return 0.0, f"{word!r} read as the bottom of the scale"
    return None, f"no score in the answer: {stripped[:120]!r}"


def _json_score(text: str) -> float | None:
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text).get("score")
    except (ValueError, AttributeError):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def reference_text(correction: str | None) -> str | None:
    """A stored correction (JSON text) as the text the judge reads."""
    if correction is None:
        return None
    try:
        return as_text(json.loads(correction))
    except ValueError:
        return correction
