"""CLI: ``promptd optimize``, ``optimizations``, ``recommendations``."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any
from urllib.parse import quote

from promptd.daemon.cli.common import CommandError, http_json
from promptd.daemon.settings import Settings
from promptd.optimization.outcomes import RunStatus

FINAL = frozenset(RunStatus) - {RunStatus.RUNNING}


def register(sub: Any) -> dict[str, Any]:
    """Add the optimization subcommands."""
    opt = sub.add_parser("optimize", help="start an optimization run of a prompt now")
    opt.add_argument("prompt", help="the prompt's name")
    opt.add_argument(
        "--strategy",
        action="append",
        help="strategy to use (fewshot, instruction, mipro, gepa or a registered one; "
        "repeat for several); default: the bandit picks one of the configured ones",
    )
    opt.add_argument(
        "--reason",
        default="manual request (promptd optimize)",
        metavar="TEXT",
        help="why, for the run's record",
    )
    budget = opt.add_argument_group(
        "the run's budget", "within the configured per-run maximum; unset: that maximum"
    )
    budget.add_argument("--max-llm-calls", type=int, metavar="N", help="paid model calls")
    budget.add_argument("--max-tokens", type=int, metavar="N", help="prompt + completion tokens")
    budget.add_argument("--max-cost-usd", type=float, metavar="USD", help="dollars")
    budget.add_argument("--max-minutes", type=float, metavar="M", help="the run's time")
    opt.add_argument("--no-wait", action="store_true", help="return once the run started")
    opt.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow the run")
    runs = sub.add_parser("optimizations", help="optimization runs with cost and outcome")
    runs.add_argument("--prompt", metavar="NAME", help="only this prompt's runs")
    runs.add_argument("--limit", type=int, default=20, help="newest runs shown (default 20)")
    recs = sub.add_parser("recommendations", help="prompts that need attention")
    for p in (opt, runs, recs):
        p.add_argument("--json", action="store_true", help="print raw JSON")
    return {
        "optimize": optimize_command,
        "optimizations": optimizations_command,
        "recommendations": recommendations_command,
    }


def optimize_command(args: argparse.Namespace, settings: Settings) -> int:
    """Start a run and follow it until it ends (or ``--no-wait``)."""
    started = http_json(
        settings, "POST", f"/v1/optimize/{quote(args.prompt, safe='')}", request_body(args)
    )
    run_id = started["run_id"]
    if started.get("warning") and not args.json:
        print(f"warning: {started['warning']}")
    if args.no_wait:
        _print(args, started, f"run {run_id} started for {args.prompt}")
        return 0
    if not args.json:
        print(f"run {run_id} started for {args.prompt}")
    deadline = time.monotonic() + args.timeout
    shown = 0
    while True:
        run = http_json(settings, "GET", f"/v1/optimizations/{run_id}")
        if not args.json:
            for cand in run["candidates"][shown:]:
                print(f"  {_candidate(cand)}")
            shown = len(run["candidates"])
        if run["status"] in FINAL:
            break
        if time.monotonic() > deadline:
            raise CommandError(f"run {run_id} still running after {args.timeout:g}s")
        time.sleep(1.0)
    _print(args, run, summary(run))
    return 0 if run["status"] == RunStatus.COMPLETED else 1


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The body of ``POST /v1/optimize/{prompt}`` from the command's arguments."""
    body: dict[str, Any] = {"reason": args.reason}
    if args.strategy:
        body["strategies"] = args.strategy
    budget = {
        key: value
        for key, value in (
            ("max_llm_calls", args.max_llm_calls),
            ("max_tokens", args.max_tokens),
            ("max_cost_usd", args.max_cost_usd),
            ("timeout_minutes", args.max_minutes),
        )
        if value is not None
    }
    if budget:
        body["budget"] = budget
    return body


def _candidate(cand: dict[str, Any]) -> str:
    score = "unscored" if cand["val_mean"] is None else f"validation {cand['val_mean']:.3f}"
    return f"candidate {cand['index']} ({cand['strategy']}): {score}"


def summary(run: dict[str, Any]) -> str:
    """A finished run in a few lines."""
    selection = run.get("selection") or {}
    progress = run.get("progress") or {}
    lines = [
        f"run {run['id']}: {run['status']}, outcome {run['outcome']}, "
        f"cost ${run['cost_usd']:.4f}, {run['llm_calls']} LLM calls",
        f"  strategy {selection.get('strategy', '?')} ({selection.get('method', '?')}: "
        f"{selection.get('reason', '')})",
    ]
    notes = run["error"] or ""
    if progress.get("unscored"):
        # The run's first note says why, and which setting would score it.
        unscored = progress["notes"][0]
        lines.append(f"  {unscored}")
        notes = notes.removeprefix(unscored).lstrip("; ")
    if progress.get("baseline_val_mean") is not None:
        lines.append(f"  active version: validation {progress['baseline_val_mean']:.3f}")
    lines += [f"  {_candidate(cand)}" for cand in run["candidates"]]
    gate = run.get("gate")
    if gate:
        lines.append(
            f"  gate {gate['reason']}: gain {gate['gain']:+.4f} "
            f"(95% CI {gate['ci_low']:+.4f}..{gate['ci_high']:+.4f}), "
            f"confidence {gate['confidence']:.3f} on {gate['n']} test examples"
        )
    if run["deployed_version"]:
        lines.append(f"  registered {run['deployed_version']}")
    if run["rollout_id"]:
        lines.append(f"  rollout {run['rollout_id']} started (promotes only on a significant win)")
    if notes:
        lines.append(f"  {notes}")
    return "\n".join(lines)


def optimizations_command(args: argparse.Namespace, settings: Settings) -> int:
    """List runs."""
    path = f"/v1/optimizations?limit={args.limit}"
    if args.prompt:
        path += f"&prompt={quote(args.prompt, safe='')}"
    body = http_json(settings, "GET", path)
    rows = [
        f"{r['id']}  {r['prompt']:<20} {r['trigger_kind']:<15} {r['status']:<10} "
        f"{r['outcome'] or '-':<17} ${r['cost_usd']:.4f}  {_ts(r['started_at'])}"
        for r in body["runs"]
    ]
    _print(args, body, "\n".join(rows) or "no optimization runs")
    return 0


def recommendations_command(args: argparse.Namespace, settings: Settings) -> int:
    """List prompts that need attention with the suggested action."""
    body = http_json(settings, "GET", "/v1/recommendations")
    rows = [
        f"{r['prompt']}: {r['issue']} — {r['detail']}\n    → {r['action']}"
        for r in body["recommendations"]
    ]
    _print(args, body, "\n".join(rows) or "nothing needs attention")
    return 0


def _ts(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _print(args: argparse.Namespace, body: Any, text: str) -> None:
    print(json.dumps(body, indent=2, sort_keys=True) if args.json else text)
