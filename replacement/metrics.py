"""Prometheus metrics of the rollout controller (on the daemon's registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["DECISION_KINDS", "FEEDBACK_OUTCOMES", "RolloutMetrics"]

DECISION_KINDS = (
    "start",
    "advance",
    "hold",
    "promote",
    "rollback",
    "no_improvement",
    "pause",
    "resume",
)
FEEDBACK_OUTCOMES = ("joined", "unmatched")


class RolloutMetrics:
    """Prometheus metrics of rollouts."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.weight = Gauge(
            "promptd_rollout_candidate_weight",
            "Share of traffic (0..1) routed to the candidate of the prompt's live rollout.",
            ["prompt"],
            registry=registry,
        )
        self.step = Gauge(
            "promptd_rollout_step",
            "Index of the current step of the prompt's live rollout.",
            ["prompt"],
            registry=registry,
        )
        self.decisions = Counter(
            "promptd_rollout_decisions_total",
            "Rollout decisions by kind (start, advance, promote, rollback, pause, …).",
            ["prompt", "kind"],
            registry=registry,
        )
        self.live = Gauge("promptd_rollouts_live", "Rollouts running or paused.", registry=registry)
        self.routing_publish_failures = Counter(
            "promptd_routing_publish_failures_total",
            "Failed publications to the routing topic (retried next tick).",
            registry=registry,
        )
        self.starved = Gauge(
            "promptd_rollout_starved",
            "1 while the prompt's live rollout is starved past its grace period (alerted).",
            ["prompt"],
            registry=registry,
        )
        self.starving_seconds = Gauge(
            "promptd_rollout_starving_seconds",
            "Seconds the prompt's live rollout has lacked samples for its step (0 when fed).",
            ["prompt"],
            registry=registry,
        )
        self.variance_reduction = Gauge(
            "promptd_rollout_variance_reduction",
            "Share of the variance of the prompt's live rollout's test on a metric (primary, "
            "log_latency, errors, cost) removed by regression adjustment on pre-treatment "
            "covariates (CUPED) at the last tick: 0.25 means a quarter fewer samples.",
            ["prompt", "metric"],
            registry=registry,
        )
        self.feedback = Counter(
            "promptd_rollout_feedback_total",
            "Feedback of live rollouts' prompts: joined to its call, or unmatched (its call "
            "is outside the rollout, never came, or was stored too long before).",
            ["prompt", "outcome"],
            registry=registry,
        )
        self.paused_by_check = Gauge(
            "promptd_rollout_paused_by_check",
            "1 while the prompt's live rollout is paused by a check of the rollout "
            "(check: judge_drift), until it is resumed, promoted or rolled back.",
            ["prompt", "check"],
            registry=registry,
        )
