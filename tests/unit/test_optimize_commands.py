"""The optimization CLI: argument parsing and the pure recommendation rules."""

from __future__ import annotations

import argparse

from promptd.daemon.api.optimize import recommend
from promptd.daemon.cli import optimize as commands_optimize
from promptd.monitoring.triggers import OptimizationTrigger
from promptd.optimization.policy import Decision


def test_optimize_command_parses_repeated_strategies() -> None:
    """`promptd optimize P --strategy a --strategy b` reaches the optimize handler."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    handlers = commands_optimize.register(sub)
    args = parser.parse_args(["optimize", "p", "--strategy", "fewshot", "--strategy", "gepa"])
    assert args.strategy == ["fewshot", "gepa"]
    assert set(handlers) == {"optimize", "optimizations", "recommendations"}


def test_recommendations_cover_stuck_degrading_and_waiting() -> None:
    """Paused rollouts, unresolved degradation and waiting candidates are each reported."""
    rollouts = [
        {"id": "ro-1", "prompt": "a", "status": "paused", "weight": 0.25, "updated_at": 0.0},
    ]
    runs = [
        {
            "id": "opt-1",
            "prompt": "b",
            "status": "completed",
            "outcome": "no_candidate",
            "error": None,
        }
    ]
    triggers = [
        (
            OptimizationTrigger("b", "degradation", 0.0, "score -30%"),
            Decision(False, "cooldown", "next run in 3h"),
        )
    ]
    items = recommend({"c": ["v3"], "a": ["v9"]}, rollouts, runs, triggers, now=100.0)
    assert [(i["prompt"], i["issue"]) for i in items] == [
        ("a", "rollout_stuck"),
        ("b", "degrading"),
        ("c", "candidate_waiting"),
    ]
    assert "promptd rollout start c v3" in items[2]["action"]
