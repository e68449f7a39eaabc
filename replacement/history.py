"""Each unit's figures from before a rollout: the covariates of its regression adjustment.

When a rollout starts, the controller reads the rollout's prompt's calls (and the feedback
on them) over the profile's ``history_lookback_s`` before the start, grouped by unit
(``unit_id``, else ``episode_id``; a call without either cannot recur and has no history),
from ``storage/history.py``. This module turns those per-unit sums into a
:class:`History`: per unit, one figure per :data:`FIGURES` column, which the metrics of
:data:`.catalog.CATALOG` read through their ``history`` name:

=================  ==============================================================
``feedback_score``  mean feedback score on the unit's calls (call feedback only)
``success_rate``    share of the unit's calls that succeeded
``quality``         mean automatic quality score of its calls
``log_latency``     ``ln`` of its calls' mean latency in ms
``error_rate``      share of its calls that failed
``cost``            mean cost per call
=================  ==============================================================

Every figure is centred on its mean over the units that have it, and a unit without it
(a new user, no feedback before) gets 0: it sits at the mean, so the adjustment leaves it
as it is and the unit counts unadjusted (:mod:`.adjustment`). The table also holds the
centres of the per-call covariates (the mean input size of the pre-period calls), which
place a call that does not report its size at the mean in the same way.

Deterministic: only events stamped in ``[start − lookback, start)`` **and stored before
the start** count, so the table rebuilt after a restart from the same stored events is
the same; it is also saved with the rollout (``rollout:<id>:history`` in the snapshots
table) and loaded from there, so retention that deletes old events later does not change
a running rollout's statistics.

Memory: about 250 bytes per unit with history (a dict of tuples of floats).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import numpy as np

__all__ = ["FIGURES", "History", "UnitSums"]

FIGURES: Final = (
    "feedback_score",
    "success_rate",
    "quality",
    "log_latency",
    "error_rate",
    "cost",
)
"""A unit's pre-period figures, in the order of :attr:`History.units`' tuples."""

CALL_CENTRES: Final = ("log_input_chars", "input_chars")
"""Per-call covariates whose pre-period mean :attr:`History.centres` holds."""

# Latencies below 1 µs are clamped before the log (as the rollout's latency metric does).
_MIN_LATENCY_MS: Final = 1e-3

#: The per-unit sums the history query returns, in column order: the unit, its calls,
#: successes, total latency (ms), calls with a quality and their total, calls with a cost
#: and their total, calls with an input size and their total, calls with feedback and
#: the total of their (per-call mean) feedback score.
UnitSums = Sequence[Any]


@dataclass(frozen=True, slots=True, eq=False)
class History:
    """The pre-period figures of a rollout's units (see the module doc).

    ``units`` maps a unit to its centred figures (:data:`FIGURES` order, 0.0 where the unit
    has none); ``centres`` holds the mean subtracted from each figure and the pre-period
    mean of each per-call covariate (:data:`CALL_CENTRES`); ``counts`` the units with each
    figure; ``since`` and ``until`` the window of event time (and ``until`` the bound on
    storage time) it was computed over.
    """

    since: float
    until: float
    units: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    centres: Mapping[str, float] = field(default_factory=dict)
    counts: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def empty(cls, since: float = 0.0, until: float = 0.0) -> History:
        """No unit has history (history off, or nothing stored before the rollout)."""
        return cls(since, until)

    @classmethod
    def from_sums(cls, rows: Iterable[UnitSums], since: float, until: float) -> History:
        """The table of the per-unit sums of the history query."""
        raw: dict[str, list[float]] = {}
        chars = chars_n = 0.0
        for unit, calls, ok, latency, q_n, q_sum, c_n, c_sum, i_n, i_sum, f_n, f_sum in rows:
            if not calls:
                continue
            nan = math.nan
            raw[unit] = [
                f_sum / f_n if f_n else nan,
                ok / calls,
                q_sum / q_n if q_n else nan,
                math.log(max(latency / calls, _MIN_LATENCY_MS)),
                1.0 - ok / calls,
                c_sum / c_n if c_n else nan,
            ]
            chars += i_sum
            chars_n += i_n
        if not raw:
            return cls.empty(since, until)
        table = np.array(list(raw.values()), dtype=np.float64)
        have = ~np.isnan(table)
        counts = have.sum(axis=0)
        means = np.where(counts > 0, np.nansum(table, axis=0) / np.maximum(counts, 1), 0.0)
        centred = np.where(have, table - means, 0.0)
        mean_chars = chars / chars_n if chars_n else 0.0
        centres = dict(zip(FIGURES, map(float, means), strict=True))
        if chars_n:
            centres |= {"log_input_chars": math.log1p(mean_chars), "input_chars": mean_chars}
        return cls(
            since,
            until,
            units=dict(zip(raw, map(tuple, centred.tolist()), strict=True)),
            centres=centres,
            counts=dict(zip(FIGURES, map(int, counts), strict=True)),
        )

    def figure(self, name: str) -> int:
        """The column of figure ``name`` in a unit's tuple."""
        return FIGURES.index(name)

    def centre(self, covariate: str) -> float:
        """What is subtracted from a per-call covariate (0 without pre-period calls)."""
        return self.centres.get(covariate, 0.0)

    def summary(self) -> dict[str, Any]:
        """What ``GET /v1/rollouts/{id}`` shows of it."""
        return {
            "since": self.since,
            "until": self.until,
            "units": len(self.units),
            "units_with": dict(self.counts),
            "centres": dict(self.centres),
        }

    # -- snapshots -----------------------------------------------------------------

    def encode(self) -> bytes:
        """Bytes of the whole table (:meth:`decode` restores it)."""
        units = list(self.units)
        values = np.array([self.units[u] for u in units], dtype=np.float64).reshape(
            len(units), len(FIGURES)
        )
        return msgspec.msgpack.encode(
            {
                "since": self.since,
                "until": self.until,
                "figures": list(FIGURES),
                "units": units,
                "values": values.tobytes(),
                "centres": dict(self.centres),
                "counts": dict(self.counts),
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> History:
        """Inverse of :meth:`encode`; ``ValueError`` when the bytes are not one."""
        try:
            raw = msgspec.msgpack.decode(data)
            if raw["figures"] != list(FIGURES):
                raise ValueError(f"figures {raw['figures']} are not {list(FIGURES)}")
            units: Sequence[str] = raw["units"]
            values = np.frombuffer(raw["values"], dtype=np.float64).reshape(
                len(units), len(FIGURES)
            )
            return cls(
                float(raw["since"]),
                float(raw["until"]),
                units=dict(zip(units, map(tuple, values.tolist()), strict=True)),
                centres={str(k): float(v) for k, v in raw["centres"].items()},
                counts={str(k): int(v) for k, v in raw["counts"].items()},
            )
        except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a rollout history: {exc}") from None

    def digest(self) -> str:
        """A short fingerprint of the table (an accumulator's snapshot names the history
        it was built with)."""
        return hashlib.blake2b(self.encode(), digest_size=8).hexdigest()
