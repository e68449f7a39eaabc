"""A rollout view (``GET /v1/rollouts/{id}``) as the rows ``promptd rollout status`` prints.

Pure formatting, so the text is tested without a daemon: where the rollout stands (its
step and traffic share while live, its outcome once ended), each arm's samples and
means, and the current test figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Rows = list[tuple[str, str]]

_ENDED = {
    "promoted": "ended: {candidate} was promoted and serves all traffic",
    "rolled_back": "ended: rolled back, {baseline} serves all traffic",
    "no_improvement": "ended without a significant win: {baseline} stays active",
}


def rollout_rows(body: Mapping[str, Any]) -> Rows:
    """Every row of one rollout, in reading order."""
    rows: Rows = [("rollout", str(body["id"]))]
    if body.get("pipeline"):
        rows.append(("pipeline", str(body["pipeline"])))
        rows += [
            (f"  {m['prompt']}", f"{m['baseline']} → {m['candidate'] or '(unchanged)'}")
            for m in body["members"]
        ]
    else:
        rows.append(("prompt", str(body["prompt"])))
        rows.append(
            ("baseline → candidate", f"{body['baseline_version']} → {body['candidate_version']}")
        )
    rows.append(("status", _status(body)))
    rows.append(("traffic", traffic(body)))
    rows += _arms(body)
    rows += _test(body)
    last = body["decisions"][-1] if body.get("decisions") else {}
    rows.append(("last decision", f"{last.get('kind', '-')}: {last.get('reason', '-')}"))
    return rows


def _status(body: Mapping[str, Any]) -> str:
    status = str(body["status"])
    if body.get("require_win"):
        status += "  (promotes only on a significant win)"
    starvation = body.get("starvation") or {}
    if starvation.get("starved"):
        status += f"  STARVED for {starvation['starving_for_s']:.0f}s"
    return status


def traffic(body: Mapping[str, Any]) -> str:
    """Where the rollout stands: its step and candidate share, or how it ended."""
    status = body["status"]
    ended = _ENDED.get(status)
    if ended is not None:
        return ended.format(candidate=body["candidate_version"], baseline=body["baseline_version"])
    if status == "pending":
        return "not started yet"
    share = f"step {int(body['step']) + 1}, {float(body['weight']):.0%} of units on the candidate"
    return f"paused at {share}" if status == "paused" else share


def _arms(body: Mapping[str, Any]) -> Rows:
    arms = body.get("arms")
    if not arms:
        return [("arms", "no samples")]
    metric = body.get("primary_metric", "primary")
    return [(f"  {name}", _arm(arms[name], metric)) for name in ("baseline", "candidate")]


def _arm(arm: Mapping[str, Any], metric: str) -> str:
    parts = [f"{arm['requests']} requests", f"{arm['primary_samples']} {metric} samples"]
    if arm.get("primary_mean") is not None:
        parts[-1] += f" (mean {arm['primary_mean']:.3f})"
    if arm.get("error_rate") is not None:
        parts.append(f"errors {arm['error_rate']:.1%}")
    if arm.get("latency_geomean_ms") is not None:
        parts.append(f"latency {arm['latency_geomean_ms']:.0f} ms (geometric mean)")
    if arm.get("cost_per_request") is not None:
        parts.append(f"${arm['cost_per_request']:.5f} per request")
    return ", ".join(parts)


def _test(body: Mapping[str, Any]) -> Rows:
    stats = body.get("statistics") or {}
    rows: Rows = []
    if stats.get("primary_diff") is not None:
        figures = f"candidate − baseline {stats['primary_diff']:+.4f}"
        if stats.get("primary_se") is not None:
            figures += f" (standard error {stats['primary_se']:.4f})"
        p_values = [
            f"{label} {stats[key]:.3f}"
            for key, label in (("primary_p_worse", "worse"), ("primary_p_better", "better"))
            if stats.get(key) is not None
        ]
        if p_values:
            figures += "; always-valid p: " + ", ".join(p_values)
        rows.append(("test", figures))
    if stats.get("step_n_baseline") is not None:
        rows.append(
            (
                "this step",
                f"{stats['step_n_baseline']} / {stats['step_n_candidate']} samples "
                f"(baseline / candidate), {float(stats.get('step_elapsed_s', 0.0)):.0f} s in",
            )
        )
    winner = body.get("winner")
    rows.append(("significantly better", str(winner) if winner else "neither (yet)"))
    return rows
