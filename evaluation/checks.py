"""The code checks: pure functions of a call's output (and the version's output schema).

Each returns a :class:`~.calls.Verdict` with score 1.0 (pass) or 0.0 (fail) and a short
reason; a user function may return its own score in 0..1. A function that raises or
returns something else fails the check, with the reason in the detail.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from .calls import Call, Verdict
from .config import (
    CodeCheck,
    ContainsCheck,
    FunctionCheck,
    JsonSchemaCheck,
    LengthCheck,
    RegexCheck,
    load_function,
)

MAX_DETAIL = 300


def _verdict(check: CodeCheck, ok: bool, detail: str) -> Verdict:
    return Verdict(check.name, check.type, "scored", 1.0 if ok else 0.0, detail[:MAX_DETAIL])


def json_schema(
    check: JsonSchemaCheck, call: Call, version_schema: dict[str, Any] | None
) -> Verdict:
    """The output is JSON (an object captured as such, or text that parses) and follows
    the check's schema, else the version's output schema, if either exists."""
    from jsonschema import validators

    value = call.output
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            return _verdict(check, False, f"not JSON: {exc}")
    schema = check.schema_ if check.schema_ is not None else version_schema
    if schema is None:
        return _verdict(check, True, "JSON (no schema to check)")
    validator = validators.validator_for(schema)(schema)
    error = next(iter(validator.iter_errors(value)), None)
    if error is None:
        return _verdict(check, True, "follows the schema")
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return _verdict(check, False, f"schema: at {where}: {error.message}")


def regex(check: RegexCheck, call: Call) -> Verdict:
    """The output matches the pattern."""
    pattern = check.compiled()
    text = call.output_text
    found = pattern.fullmatch(text) if check.mode == "fullmatch" else pattern.search(text)
    return _verdict(check, found is not None, "matches" if found else f"no {check.mode} match")


def contains(check: ContainsCheck, call: Call) -> Verdict:
    """The output contains the texts (all, or any)."""
    text = call.output_text
    wanted = check.texts
    if check.ignore_case:
        text, wanted = text.casefold(), [t.casefold() for t in wanted]
    missing = [t for t in wanted if t not in text]
    ok = not missing if check.require == "all" else len(missing) < len(wanted)
    return _verdict(check, ok, "contains them" if ok else f"missing {missing[:3]!r}")


def length(check: LengthCheck, call: Call) -> Verdict:
    """The output's length is within bounds."""
    n = len(call.output_text)
    low = check.min_chars if check.min_chars is not None else 0
    high = check.max_chars if check.max_chars is not None else math.inf
    return _verdict(check, low <= n <= high, f"{n} characters")


def function_verdict(check: FunctionCheck, fn: Callable[..., Any], call: Call) -> Verdict:
    """Call the user's function (blocking: the engine runs this in a thread)."""
    try:
        result = fn(call.output_text, call.input)
    except Exception as exc:
        return _verdict(check, False, f"{check.function} raised {exc!r}")
    if isinstance(result, bool):
        return _verdict(check, result, f"{check.function} returned {result}")
    if isinstance(result, int | float) and math.isfinite(result) and 0.0 <= result <= 1.0:
        detail = f"{check.function} returned {result:g}"
        return Verdict(check.name, check.type, "scored", float(result), detail)
    return _verdict(check, False, f"{check.function} returned {result!r}, not a bool or 0..1")


def run_check(check: CodeCheck, call: Call, version_schema: dict[str, Any] | None) -> Verdict:
    """Any code check but a function (those run in a thread: :func:`function_verdict`)."""
    if isinstance(check, JsonSchemaCheck):
        return json_schema(check, call, version_schema)
    if isinstance(check, RegexCheck):
        return regex(check, call)
    if isinstance(check, ContainsCheck):
        return contains(check, call)
    if isinstance(check, LengthCheck):
        return length(check, call)
    return function_verdict(check, load_function(check.function), call)
