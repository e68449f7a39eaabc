"""CLI: ``promptd evaluators [NAME]`` (through the daemon's HTTP API)."""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import quote

from promptd.daemon.cli.common import http_json
from promptd.daemon.settings import Settings


def register(sub: Any) -> dict[str, Any]:
    """Add the evaluation subcommands."""
    cmd = sub.add_parser(
        "evaluators", help="evaluators: samples, skips, costs, agreement, recent scores"
    )
    cmd.add_argument("name", nargs="?", help="one evaluator, with its recent results")
    cmd.add_argument("--json", action="store_true", help="print the raw JSON")
    return {"evaluators": evaluators_command}


def evaluators_command(args: argparse.Namespace, settings: Settings) -> int:
    """A table of evaluators, or one evaluator in detail."""
    if args.name:
        body = http_json(settings, "GET", f"/v1/evaluators/{quote(args.name, safe='')}")
        rows = [body]
    else:
        body = http_json(settings, "GET", "/v1/evaluators")
        rows = body.get("evaluators", [])
    if args.json:
        print(json.dumps(body, indent=2, sort_keys=True))
        return 0
    if not rows:
        print("no evaluators configured (see [evaluation] in promptd.example.toml)")
        return 0
    print(
        f"{'NAME':<20}{'TYPE':<12}{'RATE':>6}{'SAMPLED':>9}{'SCORED':>8}{'MEAN':>7}"
        f"{'SKIPPED':>9}{'$ TODAY':>10}  STATE"
    )
    for e in rows:
        print(_row(e))
    for e in rows:
        for line in _agreement(e):
            print(line)
    if args.name:
        _recent(body.get("recent", []))
    return 0


def _row(e: dict[str, Any]) -> str:
    counts = e.get("since_start", {})
    stored = e.get("stored", {})
    skipped = sum(v for k, v in counts.items() if k.startswith("skipped_"))
    mean = stored.get("mean_score")
    state = "up" if e.get("up") else f"DOWN: {(e.get('last_error') or '')[:60]}"
    return (
        f"{e['name'][:19]:<20}{e['type'][:11]:<12}{e['sample_rate']:>6.0%}"
        f"{counts.get('sampled', 0):>9}{stored.get('scored', 0):>8}"
        f"{'-' if mean is None else f'{mean:.2f}':>7}{skipped:>9}"
        f"{e['budget'].get('spent_usd_today', 0.0):>10.4f}  {state}"
    )


def _agreement(e: dict[str, Any]) -> list[str]:
    out = []
    for rep in e.get("agreement", []):
        rho, kappa = rep.get("spearman"), rep.get("kappa")
        parts = [f"{rep['pairs']} pairs"]
        if rho:
            parts.append(f"rho {rho['value']:.2f} [{rho['low']:.2f}, {rho['high']:.2f}]")
        if kappa:
            parts.append(f"kappa {kappa['value']:.2f} [{kappa['low']:.2f}, {kappa['high']:.2f}]")
        out.append(f"  {e['name']} vs people on {rep['prompt']}: " + ", ".join(parts))
    skips = {k[8:]: v for k, v in e.get("since_start", {}).items() if k.startswith("skipped_")}
    if skips:
        out.append(f"  {e['name']} skipped: " + ", ".join(f"{k} {v}" for k, v in skips.items()))
    return out


def _recent(results: list[dict[str, Any]]) -> None:
    if not results:
        return
    print("\nrecent:")
    for r in results:
        score = "-" if r.get("score") is None else f"{r['score']:.2f}"
        detail = (r.get("detail") or "")[:60]
        print(f"  {r['request_id'][:24]:<25}{r['prompt'][:20]:<21}{score:>6}  {detail}")
