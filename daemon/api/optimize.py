"""HTTP routes of the optimizer.

* ``POST /v1/optimize/{prompt}`` (admin) — start a manual run; body ``{"strategies": [...],
  "reason": "...", "budget": {"max_llm_calls", "max_tokens", "max_cost_usd",
  "timeout_minutes"}}`` (all optional; the budget within the configured per-run maximum,
  else 422 naming the setting). ``{prompt}`` may name a pipeline, and a prompt that
  belongs to a pipeline is optimized with its pipeline (leader/follower). 202 with the run
  id, the run's budget and, without an evaluation model, a ``warning`` that its candidate
  will reach traffic unscored; 404 for an unknown prompt or one without an active
  version; 409 when the policy refuses (``reason`` says why).
* ``GET /v1/optimizations[?prompt=&limit=]`` — runs, newest first, with cost, outcome, the
  strategy each used and why (``selection``), the gate's figures; and ``strategies``: what
  the bandit currently believes of each configured strategy (for ``prompt`` if given).
* ``GET /v1/optimizations/{run_id}`` — one run with its candidates (progress while running).
* ``GET /v1/recommendations`` — prompts that need attention, with the suggested action.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from promptd.daemon.http import json_error, read_body, require_admin
from promptd.monitoring.triggers import OptimizationTrigger
from promptd.optimization.outcomes import Outcome, RunStatus
from promptd.optimization.plan import BudgetRequest
from promptd.optimization.policy import Decision
from promptd.optimization.runner import OptimizationRunner, RunError
from promptd.replacement.controller import RolloutController
from promptd.replacement.registry import Registry

RUNNER_KEY: web.AppKey[OptimizationRunner] = web.AppKey("optimization_runner")
OPT_REGISTRY_KEY: web.AppKey[Registry] = web.AppKey("optimization_registry")
OPT_ROLLOUTS_KEY: web.AppKey[RolloutController] = web.AppKey("optimization_rollouts")

# A rollout that has not changed for this long is reported as stuck.
STUCK_AFTER_S = 24 * 3600.0
UNSCORED_WARNING = (
    "no evaluation model is configured: the candidate will not be scored before it reaches "
    "traffic (a conservative rollout that must win online decides); set "
    "[optimization.evaluation.model] to score and gate it, or without_evaluation = "
    '"reject" to keep unscored candidates off traffic'
)


class OptimizeRequest(BaseModel):
    """Body of ``POST /v1/optimize/{prompt}``."""

    model_config = ConfigDict(extra="forbid")

    # Checked against the strategy registry by the runner (400 naming the known ones).
    strategies: list[str] | None = Field(default=None, min_length=1, max_length=20)
    reason: str = Field(default="manual request", max_length=1000)
    # Checked against the configured per-run maximum by the runner (422 beyond it).
    budget: BudgetRequest | None = None


async def optimize(request: web.Request) -> web.Response:
    """Start a manual run."""
    denied = require_admin(request)
    if denied is not None:
        return denied
    body = await read_body(request, OptimizeRequest)
    prompt = request.match_info["prompt"]
    runner = request.app[RUNNER_KEY]
    try:
        decision, run_id = await runner.start_manual(
            prompt, body.strategies, body.reason, body.budget
        )
    except RunError as exc:
        return json_error(exc.status, str(exc), reason=exc.reason)
    answer: dict[str, Any] = {
        "run_id": run_id,
        "prompt": prompt,
        "status": RunStatus.RUNNING,
        "reason": decision.reason,
    }
    target = ((await runner.get_run(run_id)) or {}).get("target") or {}
    answer["budget"] = target.get("budget")
    settings = runner.settings
    if (
        settings.evaluation.model is None
        and settings.without_evaluation == "conservative_rollout"
        and target.get("kind") != "pipeline"
    ):
        answer["warning"] = UNSCORED_WARNING
    return web.json_response(answer, status=202)


async def list_optimizations(request: web.Request) -> web.Response:
    """Runs, newest first."""
    try:
        limit = min(max(int(request.query.get("limit", "50")), 1), 1000)
    except ValueError:
        return json_error(400, "limit must be an integer")
    runner = request.app[RUNNER_KEY]
    prompt = request.query.get("prompt")
    runs = await runner.list_runs(prompt, limit)
    return web.json_response({"runs": runs, "strategies": await runner.strategy_view(prompt)})


async def get_optimization(request: web.Request) -> web.Response:
    """One run."""
    run = await request.app[RUNNER_KEY].get_run(request.match_info["run_id"])
    if run is None:
        return json_error(404, f"no optimization run {request.match_info['run_id']!r}")
    return web.json_response(run)


async def recommendations(request: web.Request) -> web.Response:
    """Prompts that need attention."""
    runner = request.app[RUNNER_KEY]
    registry = request.app[OPT_REGISTRY_KEY]
    candidates: dict[str, list[str]] = {}
    for prompt in await registry.list_prompts():
        waiting = [
            v.version
            for v in await registry.versions(prompt.name)
            if v.status == "candidate" and v.origin.startswith("optimizer:")
        ]
        if waiting:
            candidates[prompt.name] = waiting
    rollouts = await request.app[OPT_ROLLOUTS_KEY].list()
    runs = await runner.list_runs(limit=200)
    items = recommend(candidates, rollouts, runs, runner.last_triggers.values(), time.time())
    return web.json_response({"recommendations": items})


def recommend(
    candidates: dict[str, list[str]],
    rollouts: Sequence[dict[str, Any]],
    runs: Sequence[dict[str, Any]],
    triggers: Iterable[tuple[OptimizationTrigger, Decision]],
    now: float,
) -> list[dict[str, Any]]:
    """Pure: one recommendation per problem found, most urgent kinds first."""
    out: list[dict[str, Any]] = []
    live = {r["prompt"] for r in rollouts if r["status"] in ("running", "paused")}
    for r in rollouts:
        stale = now - float(r["updated_at"]) > STUCK_AFTER_S
        if r["status"] == "paused" or (r["status"] == "running" and stale):
            out.append(
                {
                    "prompt": r["prompt"],
                    "issue": "rollout_stuck",
                    "detail": f"rollout {r['id']} is {r['status']} at weight {r['weight']}",
                    "action": f"promptd rollout resume {r['id']}  (or: rollback {r['id']})",
                }
            )
    latest: dict[str, dict[str, Any]] = {}
    for row in runs:  # newest first
        latest.setdefault(row["prompt"], row)
    for trigger, decision in triggers:
        if trigger.kind != "degradation" or trigger.prompt in live:
            continue
        run = latest.get(trigger.prompt)
        if run is not None and run["status"] == RunStatus.RUNNING:
            continue
        if run is None or run["outcome"] != Outcome.DEPLOYED:
            why = decision.detail if not decision.run else f"last run: {_run_text(run)}"
            out.append(
                {
                    "prompt": trigger.prompt,
                    "issue": "degrading",
                    "detail": f"{trigger.reason}; {why}",
                    "action": f"promptd optimize {trigger.prompt}  (or review its feedback)",
                }
            )
    for prompt, versions in sorted(candidates.items()):
        if prompt in live:
            continue
        out.append(
            {
                "prompt": prompt,
                "issue": "candidate_waiting",
                "detail": f"optimizer candidates not rolled out: {', '.join(versions)}",
                "action": f"promptd rollout start {prompt} {versions[-1]}",
            }
        )
    return out


def _run_text(run: dict[str, Any] | None) -> str:
    if run is None:
        return "none"
    text = f"{run['id']} {run['status']}/{run['outcome']}"
    return f"{text}: {run['error']}" if run.get("error") else text


def add_routes(
    app: web.Application,
    runner: OptimizationRunner,
    registry: Registry,
    rollouts: RolloutController,
) -> None:
    """Mount the optimizer's routes on ``app``."""
    app[RUNNER_KEY] = runner
    app[OPT_REGISTRY_KEY] = registry
    app[OPT_ROLLOUTS_KEY] = rollouts
    app.router.add_post("/v1/optimize/{prompt}", optimize)
    app.router.add_get("/v1/optimizations", list_optimizations)
    app.router.add_get("/v1/optimizations/{run_id}", get_optimization)
    app.router.add_get("/v1/recommendations", recommendations)
