"""Which feedback the monitor counts, per prompt (pure).

A prompt's ``[[evaluation.signals]]`` entry names its ``monitor`` signals: ``"human"``
(people's and apps' feedback, ``source`` absent; the default), ``"eval:<name>"`` (an
evaluator's results), or several (every score of any of them counts). Those, and only
those, feedback rows go into the prompt's windows (``feedback_count``,
``feedback_mean``: what its rules, the exported window gauges and the HTTP statistics
read) and count towards its feedback-volume trigger. The live monitor, the replay of a
snapshot's tail and the full rebuild from storage all ask :meth:`MonitorSignals.counts`,
so they window the same rows.

Feedback on a whole episode is people's: it counts (through its calls) where ``"human"``
does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from promptd.evaluation.signals import HUMAN, source_of, sql_condition_named

if TYPE_CHECKING:
    from promptd.evaluation.config import EvaluationSettings

#: Where the replays' rows (storage.alerts.raw_events, storage.snapshots.tail_events) hold
#: ``is_feedback``, the prompt and the feedback's source.
_IS_FEEDBACK: Final = 1
_PROMPT: Final = 2
_SOURCE: Final = 14
#: Prompts whose choice is remembered; beyond it the memo starts over (prompt names are
#: user data, their number is not bounded by configuration).
_MEMO_LIMIT: Final = 10_000


class MonitorSignals:
    """The monitor's quality signals of every prompt, from the evaluation settings."""

    def __init__(self, evaluation: EvaluationSettings | None = None) -> None:
        self._evaluation = evaluation
        choices = (
            [] if evaluation is None else [(c.prompts, c.of("monitor")) for c in evaluation.signals]
        )
        #: True when every prompt reads people's feedback only (nothing chose otherwise).
        self.human_only = all(signals == (HUMAN,) for _, signals in choices)
        #: Every signal some prompt's monitor reads (the rows a replay needs to read).
        self.named: tuple[str, ...] = (
            (HUMAN,)
            if self.human_only
            else tuple(sorted({s for _, signals in choices for s in signals} | {HUMAN}))
        )
        #: What a windows snapshot must have been taken under (``None``: people's only,
        #: as before signals could be chosen, so older snapshots stay usable).
        self.key: str | None = (
            None if self.human_only else json.dumps([[list(p), list(s)] for p, s in choices])
        )
        self._memo: dict[str, tuple[tuple[str, ...], frozenset[str | None]]] = {}

    def _choice(self, prompt: str) -> tuple[tuple[str, ...], frozenset[str | None]]:
        found = self._memo.get(prompt)
        if found is None:
            signals = (
                (HUMAN,)
                if self.human_only or self._evaluation is None
                else self._evaluation.signals_for(prompt, "monitor")
            )
            found = signals, frozenset(source_of(signal) for signal in signals)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[prompt] = found
        return found

    def of(self, prompt: str) -> tuple[str, ...]:
        """The monitor signals of ``prompt`` (``("human",)`` unless chosen)."""
        return self._choice(prompt)[0]

    def sources(self, prompt: str) -> frozenset[str | None]:
        """The ``source`` values counted for ``prompt`` (``None``: people's feedback)."""
        return self._choice(prompt)[1]

    def counts(self, prompt: str | None, source: str | None) -> bool:
        """Whether a feedback row of ``prompt`` from ``source`` counts in its windows."""
        if prompt is None:
            return False
        if self.human_only:
            return source is None
        return source in self.sources(prompt)

    def sql_condition(self, column: str = "f.source") -> tuple[str, dict[str, str]]:
        """A SQL condition (named parameters) selecting the feedback rows some prompt
        counts: what a replay reads before :meth:`select` picks per prompt."""
        return sql_condition_named(self.named, column, prefix="monitor_signal")

    def select(self, rows: Sequence[Sequence[Any]]) -> Sequence[Sequence[Any]]:
        """The replayed rows the windows take: every call, and the feedback its prompt
        counts (rows read under :meth:`sql_condition`)."""
        if self.human_only:
            return rows  # the condition selected people's feedback only
        counts = self.counts
        return [r for r in rows if not r[_IS_FEEDBACK] or counts(r[_PROMPT], r[_SOURCE])]
