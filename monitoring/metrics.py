"""Prometheus metric definitions of the daemon, built against a registry passed in.

Nothing registers on the global registry: the daemon creates one ``CollectorRegistry``
and every test creates a fresh one. Names follow Prometheus conventions (``promptd_``
prefix, base units, ``_total`` for counters).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class IngestMetrics:
    """Metrics of Kafka ingestion and storage."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge("promptd_up", "1 while the daemon process runs.", registry=registry)
        self.up.set(1)
        self.consumed = Counter(
            "promptd_events_consumed_total",
            "Kafka records consumed from the event topics.",
            ["topic"],
            registry=registry,
        )
        self.stored = Counter(
            "promptd_events_stored_total",
            "Events newly written to storage.",
            ["type"],
            registry=registry,
        )
        self.duplicates = Counter(
            "promptd_events_duplicates_total",
            "Events ignored because their event_id was already stored.",
            registry=registry,
        )
        self.dead_lettered = Counter(
            "promptd_events_dead_lettered_total",
            "Records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=registry,
        )
        self.otlp = Counter(
            "promptd_otlp_spans_total",
            "OpenTelemetry spans read from the OTLP topic, by outcome (call, not_llm, "
            "no_prompt, published_by_sdk, invalid) and the feedback found on them "
            "(feedback, feedback_unscored).",
            ["outcome"],
            registry=registry,
        )
        self.batch_duration = Histogram(
            "promptd_ingest_batch_duration_seconds",
            "Time to decode, dead-letter and store one consumed batch.",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.lag = Gauge(
            "promptd_consumer_lag_messages",
            "Records behind the partition's high-water mark.",
            ["topic", "partition"],
            registry=registry,
        )
        self.kafka_connected = Gauge(
            "promptd_kafka_connected",
            "1 when the last broker round trip succeeded.",
            registry=registry,
        )
        self.consumer_stalled = Gauge(
            "promptd_consumer_stalled",
            "1 when the consumer holds partitions with lag but made no progress.",
            registry=registry,
        )
        self.commit_failures = Counter(
            "promptd_kafka_commit_failures_total",
            "Offset commits to Kafka that failed or timed out (storage is unaffected).",
            registry=registry,
        )
        self.offset_resets = Counter(
            "promptd_kafka_offset_resets_total",
            "Partitions re-read from their start because the stored offset lay past the log "
            "(the broker or topic started over).",
            ["topic", "reason"],
            registry=registry,
        )
        self.undecodable_batches = Counter(
            "promptd_kafka_undecodable_batches_total",
            "Record batches that could not be decoded (ingestion halts on them).",
            registry=registry,
        )
        self.retention_deleted = Counter(
            "promptd_retention_deleted_events_total",
            "Raw events deleted by the retention policy.",
            registry=registry,
        )
        for reason in (
            "oversized",
            "not_json",
            "not_object",
            "unknown_type",
            "unknown_schema",
            "invalid",
        ):
            self.dead_lettered.labels(reason=reason)
        for kind in ("metric", "feedback"):
            self.stored.labels(type=kind)
