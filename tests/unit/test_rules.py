"""Alert rules: config validation, conditions and the pending/firing/resolved lifecycle."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from promptd.monitoring.rules import (
    RESOLVED_RETENTION,
    AlertRule,
    AlertState,
    Evaluation,
    RuleConfigError,
    dump_states,
    evaluate,
    load_rules,
    load_states,
    parse_duration,
)
from promptd.monitoring.windows import Level, SeriesKey, WindowConfig, WindowStats, WindowStore

T0 = 1_800_000_000.0
P = SeriesKey("summarize", None, None)


def empty_stats(key: SeriesKey, window: float) -> WindowStats:
    """Statistics of a series with no data."""
    return WindowStats(
        key=key, window_seconds=window, start=0.0, end=0.0, request_count=0, request_rate=0.0,
        success_count=0, error_count=0, success_rate=None, error_rate=None, latency_mean=None,
        latency_p50=None, latency_p95=None, latency_p99=None, feedback_count=0, feedback_mean=None,
        quality_count=0, quality_mean=None, tokens_in=None, tokens_out=None, cost_count=0,
        cost_usd=None, cost_per_request=None,
    )  # fmt: skip


class FakeSource:
    """A StatsSource whose statistics the test sets directly, per series and window."""

    def __init__(self) -> None:
        self.data: dict[tuple[SeriesKey, float], WindowStats] = {}
        self.duplicate_listing = False

    def set(self, key: SeriesKey, window: float, **fields: Any) -> None:
        """Set the statistics of ``key`` over ``window``."""
        self.data[(key, window)] = dataclasses.replace(empty_stats(key, window), **fields)

    def series(self, level: Level = "model") -> list[SeriesKey]:
        """The keys that were set (listed twice when ``duplicate_listing``)."""
        keys = sorted({k for k, _ in self.data}, key=str)
        return keys + keys if self.duplicate_listing else keys

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
        """The statistics set for this series and window, or empty ones."""
        key = SeriesKey(prompt, variant, model)
        return self.data.get((key, window_seconds), empty_stats(key, window_seconds))


def rule(**kw: Any) -> AlertRule:
    """A p95 latency threshold rule with overrides."""
    base: dict[str, Any] = {
        "name": "slow",
        "metric": "latency_p95",
        "comparison": "greater_than",
        "threshold": 1000.0,
        "window": "5m",
        "min_samples": 10,
    }
    return AlertRule.model_validate({**base, **kw})


def run(
    rules: list[AlertRule], source: FakeSource, now: float, prev: Evaluation | None = None
) -> Evaluation:
    """One evaluation round continuing from ``prev``."""
    return evaluate(rules, source, now, prev.states if prev else {})


def only(ev: Evaluation) -> AlertState:
    """The single alert state of an evaluation."""
    assert len(ev.states) == 1
    return next(iter(ev.states.values()))


# ---- conditions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("comparison", "value", "fires"),
    [
        ("greater_than", 1001.0, True),
        ("greater_than", 1000.0, False),
        ("greater_than_or_equal", 1000.0, True),
        ("greater_than_or_equal", 999.0, False),
        ("less_than", 999.0, True),
        ("less_than", 1000.0, False),
        ("less_than_or_equal", 1000.0, True),
        ("less_than_or_equal", 1001.0, False),
    ],
)
def test_comparisons(comparison: str, value: float, fires: bool) -> None:
    """Each comparison fires exactly when value <op> threshold holds."""
    src = FakeSource()
    src.set(P, 300.0, request_count=50, latency_p95=value)
    ev = run([rule(comparison=comparison)], src, T0)
    assert [n.state for n in ev.notifications] == (["firing"] if fires else [])
    assert bool(ev.states) is fires


def test_too_few_samples_never_fires() -> None:
    """Below min_samples the condition is no data: no alert even if the value breaches."""
    src = FakeSource()
    src.set(P, 300.0, request_count=9, latency_p95=5000.0)
    ev = run([rule()], src, T0)
    assert ev.states == {}
    assert ev.notifications == []


def test_for_duration_pending_then_firing() -> None:
    """With `for`, the alert is pending until the condition held that long, then fires once."""
    src = FakeSource()
    src.set(P, 300.0, request_count=50, latency_p95=2000.0)
    r = [rule(**{"for": "2m"})]
    ev = run(r, src, T0)
    assert only(ev).state == "pending"
    assert only(ev).active_at == T0
    ev = run(r, src, T0 + 119, ev)
    assert only(ev).state == "pending"
    assert ev.notifications == []
    ev = run(r, src, T0 + 120, ev)
    alert = only(ev)
    assert (alert.state, alert.active_at, alert.fired_at) == ("firing", T0, T0 + 120)
    assert [(n.reason, n.started_at) for n in ev.notifications] == [("fired", T0 + 120)]


def test_pending_resets_when_condition_breaks() -> None:
    """A pending alert whose condition stops holding (or has no data) goes back to inactive."""
    src = FakeSource()
    src.set(P, 300.0, request_count=50, latency_p95=2000.0)
    r = [rule(**{"for": "2m"})]
    ev = run(r, src, T0)
    src.set(P, 300.0, request_count=50, latency_p95=10.0)
    ev = run(r, src, T0 + 60, ev)
    assert ev.states == {}
    src.set(P, 300.0, request_count=50, latency_p95=2000.0)
    ev = run(r, src, T0 + 90, ev)
    assert only(ev).active_at == T0 + 90  # the clock for `for` starts over


def test_resolve_sends_resolved_notification() -> None:
    """A firing alert whose condition is false resolves with resolved_at and one notification."""
    src = FakeSource()
    src.set(P, 300.0, request_count=50, latency_p95=2000.0)
    ev = run([rule()], src, T0)
    src.set(P, 300.0, request_count=50, latency_p95=100.0)
    ev = run([rule()], src, T0 + 30, ev)
    assert only(ev).state == "resolved"
    assert only(ev).resolved_at == T0 + 30
    (note,) = ev.notifications
    assert (note.state, note.reason, note.value, note.started_at, note.resolved_at) == (
        "resolved",
        "resolved",
        100.0,
        T0,
        T0 + 30,
    )
    ev = run([rule()], src, T0 + 60, ev)
    assert ev.notifications == []  # resolved is sent once
    ev = run([rule()], src, T0 + 30 + RESOLVED_RETENTION, ev)
    assert ev.states == {}


def test_keep_firing_for_rides_out_flapping() -> None:
    """keep_firing_for keeps the alert firing that long after the condition last held."""
    src = FakeSource()
    r = [rule(keep_firing_for="1m")]
    src.set(P, 300.0, request_count=50, latency_p95=2000.0)
    ev = run(r, src, T0)
    src.set(P, 300.0, request_count=50, latency_p95=100.0)
    ev = run(r, src, T0 + 59, ev)
    assert only(ev).state == "firing"
    assert ev.notifications == []
    ev = run(r, src, T0 + 60, ev)
    assert only(ev).state == "resolved"
    assert [n.reason for n in ev.notifications] == ["resolved"]


def test_resend_interval_while_firing() -> None:
    """A firing alert is notified again only after repeat_interval since the last send."""
    src = FakeSource()
    src.set(P, 300.0, request_count=50, latency_p95=2000.0)
    r = [rule(repeat_interval="1h")]
    ev = run(r, src, T0)
    ev = run(r, src, T0 + 3599, ev)
    assert ev.notifications == []
    ev = run(r, src, T0 + 3600, ev)
    assert [n.reason for n in ev.notifications] == ["repeat_interval_elapsed"]
    assert only(ev).last_sent_at == T0 + 3600
    assert only(ev).fired_at == T0


def test_deduplicates_by_rule_and_labels() -> None:
    """One alert per rule + labels: a series listed twice yields one state and one notification."""
    src = FakeSource()
    src.duplicate_listing = True
    src.set(P, 300.0, request_count=50, latency_p95=2000.0)
    src.set(SeriesKey("other", None, None), 300.0, request_count=50, latency_p95=2000.0)
    ev = run([rule()], src, T0)
    assert len(ev.states) == 2
    assert len({n.fingerprint for n in ev.notifications}) == len(ev.notifications) == 2


def test_restart_with_firing_alert_sends_no_duplicate() -> None:
    """State serialised to JSON and loaded by a new evaluator keeps firing without re-notifying."""
    src = FakeSource()
    src.set(P, 300.0, request_count=50, latency_p95=2000.0)
    r = [rule()]
    first = run(r, src, T0)
    document = dump_states(first.states)
    json.loads(document)  # plain JSON
    restored = load_states(document)
    assert restored == first.states
    again = evaluate(load_rules([r[0].model_dump(by_alias=True)]), src, T0 + 60, restored)
    assert again.notifications == []
    assert only(again).state == "firing"
    assert only(again).fired_at == T0


def test_no_data_holds_firing_then_resolves_after_a_window() -> None:
    """No data keeps a firing alert until a whole window passed without evidence."""
    src = FakeSource()
    src.set(P, 300.0, request_count=50, latency_p95=2000.0)
    ev = run([rule()], src, T0)
    src.set(P, 300.0, request_count=2, latency_p95=2000.0)
    ev = run([rule()], src, T0 + 299, ev)
    assert only(ev).state == "firing"
    assert ev.notifications == []
    ev = run([rule()], src, T0 + 300, ev)
    assert [(n.state, n.reason) for n in ev.notifications] == [("resolved", "no_data")]


def test_removed_rule_resolves_its_firing_alerts() -> None:
    """When a rule disappears from the config its firing alerts are resolved once."""
    src = FakeSource()
    src.set(P, 300.0, request_count=50, latency_p95=2000.0)
    ev = run([rule()], src, T0)
    ev = run([], src, T0 + 10, ev)
    assert ev.states == {}
    assert [n.reason for n in ev.notifications] == ["rule_removed"]


# ---- relative (degradation) rules ---------------------------------------------------------


DEGRADE = {
    "name": "feedback_drop",
    "kind": "relative",
    "metric": "feedback_mean",
    "window": "5m",
    "baseline_window": "24h",
    "drop": 0.15,
    "min_samples": 5,
}


@pytest.mark.parametrize(
    ("current", "fires"),
    [(0.60, True), (0.68, True), (0.70, False), (0.90, False)],
)
def test_relative_drop_against_baseline(current: float, fires: bool) -> None:
    """A relative rule fires when the window value is >= 15 % below the 24 h baseline."""
    src = FakeSource()
    src.set(P, 300.0, feedback_count=20, feedback_mean=current)
    src.set(P, 86400.0, feedback_count=500, feedback_mean=0.8)
    ev = run(list(load_rules([DEGRADE])), src, T0)
    assert bool(ev.notifications) is fires
    if fires:
        (note,) = ev.notifications
        assert note.degradation
        assert note.baseline == 0.8
        assert note.threshold == pytest.approx(0.68)


def test_relative_rule_needs_baseline_samples() -> None:
    """Without enough baseline samples a relative rule has no data and does not fire."""
    src = FakeSource()
    src.set(P, 300.0, feedback_count=20, feedback_mean=0.1)
    src.set(P, 86400.0, feedback_count=3, feedback_mean=0.8)
    assert run(list(load_rules([DEGRADE])), src, T0).notifications == []


def test_relative_rule_on_real_windows() -> None:
    """End to end on a WindowStore: a day of good feedback, then a bad 5 minutes, fires."""
    store = WindowStore()
    for minute in range(24 * 60):
        store.record_feedback(T0 + minute * 60, "summarize", "v1", 0.9)
    now = T0 + 24 * 3600
    for second in range(0, 300, 10):
        store.record_feedback(now - 300 + second, "summarize", "v1", 0.3)
    store.expire(now)
    ev = evaluate(load_rules([DEGRADE]), store, now, {})
    (note,) = ev.notifications
    assert note.degradation
    assert note.labels["prompt"] == "summarize"
    assert note.value is not None
    assert note.value < 0.5


def test_group_by_and_glob_scope() -> None:
    """group_by picks the level; glob selectors filter the series alerts are raised for."""
    store = WindowStore()
    for variant in ("v1", "v2", "x9"):
        for i in range(20):
            store.record_metric(T0 + i, "chat-en", variant, "m", 5000.0, True)
    store.record_metric(T0, "search", "v1", "m", 5000.0, True)
    r = rule(prompt="chat-*", variant="v*", group_by="variant", min_samples=1)
    ev = evaluate([r], store, T0 + 30, {})
    labels = sorted((n.labels["prompt"], n.labels["variant"]) for n in ev.notifications)
    assert labels == [("chat-en", "v1"), ("chat-en", "v2")]


# ---- config validation --------------------------------------------------------------------


def test_seed_style_aliases() -> None:
    """window_minutes, `for` and `drop` spellings are accepted."""
    item = {k: v for k, v in DEGRADE.items() if k != "window"}
    r = AlertRule.model_validate(item | {"window_minutes": 10, "for": "1m"})
    assert (r.window, r.for_, r.change, r.direction) == (600.0, 60.0, 0.15, "drop")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0), ("500ms", 0.5), ("2d", 172800.0), (45, 45.0)],
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    """Durations accept Prometheus-style units and plain seconds."""
    assert parse_duration(text) == seconds


ERR = {"metric": "error_rate", "comparison": "less_than", "threshold": 1}


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({**ERR, "name": "r1", "metric": "latency_p77"}, "metric"),
        ({**ERR, "name": "r2", "comparison": "above"}, "comparison"),
        ({"name": "r3", "metric": "error_rate", "threshold": 1}, "rule"),
        ({**ERR, "name": "r4", "window": "5x"}, "window"),
        ({"name": "r5", "kind": "relative", "metric": "feedback_mean"}, "rule"),
        ({**ERR, "name": "r6", "labels": {"prompt": "x"}}, "labels"),
        ({**ERR, "name": "r7", "for": "-1s"}, "for"),
        ({**ERR, "name": "r8", "variant": "v1"}, "rule"),
    ],
)
def test_invalid_rules_name_rule_and_field(item: dict[str, Any], field: str) -> None:
    """A bad rule raises RuleConfigError naming the rule and the field."""
    with pytest.raises(RuleConfigError) as info:
        load_rules([item])
    assert info.value.rule == item["name"]
    assert info.value.field == field
    assert item["name"] in str(info.value)


def test_duplicate_rule_names_are_rejected() -> None:
    """Two rules with one name would share fingerprints, so loading refuses them."""
    item = {"name": "dup", "metric": "error_rate", "comparison": "less_than", "threshold": 1}
    with pytest.raises(RuleConfigError, match="duplicate"):
        load_rules([item, item])


def test_window_longer_than_tiers_is_rejected_at_load() -> None:
    """With the window config, a rule window beyond the longest tier fails at load time."""
    item = {**ERR, "name": "weekly", "window": "7d"}
    with pytest.raises(RuleConfigError, match="longest window tier") as info:
        load_rules([item], WindowConfig())
    assert info.value.field == "window"
