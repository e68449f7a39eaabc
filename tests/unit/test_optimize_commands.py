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


def test_optimize_command_sends_the_runs_budget() -> None:
    """Budget flags become the request's ``budget``; without them there is none."""
    parser = argparse.ArgumentParser()
    handlers = commands_optimize.register(parser.add_subparsers(dest="command"))
    assert "optimize" in handlers
    args = parser.parse_args(
        ["optimize", "p", "--max-llm-calls", "50", "--max-cost-usd", "0.5", "--max-minutes", "3"]
    )
    body = commands_optimize.request_body(args)
    assert body["budget"] == {"max_llm_calls": 50, "max_cost_usd": 0.5, "timeout_minutes": 3.0}
    plain = commands_optimize.request_body(parser.parse_args(["optimize", "p"]))
    assert "budget" not in plain


def test_an_unscored_candidate_is_said_once_with_the_setting() -> None:
    """A run without an evaluation model: its summary says in one line that the candidate
    is unscored and which setting would score it, and does not repeat it."""
    note = (
        "the candidate is unscored: no evaluation model is configured "
        "([optimization.evaluation.model] would score it on validation and gate it on test)"
    )
    run = {
        "id": "opt-1",
        "status": "completed",
        "outcome": "deployed",
        "cost_usd": 0.0,
        "llm_calls": 0,
        "selection": {"strategy": "fewshot", "method": "manual", "reason": "requested"},
        "progress": {"unscored": True, "notes": [note, "fewshot: other"]},
        "candidates": [{"index": 0, "strategy": "fewshot", "val_mean": None}],
        "gate": None,
        "deployed_version": "v2",
        "rollout_id": "ro-1",
        "error": f"{note}; fewshot: other",
    }
    text = commands_optimize.summary(run)
    assert text.count("[optimization.evaluation.model]") == 1
    assert f"  {note}\n" in text
    assert text.rstrip().endswith("fewshot: other")
