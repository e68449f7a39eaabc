"""Settings of the monitor (the ``[monitoring]`` section).

Every field has a default that suits a production service with the default window tiers
(5 s / 30 s / 5 min / 1 h buckets serving 1 m / 5 m / 1 h / 24 h windows); tests shrink the
intervals to make the lifecycle run in seconds.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .windows import Tier, WindowConfig, _default_tiers


class WebhookSettings(BaseModel):
    """A generic JSON webhook: one POST per notification."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Where to POST; no webhook when unset.
    url: str | None = None
    # Per-attempt timeout (seconds).
    timeout_s: float = Field(default=5.0, gt=0)
    # Attempts after the first one; the delay doubles from retry_backoff_s each time.
    retries: int = Field(default=3, ge=0)
    retry_backoff_s: float = Field(default=0.5, ge=0)
    # Extra request headers (e.g. an Authorization header for the receiving service).
    headers: dict[str, str] = Field(default_factory=dict)


class AlertmanagerSettings(BaseModel):
    """Push to Prometheus Alertmanager's v2 API (``POST /api/v2/alerts``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Base URL, e.g. "http://alertmanager:9093"; no push when unset.
    url: str | None = None
    timeout_s: float = Field(default=5.0, gt=0)
    retries: int = Field(default=3, ge=0)
    retry_backoff_s: float = Field(default=0.5, ge=0)
    # Alertmanager drops a firing alert it has not heard of for `resolve_timeout`; the
    # monitor re-pushes every firing alert this often (Prometheus does the same).
    resend_interval_s: float = Field(default=60.0, gt=0)
    # The generatorURL shown in Alertmanager's UI (e.g. the daemon's /v1/alerts).
    generator_url: str = ""


class MonitoringSettings(BaseModel):
    """Windows, alert rules, sinks and the optimization trigger thresholds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Set false to run the daemon without windows, alerts and per-prompt metrics.
    enabled: bool = True
    # Window tiers, finest first: each serves windows up to its retention; the last one is
    # the trailing baseline of relative rules. Memory per series is sum(retention / bucket).
    tiers: tuple[Tier, ...] = Field(default_factory=_default_tiers, min_length=1)
    # An event up to this much older than its batch's window watermark (the event time
    # every partition with records left had reached, see monitoring/eventtime.py) still
    # lands in its bucket; older ones are stored and counted
    # (promptd_monitor_late_events_total) only. Partitions read in order never have one.
    lateness_s: float = Field(default=30.0, ge=0)
    # An event stamped after it was stored counts at the time it was stored; one stamped
    # more than this after is not windowed (a producer's clock is wrong).
    max_future_s: float = Field(default=300.0, gt=0)
    # Relative accuracy of latency quantiles (log-bucketed histogram).
    quantile_relative_error: float = Field(default=0.02, gt=0, lt=0.5)
    # Alert rules (see docs/monitoring.md); validated at start, errors name rule and field.
    rules: list[dict[str, Any]] = Field(default_factory=list)
    # How often rules are evaluated (seconds). Detection latency is about this plus the
    # ingestion batch time.
    evaluation_interval_s: float = Field(default=5.0, gt=0)
    # Evaluation rounds that take longer than this are logged (monitor_evaluation_slow).
    slow_evaluation_s: float = Field(default=1.0, gt=0)
    # Rebuild at start: raw events of this many trailing seconds are replayed into the
    # windows; older history (up to the baseline) is loaded as hourly SQL aggregates, which
    # restore counts, rates and means but not latency quantiles (see docs/monitoring.md).
    rebuild_horizon_s: float = Field(default=3600.0, ge=0)
    # Save the windows to the database this often (seconds), and at a clean stop, so that
    # a start replays only the events stored since (a crash replays at most this much
    # traffic). 0 turns snapshots off: every start then rebuilds as above.
    snapshot_interval_s: float = Field(default=60.0, ge=0)
    # Keep alert_history rows this long (seconds); /v1/alerts shows the recent ones.
    history_retention_s: float = Field(default=7 * 86400.0, gt=0)
    # Emit alert notifications as JSON on kafka.alerts_topic.
    kafka_sink: bool = True
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    alertmanager: AlertmanagerSettings = Field(default_factory=AlertmanagerSettings)
    # Notifications waiting for a slow sink; beyond this the oldest is dropped and counted.
    sink_queue_size: int = Field(default=1000, ge=1)
    # Distinct prompt/variant/model label values exported to Prometheus per label; later
    # new values are exported as "other" (bounded cardinality: names come from events).
    label_cardinality_cap: int = Field(default=200, ge=1)
    # Windows exported as gauges (promptd_window_*), in seconds; each must fit the tiers.
    export_windows_s: tuple[float, ...] = (300.0,)
    # A relative (degradation) alert fires when a metric drops this fraction below the
    # baseline; used for the default degradation rule and passed to the optimizer.
    performance_degradation_threshold: float = Field(default=0.15, gt=0, lt=1)
    # New feedback events for one prompt that trigger an optimization run.
    feedback_volume_threshold: int = Field(default=50, ge=1)
    # Add the built-in degradation rule (feedback_mean drops by
    # performance_degradation_threshold over 5 m against the 24 h baseline, per prompt).
    default_degradation_rule: bool = True

    @model_validator(mode="after")
    def _windows_fit(self) -> MonitoringSettings:
        config = self.window_config()  # raises on badly nested tiers
        for window in self.export_windows_s:
            if window <= 0 or window > config.baseline_seconds:
                raise ValueError(f"export_windows_s: {window:g} s does not fit the tiers")
        return self

    def window_config(self) -> WindowConfig:
        """The :class:`WindowConfig` these settings describe."""
        return WindowConfig(
            tiers=self.tiers,
            lateness_seconds=self.lateness_s,
            max_future_seconds=self.max_future_s,
            relative_error=self.quantile_relative_error,
        )

    def rule_dicts(self) -> list[dict[str, Any]]:
        """The configured rules plus the built-in degradation rule (unless one is named
        ``feedback_degradation`` already or it is switched off)."""
        rules = list(self.rules)
        names = {r.get("name") for r in rules if isinstance(r, dict)}
        baseline = self.window_config().baseline_seconds
        if self.default_degradation_rule and "feedback_degradation" not in names:
            window = min(300.0, baseline / 2)
            rules.append(
                {
                    "name": "feedback_degradation",
                    "kind": "relative",
                    "metric": "feedback_mean",
                    "drop": self.performance_degradation_threshold,
                    "window": window,
                    "baseline_window": baseline,
                    "min_samples": 20,
                    "for": 0,
                    "severity": "warning",
                    "description": "feedback score dropped against the trailing baseline",
                }
            )
        return rules
