"""Prometheus metrics of online evaluation, on the daemon's registry (never the global one).

Evaluator names come from the configuration (bounded); prompt names come from events and
are capped (:class:`~promptd.monitoring.export.LabelCap`: the rest is ``other``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from promptd.monitoring.export import LabelCap

SKIP_REASONS = (
    "budget_rate",
    "budget_cost",
    "queue_full",
    "outage",
    "error",
    "no_output",
    "only_if",
)


class EvaluationMetrics:
    """Every evaluation metric, registered once per daemon."""

    def __init__(self, registry: CollectorRegistry, cardinality_cap: int = 200) -> None:
        self.labels = LabelCap(cardinality_cap)
        self.sampled = Counter(
            "promptd_evaluation_sampled_total",
            "Stored calls an evaluator's sample took",
            ["evaluator"],
            registry=registry,
        )
        self.results = Counter(
            "promptd_evaluation_results_total",
            "Evaluation results stored, by status (scored: published as feedback; invalid: "
            "the judge's answer had no readable score)",
            ["evaluator", "status"],
            registry=registry,
        )
        self.skipped = Counter(
            "promptd_evaluation_skipped_total",
            "Sampled calls not evaluated, by reason (budget_rate, budget_cost, queue_full, "
            "outage, error, no_output, only_if)",
            ["evaluator", "reason"],
            registry=registry,
        )
        self.score = Histogram(
            "promptd_evaluation_score",
            "Scores (0..1) of stored evaluation results",
            ["evaluator"],
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=registry,
        )
        self.cost = Counter(
            "promptd_evaluation_cost_usd_total",
            "Dollars spent by evaluators (litellm's price of the judge's calls)",
            ["evaluator"],
            registry=registry,
        )
        self.duration = Histogram(
            "promptd_evaluation_duration_seconds",
            "Time to evaluate one call with one evaluator",
            ["evaluator"],
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.up = Gauge(
            "promptd_evaluator_up",
            "1 while the evaluator works, 0 during an outage (failures in a row)",
            ["evaluator"],
            registry=registry,
        )
        self.queue = Gauge(
            "promptd_evaluation_queue_depth",
            "Sampled calls waiting for evaluation",
            registry=registry,
        )
        self.pending = Gauge(
            "promptd_evaluation_pending_calls",
            "Sampled calls taken and not yet decided (queued or being evaluated)",
            registry=registry,
        )
        self.published = Counter(
            "promptd_evaluation_published_total",
            "Results published to the feedback topic (and acknowledged)",
            registry=registry,
        )
        self.publish_failures = Counter(
            "promptd_evaluation_publish_failures_total",
            "Attempts to publish results that failed (they are retried)",
            registry=registry,
        )
        self.unpublished = Gauge(
            "promptd_evaluation_unpublished",
            "Stored results the broker has not acknowledged yet (last outbox round)",
            registry=registry,
        )
        self.agreement = Gauge(
            "promptd_evaluator_agreement",
            "Agreement of an evaluator with people's feedback on the same calls over the "
            "trailing window: statistic spearman or kappa, bound estimate, low or high",
            ["evaluator", "prompt", "statistic", "bound"],
            registry=registry,
        )
        self.agreement_pairs = Gauge(
            "promptd_evaluator_agreement_pairs",
            "Calls with both a human score and the evaluator's, in the trailing window",
            ["evaluator", "prompt"],
            registry=registry,
        )
        self.agreement_low = Gauge(
            "promptd_evaluator_agreement_below_floor",
            "1 while a judge's agreement is below its floor with the interval's confidence",
            ["evaluator", "prompt"],
            registry=registry,
        )

    def zero(self, evaluator: str) -> None:
        """Create the evaluator's counters at 0, so that rates and increases have a series
        from the start (Prometheus cannot see a counter's first increment otherwise)."""
        self.sampled.labels(evaluator=evaluator)
        self.cost.labels(evaluator=evaluator)
        for status in ("scored", "invalid"):
            self.results.labels(evaluator=evaluator, status=status)
        for reason in SKIP_REASONS:
            self.skipped.labels(evaluator=evaluator, reason=reason)

    def prompt(self, name: str) -> str:
        """The exported value of a prompt name (capped)."""
        return self.labels.value("prompt", name)
