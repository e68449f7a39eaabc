"""Alert rules: config models, a pure evaluator and the alert lifecycle.

Modelled on Prometheus ``rules/alerting.go`` and Alertmanager ``notify/dedup_stage.go``: every
decision is a pure function of the rules, the windows, the previous alert states and ``now``,
and every notification carries the reason it was sent.

Lifecycle of one alert (identified by its fingerprint, a hash of rule name + labels)::

    inactive ──cond──▶ pending ──cond held for `for`──▶ firing ──cond false (after
       ▲                  │ cond false / no data         │      keep_firing_for)──▶ resolved
       └──────────────────┘                              └─ resend every repeat_interval

* ``for: 0`` fires on the first evaluation where the condition holds.
* ``keep_firing_for`` keeps a firing alert firing that long after the condition last held,
  so a flapping metric does not resolve and re-fire on every tick.
* **Too few samples** (below ``min_samples``, or no value) is *no data*, never a true
  condition: it never fires, and it resets a pending alert (the condition was not seen to hold
  for the whole ``for``). Unlike Prometheus, no data does **not** resolve a firing alert at
  once: a quiet minute says nothing about recovery. The alert is held firing and resolves
  (reason ``no_data``) only once no evidence has supported it for ``max(window,
  keep_firing_for)``, i.e. after a whole window turned over without the condition being seen.
* Resolved alerts are kept for :data:`RESOLVED_RETENTION` seconds (so the daemon can persist
  ``resolved_at``), then forgotten; a new occurrence starts over as pending.
* Removing a rule from the config resolves its firing alerts (reason ``rule_removed``).

Relative rules (``kind: relative``, the optimizer's degradation trigger) compare the
``window`` value of a series with the same series over ``baseline_window`` (24 h by default):
``direction: drop`` holds when ``value <= baseline * (1 - change)``, ``rise`` when
``value >= baseline * (1 + change)``. The baseline includes the current window (5 min out of
24 h dilutes it by 0.3 %, a price paid for one query per series). A baseline with fewer than
``baseline_min_samples`` (default ``min_samples``) samples, or equal to 0, is no data.
Their notifications have ``degradation=True`` and ``threshold`` set to the computed limit.

State (:class:`AlertState`) is plain data with ``to_dict``/``from_dict``, so the daemon can
store it in SQLite; after a restart the evaluator continues from it and a firing alert is not
notified again before its ``repeat_interval`` elapses.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Final, Literal, Protocol

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from promptd._validation import clean_message

from .windows import METRIC_SAMPLES, Level, SeriesKey, WindowConfig, WindowStats

Comparison = Literal["greater_than", "less_than", "greater_than_or_equal", "less_than_or_equal"]
AlertStatus = Literal["pending", "firing", "resolved"]

#: How long a resolved alert is remembered before it is forgotten (seconds).
RESOLVED_RETENTION: Final = 15 * 60.0
#: Labels set by the evaluator; rules may not override them.
RESERVED_LABELS: Final = frozenset({"alertname", "prompt", "variant", "model", "severity"})

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """``"30s"``, ``"5m"``, ``"1h30m"``, ``"500ms"``, ``"2d"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a string like '5m' or a number of seconds")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a duration must be a string like '5m' or a number of seconds")
    text = value.strip()
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"invalid duration {value!r}: use e.g. '30s', '5m', '1h30m', '2d'")
    return total


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]


class AlertRule(BaseModel):
    """One alert rule from the config file (threshold or relative-to-baseline)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=200)
    kind: Literal["threshold", "relative"] = "threshold"
    metric: str
    comparison: Comparison | None = None
    threshold: float | None = None
    window: Duration = 300.0
    min_samples: int = Field(default=1, ge=0)
    for_: Duration = Field(default=0.0, alias="for")
    keep_firing_for: Duration = 0.0
    repeat_interval: Duration = 4 * 3600.0
    severity: str = Field(default="warning", min_length=1, max_length=64)
    labels: dict[str, str] = Field(default_factory=dict)
    description: str = ""
    # Scope: exact names or glob patterns; group_by picks the level alerts are raised at.
    prompt: str = "*"
    variant: str = "*"
    model: str = "*"
    group_by: Level = "prompt"
    # Relative rules: compare the window's value with the trailing baseline of the same series.
    baseline_window: Duration = 86400.0
    baseline_min_samples: int | None = Field(default=None, ge=0)
    change: float | None = Field(default=None, gt=0)
    direction: Literal["drop", "rise"] = "drop"

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        # Seed-style spellings: window_minutes, and `drop: 0.15` / `rise: 0.5` for relatives.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "window_minutes" in data:
            if "window" in data:
                raise ValueError("give either window or window_minutes, not both")
            minutes = data.pop("window_minutes")
            if isinstance(minutes, bool) or not isinstance(minutes, int | float):
                raise ValueError("window_minutes must be a number")
            data["window"] = float(minutes) * 60.0
        for direction in ("drop", "rise"):
            if direction in data:
                if "change" in data:
                    raise ValueError(f"give either change or {direction}, not both")
                data["change"] = data.pop(direction)
                data["direction"] = direction
        return data

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in METRIC_SAMPLES:
            raise ValueError(f"unknown metric {value!r}; one of: {', '.join(METRIC_SAMPLES)}")
        return value

    @field_validator("labels")
    @classmethod
    def _no_reserved_labels(cls, value: dict[str, str]) -> dict[str, str]:
        clash = RESERVED_LABELS & value.keys()
        if clash:
            raise ValueError(f"labels may not set {sorted(clash)}: the evaluator sets them")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AlertRule:
        if self.window <= 0:
            raise ValueError("window must be positive")
        if self.kind == "threshold":
            if self.comparison is None or self.threshold is None:
                raise ValueError("a threshold rule needs comparison and threshold")
        else:
            if self.change is None:
                raise ValueError("a relative rule needs change (or drop / rise) as a fraction")
            if self.baseline_window <= self.window:
                raise ValueError("baseline_window must be longer than window")
        if self.variant != "*" and self.group_by == "prompt":
            raise ValueError("a variant selector needs group_by: variant or model")
        if self.model != "*" and self.group_by != "model":
            raise ValueError("a model selector needs group_by: model")
        return self

    @property
    def degradation(self) -> bool:
        """Relative rules are the degradation triggers handed to the optimizer."""
        return self.kind == "relative"

    def matches(self, key: SeriesKey) -> bool:
        """Whether a series at this rule's ``group_by`` level is in the rule's scope."""
        return (
            fnmatch.fnmatchcase(key.prompt, self.prompt)
            and (key.variant is None or fnmatch.fnmatchcase(key.variant, self.variant))
            and (key.model is None or fnmatch.fnmatchcase(key.model, self.model))
        )


class RuleConfigError(ValueError):
    """A rule in the config is invalid; names the rule and the field."""

    def __init__(self, rule: str, field: str, message: str) -> None:
        super().__init__(f"alert rule {rule!r}: {field}: {message}")
        self.rule = rule
        self.field = field
        self.message = message


def load_rules(
    raw: Iterable[Mapping[str, Any]], window_config: WindowConfig | None = None
) -> tuple[AlertRule, ...]:
    """Validate the ``rules`` list of the config file; raise :class:`RuleConfigError`.

    With ``window_config``, also check every window fits in the configured tiers.
    """
    rules: list[AlertRule] = []
    seen: set[str] = set()
    for position, item in enumerate(raw):
        label = (
            str(item.get("name") or f"#{position}") if isinstance(item, Mapping) else f"#{position}"
        )
        try:
            rule = AlertRule.model_validate(item)
        except ValidationError as exc:
            err = exc.errors(include_url=False, include_input=False)[0]
            loc = ".".join(str(p) for p in err["loc"]) or "rule"
            raise RuleConfigError(label, loc, clean_message(str(err["msg"]))) from exc
        if rule.name in seen:
            raise RuleConfigError(rule.name, "name", "duplicate rule name")
        seen.add(rule.name)
        if window_config is not None:
            longest = window_config.baseline_seconds
            for fname in ("window", "baseline_window") if rule.degradation else ("window",):
                if getattr(rule, fname) > longest:
                    raise RuleConfigError(
                        rule.name, fname, f"longer than the longest window tier ({longest:g} s)"
                    )
        rules.append(rule)
    return tuple(rules)


class StatsSource(Protocol):
    """What the evaluator reads: :class:`~promptd.monitoring.windows.WindowStore` fits."""

    def series(self, level: Level = "model") -> list[SeriesKey]:
        """Keys with data at ``level``."""
        ...

    def stats(
        self,
        prompt: str,
        variant: str | None = None,
        model: str | None = None,
        *,
        window_seconds: float,
        now: float,
        quantiles: bool = True,
    ) -> WindowStats:
        """Statistics of one series over a window ending at ``now`` (latency quantiles only
        when ``quantiles``)."""
        ...


@dataclass(frozen=True, slots=True)
class AlertState:
    """One alert that is not inactive. Timestamps, not booleans; JSON-safe via ``to_dict``."""

    fingerprint: str
    rule: str
    labels: dict[str, str]
    state: AlertStatus
    active_at: float
    fired_at: float | None = None
    resolved_at: float | None = None
    last_sent_at: float | None = None
    last_true_at: float | None = None
    value: float | None = None
    threshold: float | None = None
    baseline: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable) for persistence."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlertState:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "labels": dict(data["labels"])})


def dump_states(states: Mapping[str, AlertState]) -> str:
    """All alert states as one JSON document (for SQLite)."""
    return json.dumps([s.to_dict() for s in states.values()], sort_keys=True)


def load_states(document: str) -> dict[str, AlertState]:
    """Inverse of :func:`dump_states`: states keyed by fingerprint."""
    states = (AlertState.from_dict(item) for item in json.loads(document))
    return {s.fingerprint: s for s in states}


@dataclass(frozen=True, slots=True)
class Notification:
    """What the daemon hands to sinks (and, when ``degradation``, to the optimizer trigger)."""

    rule: str
    fingerprint: str
    labels: dict[str, str]
    state: Literal["firing", "resolved"]
    reason: str
    metric: str
    value: float | None
    threshold: float | None
    baseline: float | None
    severity: str
    started_at: float
    resolved_at: float | None
    degradation: bool
    window_seconds: float


@dataclass(frozen=True, slots=True)
class Observation:
    """One evaluation of a rule on a series: ``holds`` is None when there is no data."""

    holds: bool | None
    value: float | None = None
    threshold: float | None = None
    baseline: float | None = None


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Result of :func:`evaluate`: the new states (by fingerprint) and what to send."""

    states: dict[str, AlertState]
    notifications: list[Notification] = field(default_factory=list)


_COMPARE: Final = {
    "greater_than": lambda v, t: v > t,
    "less_than": lambda v, t: v < t,
    "greater_than_or_equal": lambda v, t: v >= t,
    "less_than_or_equal": lambda v, t: v <= t,
}


def fingerprint(labels: Mapping[str, str]) -> str:
    """Stable identity of an alert: a hash of its sorted labels (alertname included)."""
    blob = json.dumps(sorted(labels.items()), separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def alert_labels(rule: AlertRule, key: SeriesKey) -> dict[str, str]:
    """Labels of the alert ``rule`` raises for series ``key``."""
    labels = {"alertname": rule.name, "prompt": key.prompt, "severity": rule.severity}
    if key.variant is not None:
        labels["variant"] = key.variant
    if key.model is not None:
        labels["model"] = key.model
    return {**labels, **rule.labels}


def observe(rule: AlertRule, source: StatsSource, key: SeriesKey, now: float) -> Observation:
    """Evaluate ``rule``'s condition on one series at ``now``."""
    # Merging latency histograms dominates a query: only latency rules ask for quantiles.
    quantiles = rule.metric.startswith("latency_p")
    stats = source.stats(
        key.prompt, key.variant, key.model, window_seconds=rule.window, now=now, quantiles=quantiles
    )
    value = stats.value(rule.metric)
    if value is None or stats.samples(rule.metric) < rule.min_samples:
        return Observation(holds=None, value=value)
    if rule.kind == "threshold":
        assert rule.comparison is not None  # validated
        assert rule.threshold is not None
        return Observation(
            holds=_COMPARE[rule.comparison](value, rule.threshold),
            value=value,
            threshold=rule.threshold,
        )
    base_stats = source.stats(
        key.prompt,
        key.variant,
        key.model,
        window_seconds=rule.baseline_window,
        now=now,
        quantiles=quantiles,
    )
    base = base_stats.value(rule.metric)
    needed = rule.min_samples if rule.baseline_min_samples is None else rule.baseline_min_samples
    if base is None or base == 0 or base_stats.samples(rule.metric) < needed:
        return Observation(holds=None, value=value, baseline=base)
    assert rule.change is not None  # validated
    if rule.direction == "drop":
        limit = base * (1.0 - rule.change)
        holds = value <= limit
    else:
        limit = base * (1.0 + rule.change)
        holds = value >= limit
    return Observation(holds=holds, value=value, threshold=limit, baseline=base)


def evaluate(
    rules: Iterable[AlertRule],
    source: StatsSource,
    now: float,
    previous: Mapping[str, AlertState],
) -> Evaluation:
    """One evaluation round: observe every rule on every series in scope, step each alert."""
    source = _Memo(source)
    states: dict[str, AlertState] = {}
    notes: list[Notification] = []
    by_name = {rule.name: rule for rule in rules}
    visited: set[str] = set()
    for rule in by_name.values():
        for key in source.series(rule.group_by):
            if not rule.matches(key):
                continue
            labels = alert_labels(rule, key)
            fp = fingerprint(labels)
            if fp in visited:  # de-duplication: one alert per rule + labels per round
                continue
            visited.add(fp)
            obs = observe(rule, source, key, now)
            _apply(step(rule, previous.get(fp), obs, fp, labels, now), states, notes, fp)
    for fp, prev in previous.items():
        if fp in visited:
            continue
        rule_or_none = by_name.get(prev.rule)
        if rule_or_none is None:
            _apply(_removed(prev, now), states, notes, fp)
        else:  # the series has no data at all any more
            _apply(
                step(rule_or_none, prev, Observation(holds=None), fp, prev.labels, now),
                states,
                notes,
                fp,
            )
    return Evaluation(states=states, notifications=notes)


class _Memo:
    """Caches series lists and window statistics for one round: rules share windows (and
    relative rules share the 24 h baseline), and a merge over many buckets is not free."""

    def __init__(self, source: StatsSource) -> None:
        self._source = source
        self._series: dict[Level, list[SeriesKey]] = {}
        self._stats: dict[tuple[str, str | None, str | None, float, float], WindowStats] = {}

    def series(self, level: Level = "model") -> list[SeriesKey]:
        """Keys with data at ``level`` (cached)."""
        if level not in self._series:
            self._series[level] = self._source.series(level)
        return self._series[level]

    def stats(
        self,
        prompt: str,
        variant: str | None = None,
        model: str | None = None,
        *,
        window_seconds: float,
        now: float,
        quantiles: bool = True,
    ) -> WindowStats:
        """Statistics of one series (cached per series, window and now)."""
        key = (prompt, variant, model, window_seconds, now)
        hit = self._stats.get(key)
        # An entry computed with quantiles serves both kinds of request.
        if hit is None or (quantiles and hit.latency_p50 is None and hit.request_count):
            hit = self._stats[key] = self._source.stats(
                prompt, variant, model, window_seconds=window_seconds, now=now, quantiles=quantiles
            )
        return hit


Step = tuple[AlertState | None, Notification | None]


def _apply(result: Step, states: dict[str, AlertState], notes: list[Notification], fp: str) -> None:
    new, note = result
    if new is not None:
        states[fp] = new
    if note is not None:
        notes.append(note)


def step(
    rule: AlertRule,
    prev: AlertState | None,
    obs: Observation,
    fp: str,
    labels: dict[str, str],
    now: float,
) -> Step:
    """Advance one alert by one observation: the new state (None = inactive) and maybe a
    notification."""
    if prev is None or prev.state == "resolved":
        if obs.holds:
            pending = AlertState(
                fingerprint=fp,
                rule=rule.name,
                labels=labels,
                state="pending",
                active_at=now,
                last_true_at=now,
                value=obs.value,
                threshold=obs.threshold,
                baseline=obs.baseline,
            )
            return _maybe_fire(rule, pending, now)
        if prev is not None and now - (prev.resolved_at or now) < RESOLVED_RETENTION:
            return prev, None
        return None, None
    if prev.state == "pending":
        if not obs.holds:  # false or no data: the condition was not seen to hold all along
            return None, None
        seen = _replace(
            prev, last_true_at=now, value=obs.value, threshold=obs.threshold, baseline=obs.baseline
        )
        return _maybe_fire(rule, seen, now)
    # firing
    if obs.holds:
        current = _replace(
            prev, last_true_at=now, value=obs.value, threshold=obs.threshold, baseline=obs.baseline
        )
        return _maybe_resend(rule, current, now)
    since_true = now - (prev.last_true_at or prev.active_at)
    if obs.holds is None:
        if since_true < max(rule.window, rule.keep_firing_for):
            return _maybe_resend(rule, prev, now)
        return _resolve(rule, prev, now, "no_data", prev.value)
    if since_true < rule.keep_firing_for:
        return _maybe_resend(rule, _replace(prev, value=obs.value), now)
    return _resolve(rule, _replace(prev, value=obs.value), now, "resolved", obs.value)


def _maybe_fire(rule: AlertRule, pending: AlertState, now: float) -> Step:
    if now - pending.active_at < rule.for_:
        return pending, None
    firing = _replace(pending, state="firing", fired_at=now, last_sent_at=now)
    return firing, _note(rule, firing, "fired")


def _maybe_resend(rule: AlertRule, firing: AlertState, now: float) -> Step:
    # Alertmanager's needsUpdate: a firing alert already sent is repeated once per interval.
    if firing.last_sent_at is not None and now - firing.last_sent_at < rule.repeat_interval:
        return firing, None
    sent = _replace(firing, last_sent_at=now)
    return sent, _note(rule, sent, "repeat_interval_elapsed")


def _resolve(
    rule: AlertRule, firing: AlertState, now: float, reason: str, value: float | None
) -> Step:
    resolved = _replace(firing, state="resolved", resolved_at=now, last_sent_at=now, value=value)
    return resolved, _note(rule, resolved, reason)


def _removed(prev: AlertState, now: float) -> Step:
    if prev.state != "firing":
        return None, None
    note = Notification(
        rule=prev.rule,
        fingerprint=prev.fingerprint,
        labels=prev.labels,
        state="resolved",
        reason="rule_removed",
        metric="",
        value=prev.value,
        threshold=prev.threshold,
        baseline=prev.baseline,
        severity=prev.labels.get("severity", ""),
        started_at=prev.fired_at or prev.active_at,
        resolved_at=now,
        degradation=False,
        window_seconds=0.0,
    )
    return None, note


def _note(rule: AlertRule, alert: AlertState, reason: str) -> Notification:
    return Notification(
        rule=rule.name,
        fingerprint=alert.fingerprint,
        labels=alert.labels,
        state="resolved" if alert.state == "resolved" else "firing",
        reason=reason,
        metric=rule.metric,
        value=alert.value,
        threshold=alert.threshold,
        baseline=alert.baseline,
        severity=rule.severity,
        started_at=alert.fired_at or alert.active_at,
        resolved_at=alert.resolved_at,
        degradation=rule.degradation,
        window_seconds=rule.window,
    )


def _replace(alert: AlertState, **changes: Any) -> AlertState:
    return dataclasses.replace(alert, **changes)
