"""The monitor's asyncio shell with fakes: windows feed, evaluation, persistence, triggers."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from promptd.evaluation.config import EvaluationSettings
from promptd.events import FeedbackEvent, MetricEvent
from promptd.monitoring.config import MonitoringSettings
from promptd.monitoring.export import MonitorExport
from promptd.monitoring.monitor import Monitor, rebuild_windows
from promptd.monitoring.rules import Notification, RuleConfigError, load_rules
from promptd.monitoring.signals import MonitorSignals
from promptd.monitoring.sinks import SinkWorker
from promptd.monitoring.triggers import TriggerQueue
from promptd.monitoring.windows import WindowStore
from promptd.storage.alerts import AlertChange, AlertStore
from promptd.storage.database import Database
from promptd.storage.rows import FeedbackRow, MetricRow, feedback_row, metric_row

T0 = 1_800_000_000.0
RULE = {
    "name": "slow",
    "metric": "latency_p95",
    "comparison": "greater_than",
    "threshold": 1000,
    "window": "1m",
    "min_samples": 3,
    "group_by": "variant",
}


def metric(ts: float, latency: float = 100.0, prompt: str = "p") -> MetricRow:
    """A metric event, as ingestion hands it to listeners."""
    event = MetricEvent.model_validate(
        {
            "event_id": f"m{ts}-{latency}",
            "ts": ts,
            "prompt": prompt,
            "variant": "v1",
            "model": "m",
            "request_id": "r",
            "latency_ms": latency,
            "success": True,
        }
    )
    return metric_row(event)


def feedback(ts: float, score: float = 0.5, prompt: str = "p") -> FeedbackRow:
    """A feedback event, as ingestion hands it to listeners."""
    event = FeedbackEvent(
        event_id=f"f{ts}-{score}", ts=ts, prompt=prompt, variant="v1", request_id="r", score=score
    )
    return feedback_row(event)


@dataclass
class Outcome:
    """A stand-in for BatchOutcome."""

    metric_rows: tuple[MetricRow, ...] = ()
    feedback_rows: tuple[FeedbackRow, ...] = ()
    last_metric_id: int = 0
    last_feedback_id: int = 0
    # Stored "after" every event of these tests (nothing clamped), under no watermark.
    ingested_at: float = math.inf
    watermark: float | None = None
    evaluation_rows: tuple[FeedbackRow, ...] = ()


class FakePersistence:
    """Records saved rounds; shares a log with the fake sink to check ordering."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.saved: list[AlertChange] = []
        self.stored: dict[str, dict[str, Any]] = {}

    async def save(self, changes: Sequence[AlertChange]) -> None:
        """Keep the changes like the SQL store would."""
        for c in changes:
            self.log.append(f"save:{c.status}")
            self.saved.append(c)
            if c.alert is None:
                self.stored.pop(c.fingerprint, None)
            else:
                self.stored[c.fingerprint] = dict(c.alert)

    async def load_current(self) -> list[dict[str, Any]]:
        """What a restart reads."""
        return list(self.stored.values())


class FakeSink:
    """Collects notifications; fails the first ``failures`` sends."""

    name = "fake"

    def __init__(self, log: list[str], failures: int = 0, retriable: bool = True) -> None:
        self.log = log
        self.failures = failures
        self.retriable = retriable
        self.sent: list[Notification] = []

    async def send(self, notes: list[Notification]) -> None:
        """Record or fail."""
        from promptd.monitoring.sinks import SinkError

        if self.failures:
            self.failures -= 1
            raise SinkError(self.name, "boom", retriable=self.retriable)
        self.log.extend(f"sent:{n.state}" for n in notes)
        self.sent.extend(notes)


class Clock:
    """An injected clock."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def build(
    log: list[str] | None = None,
    persistence: FakePersistence | None = None,
    rules: list[dict[str, Any]] | None = None,
    **settings: Any,
) -> tuple[Monitor, FakeSink, Clock, CollectorRegistry]:
    """A monitor with fakes around it."""
    log = [] if log is None else log
    settings.setdefault("default_degradation_rule", False)
    config = MonitoringSettings(rules=[RULE] if rules is None else rules, **settings)
    store = WindowStore(config.window_config())
    registry = CollectorRegistry()
    export = MonitorExport(registry, 10)
    sink = FakeSink(log)
    worker = SinkWorker(sink, export, retries=0, backoff_s=0)
    clock = Clock()
    monitor = Monitor(
        config,
        load_rules(config.rule_dicts(), store.config),
        store,
        persistence or FakePersistence(log),
        export,
        TriggerQueue(),
        [worker],
        clock,
    )
    return monitor, sink, clock, registry


async def _flush(monitor: Monitor, sink: FakeSink) -> None:
    task = asyncio.create_task(monitor.sinks[0].run())
    await monitor.sinks[0].drain(2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_state_is_saved_before_the_notification_leaves() -> None:
    """A firing alert is persisted first, then handed to the sink; the gauge shows it."""
    log: list[str] = []
    monitor, sink, _clock, registry = build(log)
    await monitor.on_batch(Outcome(metric_rows=tuple(metric(T0 - i, 5000) for i in range(5))))
    result = await monitor.evaluate_once()
    assert [n.state for n in result.notifications] == ["firing"]
    await _flush(monitor, sink)
    assert log == ["save:firing", "sent:firing"]
    firing = registry.get_sample_value(
        "promptd_alerts_firing", {"alertname": "slow", "severity": "warning"}
    )
    assert firing == 1


async def test_too_few_samples_never_fire() -> None:
    """Below min_samples the rule has no data and nothing is saved or sent."""
    monitor, _, _, _ = build()
    await monitor.on_batch(Outcome(metric_rows=(metric(T0, 5000), metric(T0 - 1, 5000))))
    result = await monitor.evaluate_once()
    assert result.notifications == []
    assert monitor.states == {}


async def test_restart_keeps_firing_without_second_notification() -> None:
    """Restored states keep firing and are not notified again."""
    log: list[str] = []
    persistence = FakePersistence(log)
    first, _, _, _ = build(log, persistence)
    events = tuple(metric(T0 - i, 5000) for i in range(5))
    await first.on_batch(Outcome(metric_rows=events))
    await first.evaluate_once()
    second, _sink, clock, _ = build(log, persistence)
    assert await second.restore() == 1
    await second.on_batch(Outcome(metric_rows=events))
    clock.now += 10
    result = await second.evaluate_once()
    assert result.notifications == []
    assert [a["state"] for a in second.active()] == ["firing"]


async def test_batches_during_evaluation_are_buffered_then_windowed() -> None:
    """While the windows are frozen for the evaluation thread, batches wait in a backlog."""
    monitor, _, _, _ = build()
    monitor._frozen = True
    await monitor.on_batch(Outcome(metric_rows=(metric(T0),)))
    assert monitor.store.series() == []
    monitor._frozen = False
    await monitor.evaluate_once()
    assert len(monitor.store.series()) == 1


async def test_feedback_volume_triggers_and_resets() -> None:
    """Reaching feedback_volume_threshold puts one trigger and restarts the count."""
    monitor, _, _, registry = build(feedback_volume_threshold=3)
    await monitor.on_batch(Outcome(feedback_rows=tuple(feedback(T0 - i) for i in range(4))))
    assert monitor.triggers.qsize() == 1
    trigger = await monitor.triggers.get()
    assert (trigger.prompt, trigger.kind) == ("p", "feedback_volume")
    await monitor.on_batch(Outcome(feedback_rows=(feedback(T0 + 1),)))
    assert monitor.triggers.qsize() == 0
    assert registry.get_sample_value(
        "promptd_monitor_optimization_triggers_total", {"kind": "feedback_volume"}
    )


async def test_degradation_alert_puts_an_optimization_trigger() -> None:
    """A relative rule that fires hands a degradation trigger to the optimizer."""
    monitor, _, clock, _ = build(
        rules=[], default_degradation_rule=True, performance_degradation_threshold=0.15
    )
    # A good hour, then a bad last minute.
    good = tuple(feedback(T0 - 3600 + i * 10, 0.9) for i in range(300))
    bad = tuple(feedback(T0 - 60 + i, 0.2) for i in range(30))
    await monitor.on_batch(Outcome(feedback_rows=good + bad))
    clock.now = T0
    result = await monitor.evaluate_once()
    assert [n.rule for n in result.notifications] == ["feedback_degradation"]
    kinds = []
    while monitor.triggers.qsize():
        kinds.append((await monitor.triggers.get()).kind)
    assert "degradation" in kinds


def evaluation(ts: float, score: float, prompt: str, source: str = "eval:judge") -> FeedbackRow:
    """An evaluator's result, as ingestion hands it to listeners (``evaluation_rows``)."""
    event = FeedbackEvent(
        event_id=f"e{ts}-{score}-{prompt}",
        ts=ts,
        prompt=prompt,
        variant="v1",
        request_id=f"r{ts}",
        score=score,
        source=source,
    )
    return feedback_row(event)


async def test_the_monitor_reads_each_prompts_chosen_signal() -> None:
    """A prompt whose monitor signal is an evaluator is alerted (and handed to the
    optimizer) on the evaluator's scores while people's feedback stays out of its
    windows; a prompt left at the default reads people's only; the volume trigger
    counts what the windows count."""
    monitor, _, clock, _ = build(
        rules=[], default_degradation_rule=True, feedback_volume_threshold=300
    )
    monitor.signals = MonitorSignals(
        EvaluationSettings.model_validate(
            {
                "evaluators": [{"name": "judge", "type": "regex", "pattern": "x"}],
                "signals": [{"prompts": ["judged"], "monitor": ["eval:judge"]}],
            }
        )
    )
    # The judge sees a good hour, then a bad minute; people say the opposite.
    times = [(T0 - 3600 + i * 10, 0.9, 0.1) for i in range(300)]
    times += [(T0 - 60 + i, 0.2, 0.9) for i in range(30)]
    for t, judged, felt in times:
        prompts = ("judged", "people")
        await monitor.on_batch(
            Outcome(
                feedback_rows=tuple(feedback(t, felt, p) for p in prompts),
                evaluation_rows=tuple(evaluation(t, judged, p) for p in prompts),
            )
        )
    clock.now = T0
    result = await monitor.evaluate_once()
    assert [(n.rule, n.labels["prompt"]) for n in result.notifications] == [
        ("feedback_degradation", "judged")
    ]
    judged = monitor.prompt_stats("judged", 86400)
    assert judged["feedback_signals"] == ["eval:judge"]
    assert judged["total"]["feedback_count"] == 330
    assert monitor.prompt_stats("people", 86400)["total"]["feedback_mean"] < 0.2
    triggers = []
    while monitor.triggers.qsize():
        triggers.append(await monitor.triggers.get())
    assert {(t.prompt, t.kind) for t in triggers} == {
        ("judged", "degradation"),
        ("judged", "feedback_volume"),
        ("people", "feedback_volume"),
    }
    volume = next(t for t in triggers if t.kind == "feedback_volume" and t.prompt == "judged")
    assert volume.details["signals"] == ["eval:judge"]


async def test_sink_worker_retries_then_counts_failure() -> None:
    """Retriable errors are retried with backoff; a final failure is counted, not raised."""
    registry = CollectorRegistry()
    export = MonitorExport(registry)
    flaky = FakeSink([], failures=2)
    worker = SinkWorker(flaky, export, retries=2, backoff_s=0.001)
    monitor, _, _, _ = build()
    await monitor.on_batch(Outcome(metric_rows=tuple(metric(T0 - i, 5000) for i in range(5))))
    note = (await monitor.evaluate_once()).notifications[0]
    await worker._deliver([note])
    assert flaky.sent == [note]
    dead = FakeSink([], failures=5, retriable=False)
    worker = SinkWorker(dead, export, retries=3, backoff_s=0.001)
    await worker._deliver([note])
    assert registry.get_sample_value("promptd_alert_sink_failures_total", {"sink": "fake"}) == 1


def test_full_sink_queue_drops_the_oldest() -> None:
    """A sink that cannot keep up loses its oldest notifications, counted."""
    registry = CollectorRegistry()
    export = MonitorExport(registry)
    worker = SinkWorker(FakeSink([]), export, retries=0, backoff_s=0, queue_size=2)
    note = Notification(
        "r", "fp", {}, "firing", "fired", "m", 1.0, 0.5, None, "warning", T0, None, False, 60
    )
    for _ in range(3):
        worker.submit(note)
    assert worker.pending() == 2
    assert registry.get_sample_value("promptd_alert_sink_dropped_total", {"sink": "fake"}) == 1


def test_label_values_beyond_the_cap_become_other() -> None:
    """Prometheus label values from events are capped; the rest is exported as other."""
    registry = CollectorRegistry()
    export = MonitorExport(registry, cardinality_cap=2)
    export.observe_batch([metric(T0, prompt=f"p{i}") for i in range(4)], [])
    prompts = {
        s.labels["prompt"]
        for m in registry.collect()
        if m.name == "promptd_llm_requests"
        for s in m.samples
    }
    assert prompts == {"p0", "p1", "other"}


def test_bad_rule_names_rule_and_field() -> None:
    """Rule validation errors name the rule and the field."""
    config = MonitoringSettings(rules=[{**RULE, "comparison": "bigger"}])
    with pytest.raises(RuleConfigError) as err:
        load_rules(config.rule_dicts(), config.window_config())
    assert (err.value.rule, err.value.field) == ("slow", "comparison")


def test_export_window_must_fit_the_tiers() -> None:
    """An exported window longer than the baseline tier is rejected at start."""
    with pytest.raises(ValueError, match="export_windows_s"):
        MonitoringSettings(export_windows_s=(999_999.0,))


async def test_alert_store_round_trip_and_purge(store_target: Path | str) -> None:
    """States and history survive in SQLite; purge keeps each live alert's restore point."""
    db = await Database.open(store_target)
    try:
        store = AlertStore(db)
        alert = {"fingerprint": "fp", "rule": "r", "labels": {}, "state": "firing"}
        await store.save([AlertChange("fp", "r", "firing", T0, alert, {"state": "firing"})])
        await store.save([AlertChange("gone", "r", "inactive", T0, None)])
        assert await store.load_current() == [alert]
        assert [r["fingerprint"] for r in await store.recent()] == ["gone", "fp"]
        assert await store.purge_history(T0 + 1) == 1
        assert await store.load_current() == [alert]
    finally:
        await db.close()


async def test_rebuild_replays_recent_events_and_aggregates_older_ones(
    store_target: Path | str,
) -> None:
    """Start-up rebuild: raw events of the horizon plus hourly aggregates of older history."""
    from promptd.storage.repository import BatchTime, EventRepository

    db = await Database.open(store_target)
    try:
        repo = EventRepository(db)
        old = [metric(T0 - 7200 + i, 100.0) for i in range(10)]
        recent = [metric(T0 - 30 + i, 200.0) for i in range(5)]
        await repo.store_batch(old + recent, [feedback(T0 - 7000, 0.5)], {}, clock=BatchTime(T0))
        store = WindowStore()
        summary = await rebuild_windows(store, db, T0, horizon_s=600)
        assert summary == {"aggregates": 2, "events": 5}
        day = store.stats("p", window_seconds=86400, now=T0)
        assert (day.request_count, day.feedback_count) == (15, 1)
        assert day.latency_mean == pytest.approx((10 * 100 + 5 * 200) / 15)
        minute = store.stats("p", window_seconds=60, now=T0)
        assert minute.request_count == 5
        assert minute.latency_p50 == pytest.approx(200, rel=0.02)
    finally:
        await db.close()


def test_daemon_refuses_to_start_with_a_bad_rule() -> None:
    """A bad rule stops `promptd run` with a one-line configuration error naming it."""
    from promptd.daemon.app import ConfigurationError, Daemon
    from promptd.daemon.settings import Settings
    from promptd.daemon.wiring import install_components

    settings = Settings(monitoring={"rules": [{**RULE, "window": "fast"}]})
    with pytest.raises(ConfigurationError, match="'slow': window"):
        install_components(Daemon(settings))
