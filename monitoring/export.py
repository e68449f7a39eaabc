"""Prometheus export of the monitor: per prompt/variant/model traffic, alerts, windows.

Per-event series (requests, latency histogram, feedback, tokens, cost) are plain dicts of
cumulative counts updated once per batch and turned into metric families only at scrape
time by :class:`_TrafficCollector`: a ``Counter.labels(...).inc()`` per event would cost more
than windowing the event. Monitor-internal metrics (notifications, sink failures, evaluation
time) use ordinary prometheus_client metrics; everything is built on the registry passed in.

Names from events are user data: :class:`LabelCap` lets at most ``cap`` distinct values per
label through and exports the rest as ``other`` (design: bounded cardinality).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from promptd.storage.rows import FeedbackRow, MetricRow

from .windows import WindowStats

#: Latency buckets in seconds (LLM calls: 50 ms .. 2 min).
LATENCY_BUCKETS: Final = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
)
_LATENCY_BUCKETS_MS: Final = tuple(b * 1000.0 for b in LATENCY_BUCKETS)
_EVAL_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
OTHER: Final = "other"

_Triple = tuple[str, str, str]
_Pair = tuple[str, str]


class LabelCap:
    """Caps the distinct values of each event-derived label at ``cap``; the rest is ``other``.

    Values seen first win their own series for the life of the process (a series that
    appeared in Prometheus must not change its meaning later).
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._seen: dict[str, set[str]] = {"prompt": set(), "variant": set(), "model": set()}
        # Cache of mapped triples; bounded because the raw names are unbounded user data.
        self._cache: dict[tuple[str, str, str], _Triple] = {}
        #: Events whose labels were folded into ``other``.
        self.overflowed = 0

    def value(self, label: str, raw: str) -> str:
        """The exported value of ``raw`` for ``label``."""
        seen = self._seen[label]
        if raw in seen:
            return raw
        if len(seen) < self.cap:
            seen.add(raw)
            return raw
        return OTHER

    def triple(self, prompt: str, variant: str, model: str) -> _Triple:
        """Capped ``(prompt, variant, model)``."""
        key = (prompt, variant, model)
        hit = self._cache.get(key)
        if hit is None:
            hit = (
                self.value("prompt", prompt),
                self.value("variant", variant),
                self.value("model", model),
            )
            if len(self._cache) >= 4 * self.cap * 8:
                self._cache.clear()
            self._cache[key] = hit
        if OTHER in hit:
            self.overflowed += 1
        return hit


class _Traffic:
    """Cumulative per-series counts (what the collector exposes)."""

    __slots__ = ("cost", "errors", "lat_buckets", "lat_sum", "requests", "tin", "tout")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.lat_buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # last: +Inf only
        self.lat_sum = 0.0
        self.tin = 0
        self.tout = 0
        self.cost = 0.0


class _TrafficCollector(Collector):
    def __init__(self, export: MonitorExport) -> None:
        self._export = export

    def collect(self) -> Iterator[Metric]:
        ex = self._export
        labels3 = ["prompt", "variant", "model"]
        requests = CounterMetricFamily(
            "promptd_llm_requests",
            "LLM calls reported by apps, by outcome (success or error).",
            labels=[*labels3, "outcome"],
        )
        latency = HistogramMetricFamily(
            "promptd_llm_request_duration_seconds",
            "Latency of LLM calls as reported by apps.",
            labels=labels3,
        )
        tokens = CounterMetricFamily(
            "promptd_llm_tokens",
            "Tokens reported by apps, by direction.",
            labels=[*labels3, "direction"],
        )
        cost = CounterMetricFamily(
            "promptd_llm_cost_usd",
            "Cost of LLM calls reported by apps (US dollars).",
            labels=labels3,
        )
        for key, t in list(ex.traffic.items()):
            k = list(key)
            requests.add_metric([*k, "success"], t.requests - t.errors)
            requests.add_metric([*k, "error"], t.errors)
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), t.lat_buckets, strict=True):
                cumulative += count
                buckets.append((_le(bound), cumulative))
            latency.add_metric(k, buckets, t.lat_sum / 1000.0)
            tokens.add_metric([*k, "in"], t.tin)
            tokens.add_metric([*k, "out"], t.tout)
            cost.add_metric(k, t.cost)
        feedback = SummaryMetricFamily(
            "promptd_feedback_score",
            "Feedback scores (0..1) reported by apps.",
            labels=["prompt", "variant"],
        )
        for (prompt, variant), (n, total) in list(ex.feedback.items()):
            feedback.add_metric([prompt, variant], n, total)
        yield from (requests, latency, tokens, cost, feedback)
        yield from self._windows()
        yield from self._store_counters()

    def _windows(self) -> Iterator[Metric]:
        families = {
            "requests": GaugeMetricFamily(
                "promptd_window_requests_per_second",
                "Request rate over the trailing window.",
                labels=["prompt", "variant", "window"],
            ),
            "success": GaugeMetricFamily(
                "promptd_window_success_ratio",
                "Share of successful calls over the trailing window.",
                labels=["prompt", "variant", "window"],
            ),
            "p95": GaugeMetricFamily(
                "promptd_window_latency_p95_seconds",
                "95th percentile latency over the trailing window (relative error bound "
                "of the monitor's histogram).",
                labels=["prompt", "variant", "window"],
            ),
            "feedback": GaugeMetricFamily(
                "promptd_window_feedback_score_mean",
                "Mean feedback score over the trailing window.",
                labels=["prompt", "variant", "window"],
            ),
        }
        for (prompt, variant, window), s in list(self._export.windows.items()):
            labels = [prompt, variant, window]
            families["requests"].add_metric(labels, s.request_rate)
            if s.success_rate is not None:
                families["success"].add_metric(labels, s.success_rate)
            if s.latency_p95 is not None:
                families["p95"].add_metric(labels, s.latency_p95 / 1000.0)
            if s.feedback_mean is not None:
                families["feedback"].add_metric(labels, s.feedback_mean)
        yield from families.values()

    def _store_counters(self) -> Iterator[Metric]:
        ex = self._export
        yield CounterMetricFamily(
            "promptd_monitor_late_events",
            "Events more than lateness_s behind their batch's window watermark, or older "
            "than every window tier: stored, not windowed.",
            value=ex.late_events(),
        )
        yield CounterMetricFamily(
            "promptd_monitor_future_events",
            "Events stamped more than max_future_s after they were stored: stored, not windowed.",
            value=ex.future_events(),
        )
        yield CounterMetricFamily(
            "promptd_monitor_label_overflow_events",
            "Events exported under the label value 'other' (label cardinality cap).",
            value=ex.labels.overflowed,
        )


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class MonitorExport:
    """Every metric of the monitor, on ``registry``."""

    def __init__(self, registry: CollectorRegistry, cardinality_cap: int = 200) -> None:
        self.labels = LabelCap(cardinality_cap)
        self.traffic: dict[_Triple, _Traffic] = {}
        self.feedback: dict[_Pair, tuple[int, float]] = {}
        #: Latest windowed stats per (prompt, variant, window label), set after evaluation.
        self.windows: dict[tuple[str, str, str], WindowStats] = {}
        self._late = 0
        self._future = 0
        registry.register(_TrafficCollector(self))
        self.alerts_firing = Gauge(
            "promptd_alerts_firing",
            "Alerts currently firing, by rule and severity.",
            ["alertname", "severity"],
            registry=registry,
        )
        self.alerts_pending = Gauge(
            "promptd_alerts_pending",
            "Alerts whose condition holds but not yet for the rule's `for`.",
            ["alertname"],
            registry=registry,
        )
        self.notifications = Counter(
            "promptd_alert_notifications_total",
            "Alert notifications handed to a sink, by sink and state.",
            ["sink", "state"],
            registry=registry,
        )
        self.sink_failures = Counter(
            "promptd_alert_sink_failures_total",
            "Notifications a sink failed to deliver after all retries.",
            ["sink"],
            registry=registry,
        )
        self.sink_dropped = Counter(
            "promptd_alert_sink_dropped_total",
            "Notifications dropped because a sink's queue was full.",
            ["sink"],
            registry=registry,
        )
        self.evaluation_duration = Histogram(
            "promptd_monitor_evaluation_duration_seconds",
            "Time of one evaluation round of every alert rule.",
            buckets=_EVAL_BUCKETS,
            registry=registry,
        )
        self.evaluation_failures = Counter(
            "promptd_monitor_evaluation_failures_total",
            "Evaluation rounds that raised (logged; the monitor keeps running).",
            registry=registry,
        )
        self.series = Gauge(
            "promptd_monitor_series",
            "Prompt/variant/model series held in the sliding windows.",
            registry=registry,
        )
        self.triggers = Counter(
            "promptd_monitor_optimization_triggers_total",
            "Optimization triggers handed to the optimizer, by kind.",
            ["kind"],
            registry=registry,
        )
        self.snapshot_seconds = Gauge(
            "promptd_monitor_snapshot_duration_seconds",
            "Time the last snapshot of the windows took (encode and save).",
            registry=registry,
        )
        self.snapshot_bytes = Gauge(
            "promptd_monitor_snapshot_bytes",
            "Size of the last snapshot of the windows saved to the database.",
            registry=registry,
        )
        self.snapshot_failures = Counter(
            "promptd_monitor_snapshot_failures_total",
            "Snapshots of the windows that failed (logged; retried at the next interval).",
            registry=registry,
        )

    def sinks(self, names: Iterable[str]) -> None:
        """Pre-create the per-sink series so they show as 0 before the first failure."""
        for name in names:
            self.sink_failures.labels(sink=name)
            self.sink_dropped.labels(sink=name)

    def set_store_counters(self, late: int, future: int) -> None:
        """Copy the window store's counters (read on the loop, exposed at scrape)."""
        self._late = late
        self._future = future

    def late_events(self) -> int:
        """Late events counted so far."""
        return self._late

    def future_events(self) -> int:
        """Future events counted so far."""
        return self._future

    def observe_batch(
        self,
        metrics: Sequence[MetricRow],
        feedback: Sequence[FeedbackRow],
        credits: Sequence[tuple[float, str, str, float]] = (),
    ) -> None:
        """Add one stored batch to the per-series counters; feedback on a whole episode
        counts once per call it is ``credits``-ed to, as ``(ts, prompt, variant, score)``."""
        traffic = self.traffic
        triple = self.labels.triple
        bounds = _LATENCY_BUCKETS_MS
        # Rows unpack in column order (storage.rows): the fastest access CPython has.
        for _, _, p, v, m, _, _, lat, ok, _, _, tin, tout, cost, _, _, _, _, _, _ in metrics:
            key = triple(p, v, m)
            t = traffic.get(key)
            if t is None:
                t = traffic[key] = _Traffic()
            t.requests += 1
            if not ok:
                t.errors += 1
            t.lat_buckets[bisect.bisect_left(bounds, lat)] += 1
            t.lat_sum += lat
            t.tin += tin or 0
            t.tout += tout or 0
            t.cost += cost or 0.0
        fb = self.feedback
        value = self.labels.value
        scored = [(row[2], row[3], row[6]) for row in feedback if row[5] is not None]
        scored += [(prompt, variant, score) for _, prompt, variant, score in credits]
        for prompt, variant, score in scored:
            pair = (value("prompt", prompt or ""), value("variant", variant or ""))
            n, total = fb.get(pair, (0, 0.0))
            fb[pair] = (n + 1, total + score)

    def set_windows(self, stats: Iterable[tuple[str, WindowStats]]) -> None:
        """Replace the windowed gauges with ``(window label, stats)`` of variant series
        (capped labels; series beyond the cap are not exported as gauges)."""
        out: dict[tuple[str, str, str], WindowStats] = {}
        for window, s in stats:
            prompt = self.labels.value("prompt", s.key.prompt)
            variant = self.labels.value("variant", s.key.variant or "")
            if OTHER in (prompt, variant):
                continue
            out[(prompt, variant, window)] = s
        self.windows = out
