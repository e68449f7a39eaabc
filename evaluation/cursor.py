"""The engine's cursor over stored calls: up to which call id every call is decided (pure).

Calls reach the engine in ranges of row ids: a stored batch covers the ids above the
previous batch's last id up to its own ``last_metric_id`` (and a restart's re-read covers
the ids from the saved cursor up to the last id stored before ingestion started). A range
holds the sampled calls taken from it until each is decided: evaluated and its result
written, or skipped and counted. The cursor is the end of the longest prefix of ranges
with nothing outstanding, i.e. the start of the oldest open range.

Saved periodically, it is what a restart resumes from: every call above it is read again,
sampled again (the decision is deterministic), and those without a stored result are
evaluated. Ids need not be dense (PostgreSQL sequences leave gaps): only their order
matters.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Range:
    start: int
    end: int
    outstanding: int
    held: bool


class Cursor:
    """Open ranges in id order, and the position below which everything is decided."""

    def __init__(self, position: int) -> None:
        self._done = position
        self._high = position
        self._open: dict[int, _Range] = {}

    @property
    def position(self) -> int:
        """Every call with an id up to this is decided."""
        return self._done

    @property
    def high(self) -> int:
        """The end of the last range opened."""
        return self._high

    @property
    def outstanding(self) -> int:
        """Calls taken and not yet decided."""
        return sum(r.outstanding for r in self._open.values())

    def open(self, end: int, count: int, held: bool = False) -> int | None:
        """Open the range from the last end to ``end`` with ``count`` calls to decide;
        ``held`` keeps it open until :meth:`release` even at zero (a re-read still
        adding calls). Returns the range's key (its end), or ``None`` when ``end`` adds
        nothing (a batch of feedback only)."""
        if end <= self._high:
            return None
        self._open[end] = _Range(self._high, end, count, held)
        self._high = end
        self._advance()
        return end

    def add(self, key: int, count: int = 1) -> None:
        """More calls to decide in the range ``key`` (a re-read finding them)."""
        self._open[key].outstanding += count

    def release(self, key: int) -> None:
        """The held range ``key`` takes no more calls."""
        self._open[key].held = False
        self._advance()

    def settle(self, key: int) -> None:
        """One call of range ``key`` is decided."""
        rng = self._open[key]
        rng.outstanding -= 1
        if rng.outstanding < 0:
            raise ValueError(f"range ending at {key} settled more calls than it took")
        self._advance()

    def _advance(self) -> None:
        done = [k for k, r in self._open.items() if not r.held and r.outstanding == 0]
        for key in done:
            del self._open[key]
        self._done = min((r.start for r in self._open.values()), default=self._high)
