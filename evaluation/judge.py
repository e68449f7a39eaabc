"""The LLM judge: the messages it is sent and how its answer becomes a score (pure).

The judge sees the rubric, the call's input and output and, when people corrected the
call and ``use_reference`` is on, the correction as a reference answer. It never sees
the prompt's name, its variant or its template, so it cannot favour an arm of a rollout
by what it is told.

Its answer is read as: a JSON object with a ``score``; else the first number in the
text; else a word (yes/pass/good/true: the top of the scale; no/fail/bad/false: the
bottom). A number outside the scale, or no number at all, makes the answer invalid
(stored and counted, never published). With ``scoring = "logprobs"`` the score is the
expected value under the token probabilities the server returned (:func:`expected_score`),
the text being the fallback.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Final

from promptd.demos import as_text

from .calls import Call
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


def verdict_of(
    judge: JudgeEvaluator, text: str, top_logprobs: Sequence[Sequence[tuple[str, float]]]
) -> tuple[float | None, str]:
    """The 0..1 score of a judge's answer by its ``scoring`` (the expected score under
    the token probabilities, else the text) and why."""
    if judge.scoring == "logprobs":
        score, detail = expected_score(top_logprobs, judge.scale)
        if score is not None:
            return score, detail
        text_score, text_detail = score_of(text, judge.scale)
        return text_score, f"{detail}; from the text: {text_detail}"
    return score_of(text, judge.scale)


def expected_score(
    positions: Sequence[Sequence[tuple[str, float]]], scale: tuple[float, float]
) -> tuple[float | None, str]:
    """G-Eval's weighting: at the first generated position whose most likely tokens hold
    a value of the scale (an integer in it, or a yes/no word for its ends), the mean of
    those values weighted by their probabilities, as a 0..1 score; ``None`` without one."""
    low, high = scale
    for index, alternatives in enumerate(positions):
        weights: dict[float, float] = {}
        for token, logprob in alternatives:
            value = _token_value(token, low, high)
            if value is not None:
                weights[value] = weights.get(value, 0.0) + math.exp(logprob)
        mass = sum(weights.values())
        if mass > 0:
            mean = sum(v * w for v, w in weights.items()) / mass
            return (mean - low) / (high - low), (
                f"expected {mean:.2f} on {_num(low)}..{_num(high)} from token "
                f"probabilities (position {index}, mass {mass:.2f})"
            )
    return None, "no scale value among the most likely tokens"


def _token_value(token: str, low: float, high: float) -> float | None:
    word = token.strip().lower()
    if word.isdigit():
        value = float(word)
        return value if low <= value <= high else None
    if word in _YES:
        return high
    if word in _NO:
        return low
    return None


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
