"""A stored call as evaluators see it, and an evaluator's verdict on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from promptd.demos import as_text
from promptd.optimization.examples import load_payload
from promptd.storage.rows import MetricRow, MetricView

Status = Literal["scored", "invalid"]


@dataclass(frozen=True, slots=True)
class Call:
    """One stored call: its ids, where it came from, and the captured payloads (decoded
    JSON: a string or an object; ``None`` when the app did not capture it)."""

    request_id: str
    prompt: str
    variant: str
    model: str
    ts: float
    input: Any
    output: Any

    @classmethod
    def from_row(cls, row: MetricRow) -> Call:
        """From a stored metric row (``storage.rows`` column order), read by column name."""
        v = MetricView(*row)
        return cls.stored(v.request_id, v.prompt, v.variant, v.model, v.ts, v.input, v.output)

    @classmethod
    def stored(
        cls,
        request_id: str,
        prompt: str,
        variant: str,
        model: str,
        ts: float,
        input_json: str | None,
        output_json: str | None,
    ) -> Call:
        """From stored columns (captured payloads as their stored JSON text)."""
        return cls(
            request_id,
            prompt,
            variant,
            model,
            ts,
            load_payload(input_json),
            load_payload(output_json),
        )

    @property
    def output_text(self) -> str:
        """The output as text: a string as it is, an object as compact JSON."""
        return as_text(self.output)

    @property
    def input_text(self) -> str:
        """The input as text (what a judge is shown)."""
        return as_text(self.input)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one evaluator decided about one call.

    ``scored``: ``score`` in 0..1 becomes a feedback event. ``invalid``: a judge answered
    without a score that could be read (paid for, stored, never published).
    """

    evaluator: str
    kind: str
    status: Status
    score: float | None
    detail: str
    cost_usd: float = 0.0

    @property
    def passed(self) -> bool:
        """A code check's pass (score 1), what ``only_if`` asks."""
        return self.status == "scored" and self.score is not None and self.score >= 1.0
