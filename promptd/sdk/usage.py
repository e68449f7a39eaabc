"""Token usage, cost and model name from a returned litellm / OpenAI response, and the
size of a call's input.

Only attribute and key lookups: cheap enough for the hot path, and no import of litellm
or openai. Supports chat completions (``usage.prompt_tokens`` / ``completion_tokens``),
the Responses API (``usage.input_tokens`` / ``output_tokens``), plain dicts of either, and
litellm's ``_hidden_params["response_cost"]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Usage = tuple[int | None, int | None, float | None, str | None]

NO_USAGE: Usage = (None, None, None, None)

# Results that cannot carry usage: skip the lookups (the common case in benchmarks).
PLAIN_TYPES = frozenset({str, int, float, bool, bytes, list, tuple, type(None)})


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def usage_of(result: Any) -> Usage:
    """``(tokens_in, tokens_out, cost_usd, model)``, each None when absent."""
    usage = _get(result, "usage")
    tokens_in = tokens_out = None
    if usage is not None:
        tokens_in = _int(_get(usage, "prompt_tokens"))
        if tokens_in is None:
            tokens_in = _int(_get(usage, "input_tokens"))
        tokens_out = _int(_get(usage, "completion_tokens"))
        if tokens_out is None:
            tokens_out = _int(_get(usage, "output_tokens"))
    cost = None
    hidden = _get(result, "_hidden_params")
    if isinstance(hidden, dict):
        raw = hidden.get("response_cost")
        if isinstance(raw, int | float) and not isinstance(raw, bool) and raw >= 0:
            cost = float(raw)
    model = _get(result, "model")
    return tokens_in, tokens_out, cost, model if isinstance(model, str) and model else None


#: How deep :func:`input_chars` looks into lists, tuples and dicts of the arguments.
_MAX_DEPTH = 4


def input_chars(values: Iterable[Any]) -> int | None:
    """Characters of text in the call's arguments ``values``: strings (and bytes) counted
    in full, lists, tuples and dict values looked into (to a few levels); None when no
    argument holds any text (a size of 0 is then unknown, not empty).

    The prompt template is not an argument (the variant brings it), so the count is what
    the app passed in: a size the variant cannot change (see ``input_chars=`` of
    :func:`promptd.instrument`).
    """
    total, found = _chars(values, 0)
    return total if found else None


def _chars(values: Iterable[Any], depth: int) -> tuple[int, bool]:
    total, found = 0, False
    for value in values:
        kind = type(value)
        if kind is str or kind is bytes:
            total += len(value)
            found = True
        elif depth < _MAX_DEPTH and (kind is list or kind is tuple or kind is dict):
            inner, seen = _chars(value.values() if kind is dict else value, depth + 1)
            total += inner
            found = found or seen
    return total, found
