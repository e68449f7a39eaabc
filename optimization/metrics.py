"""Prometheus metrics of the optimizer, on the daemon's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class OptimizationMetrics:
    """Counters and gauges of triggers, runs, candidates, the gate, spend and learning."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.triggers = Counter(
            "promptd_optimization_triggers_total",
            "Optimization triggers by kind and policy decision",
            ["kind", "decision"],
            registry=registry,
        )
        self.runs = Counter(
            "promptd_optimization_runs_total",
            "Finished optimization runs by status and outcome",
            ["status", "outcome"],
            registry=registry,
        )
        self.selected = Counter(
            "promptd_optimization_strategy_selected_total",
            "Runs started, by the strategy chosen and how it was chosen",
            ["strategy", "method"],
            registry=registry,
        )
        self.candidates = Counter(
            "promptd_optimization_candidates_total",
            "Candidates by strategy and result (scored, discarded)",
            ["strategy", "result"],
            registry=registry,
        )
        self.gate = Counter(
            "promptd_optimization_gate_total",
            "Gate decisions by strategy and result (passed, low_confidence, small_gain, ...)",
            ["strategy", "result"],
            registry=registry,
        )
        self.online = Counter(
            "promptd_optimization_online_results_total",
            "Ended optimizer rollouts by strategy and result (win, no_win)",
            ["strategy", "result"],
            registry=registry,
        )
        self.cache = Counter(
            "promptd_optimization_llm_cache_total",
            "Model calls answered from the persistent cache (hit) or paid for (miss)",
            ["result"],
            registry=registry,
        )
        self.llm_calls = Counter(
            "promptd_optimization_llm_calls_total",
            "LLM calls paid for by the optimizer",
            registry=registry,
        )
        self.cost = Counter(
            "promptd_optimization_cost_usd_total", "LLM spend by the optimizer", registry=registry
        )
        self.resumed = Counter(
            "promptd_optimization_resumed_total",
            "Runs resumed after a restart",
            registry=registry,
        )
        self.running = Gauge(
            "promptd_optimization_running", "Optimization runs in progress", registry=registry
        )
