"""Quality signals by name: which feedback a reader counts (pure).

A signal is ``"human"`` (feedback from people and apps: ``source`` absent) or an
evaluator's source, ``"eval:<name>"``. Every reader of feedback reads ``"human"`` today;
:func:`sql_condition` and :func:`rows_of` are how a reader is made to read another signal
(the per-prompt choice of signal for the monitor, the optimizer and rollouts builds on
them); :func:`sql_condition_any` selects the rows of several signals.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from promptd.events import SOURCE_PATTERN
from promptd.storage.rows import FEEDBACK_SOURCE_AT, FeedbackRow

HUMAN: Final = "human"
_SOURCE_RE: Final = re.compile(SOURCE_PATTERN)


def parse_signal(value: str) -> str:
    """``value`` when it names a signal; a ``ValueError`` saying what does otherwise."""
    if value == HUMAN or _SOURCE_RE.search(value):
        return value
    raise ValueError(f"signal {value!r}: use 'human' or 'eval:<evaluator name>'")


def source_of(signal: str) -> str | None:
    """The ``source`` column value of the signal's feedback (``None`` for people's)."""
    return None if parse_signal(signal) == HUMAN else signal


def sql_condition(signal: str, column: str = "source") -> tuple[str, tuple[str, ...]]:
    """A SQL condition (and its parameters) selecting the signal's feedback rows."""
    source = source_of(signal)
    if source is None:
        return f"{column} IS NULL", ()
    return f"{column} = ?", (source,)


def sql_condition_any(
    signals: Sequence[str], column: str = "source"
) -> tuple[str, tuple[str, ...]]:
    """A SQL condition (and its parameters) selecting the feedback rows of any of
    ``signals`` (standard SQL: ``IS NULL``, ``IN`` with ``?`` parameters)."""
    sources = [source_of(signal) for signal in signals]
    named = tuple(dict.fromkeys(s for s in sources if s is not None))
    parts = [f"{column} IS NULL"] if None in sources else []
    if named:
        parts.append(f"{column} IN ({', '.join('?' * len(named))})")
    if not parts:
        raise ValueError("no signal given")
    return f"({' OR '.join(parts)})", named


def sql_condition_named(
    signals: Sequence[str], column: str = "source", prefix: str = "signal"
) -> tuple[str, dict[str, str]]:
    """:func:`sql_condition_any` with named parameters (``:<prefix>0``, ...), for queries
    written with names."""
    condition, params = sql_condition_any(signals, column)
    names = [f"{prefix}{i}" for i in range(len(params))]
    parts = condition.split("?")
    named = parts[0] + "".join(f":{n}{rest}" for n, rest in zip(names, parts[1:], strict=True))
    return named, dict(zip(names, params, strict=True))


def rows_of(
    signal: str, feedback_rows: Sequence[FeedbackRow], evaluation_rows: Sequence[FeedbackRow]
) -> list[FeedbackRow]:
    """The signal's rows of a stored batch (``BatchOutcome.feedback_rows`` holds people's,
    ``BatchOutcome.evaluation_rows`` the evaluators')."""
    source = source_of(signal)
    if source is None:
        return list(feedback_rows)
    return [row for row in evaluation_rows if row[FEEDBACK_SOURCE_AT] == source]
