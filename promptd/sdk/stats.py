"""Delivery accounting of the app-side SDK, and its Prometheus export.

The invariant ``emitted == delivered + dropped + buffered`` holds in every snapshot: all
counters and the buffer change under one lock, so a reader never sees an event in flight
between two counters. Prometheus reads the same snapshot through a custom collector at
scrape time, which keeps the hot path at a few integer increments.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

#: Stable ``reason`` values of dropped events.
DROP_REASONS = (
    "queue_full",  # the bounded buffer was full (the newest event is the one dropped)
    "no_bootstrap",  # no Kafka address configured: the SDK publishes nothing
    "invalid",  # the sender could not build a valid event (e.g. a name too long)
    "send_failed",  # the broker did not take the batch after the retries
    "unknown_request",  # feedback for a request id the SDK does not remember
    "shutdown",  # still buffered when the exit flush ran out of time
)


@dataclass(frozen=True, slots=True)
class SdkStats:
    """A consistent snapshot of the SDK counters (see the module docstring)."""

    emitted: int
    delivered: int
    dropped: int
    buffered: int
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    routing_fetches: int = 0
    routing_failures: int = 0

    @property
    def consistent(self) -> bool:
        """True when ``emitted == delivered + dropped + buffered``."""
        return self.emitted == self.delivered + self.dropped + self.buffered


class Counters:
    """Mutable counters guarded by ``lock``; the publisher holds the lock while it mutates."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.emitted = 0
        self.delivered = 0
        self.in_flight = 0
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.errors: dict[str, int] = {}
        # The last exception text per place (``connect``, ``send``), for the exit summary.
        self.last_errors: dict[str, str] = {}
        self.routing_fetches = 0
        self.routing_failures = 0

    def reset_after_fork(self) -> None:
        """In a forked child: fresh lock and zeroed counters (the parent owns its events)."""
        self.__init__()  # type: ignore[misc]

    def error(self, where: str, exc: BaseException | None = None) -> None:
        """Count an internal SDK error (never raised to the app); keep ``exc``'s text."""
        with self.lock:
            self.errors[where] = self.errors.get(where, 0) + 1
            if exc is not None:
                text = str(exc)
                name = type(exc).__name__
                if not text.startswith(name):  # aiokafka's errors already name their type
                    text = f"{name}: {text}" if text else name
                self.last_errors[where] = text[:300]

    def snapshot(self, queued: int) -> SdkStats:
        """Build a snapshot; call with ``lock`` held so that ``queued`` matches."""
        dropped = dict(self.dropped)
        return SdkStats(
            emitted=self.emitted,
            delivered=self.delivered,
            dropped=sum(dropped.values()),
            buffered=queued + self.in_flight,
            dropped_by_reason=dropped,
            errors=dict(self.errors),
            routing_fetches=self.routing_fetches,
            routing_failures=self.routing_failures,
        )


class StatsCollector:
    """A prometheus-client collector that reports an :class:`SdkStats` source at scrape time."""

    def __init__(self, source: Any) -> None:
        # ``source`` is a zero-argument callable returning SdkStats (the client's stats()).
        self._source = source

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (prometheus-client collector protocol)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats: SdkStats = self._source()
        yield CounterMetricFamily(
            "promptd_sdk_events_emitted", "Events the app emitted.", value=stats.emitted
        )
        yield CounterMetricFamily(
            "promptd_sdk_events_delivered",
            "Events acknowledged by Kafka.",
            value=stats.delivered,
        )
        dropped = CounterMetricFamily(
            "promptd_sdk_events_dropped", "Events dropped, by reason.", labels=["reason"]
        )
        for reason, count in stats.dropped_by_reason.items():
            dropped.add_metric([reason], count)
        yield dropped
        yield GaugeMetricFamily(
            "promptd_sdk_events_buffered",
            "Events in memory, not yet delivered or dropped.",
            value=stats.buffered,
        )
        errors = CounterMetricFamily(
            "promptd_sdk_errors", "Internal SDK errors, caught and counted.", labels=["where"]
        )
        for where, count in stats.errors.items():
            errors.add_metric([where], count)
        yield errors
