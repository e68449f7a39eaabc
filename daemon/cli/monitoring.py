"""CLI: ``promptd alerts`` and ``promptd stats PROMPT`` (through the daemon's HTTP API)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any
from urllib.parse import quote, urlencode

from promptd.daemon.cli.common import CommandError, http_json
from promptd.daemon.settings import Settings


def register(sub: Any) -> dict[str, Any]:
    """Add the monitoring subcommands."""
    alerts = sub.add_parser("alerts", help="active alerts and recent alert history")
    alerts.add_argument("--json", action="store_true", help="print the raw JSON")
    alerts.add_argument("--recent", type=int, default=10, help="history rows to show")
    stats = sub.add_parser("stats", help="window statistics of a prompt per variant")
    stats.add_argument("prompt", help="the prompt's name")
    stats.add_argument("--window", default="5m", help="window length, e.g. 1m, 5m, 1h")
    stats.add_argument("--json", action="store_true", help="print the raw JSON")
    return {"alerts": alerts_command, "stats": stats_command}


def alerts_command(args: argparse.Namespace, settings: Settings) -> int:
    """``promptd alerts``: a table of active alerts, then recent transitions."""
    body = http_json(settings, "GET", "/v1/alerts?" + urlencode({"limit": args.recent}))
    if args.json:
        print(json.dumps(body, indent=2, sort_keys=True))
        return 0
    active = body.get("active", [])
    if not active:
        print("no active alerts")
    else:
        print(f"{'STATE':<9}{'RULE':<28}{'SINCE':<22}{'VALUE':>12}{'THRESHOLD':>12}  LABELS")
        for a in active:
            since = a.get("fired_at") or a.get("active_at")
            print(
                f"{a['state']:<9}{a['rule'][:27]:<28}{_time(since):<22}"
                f"{_num(a.get('value')):>12}{_num(a.get('threshold')):>12}  "
                f"{_labels(a.get('labels', {}))}"
            )
    recent = body.get("recent", [])
    if recent:
        print("\nrecent:")
        for row in recent:
            print(f"  {_time(row['ts'])}  {row['state']:<9}{row['rule']}")
    return 0


def stats_command(args: argparse.Namespace, settings: Settings) -> int:
    """``promptd stats PROMPT``: one row per variant plus the total."""
    path = f"/v1/prompts/{quote(args.prompt, safe='')}/stats?" + urlencode({"window": args.window})
    body = http_json(settings, "GET", path)
    if args.json:
        print(json.dumps(body, indent=2, sort_keys=True))
        return 0
    variants = body.get("variants", {})
    if not variants and not body.get("total", {}).get("request_count"):
        raise CommandError(f"no events for prompt {args.prompt!r} in the last {args.window}")
    cols = (
        ("requests", "request_count", "{:>10}"),
        ("req/s", "request_rate", "{:>9.2f}"),
        ("success", "success_rate", "{:>9.1%}"),
        ("p50 ms", "latency_p50", "{:>9.0f}"),
        ("p95 ms", "latency_p95", "{:>9.0f}"),
        ("p99 ms", "latency_p99", "{:>9.0f}"),
        ("feedback", "feedback_mean", "{:>9.3f}"),
        ("n fb", "feedback_count", "{:>7}"),
        ("$/req", "cost_per_request", "{:>10.5f}"),
    )
    widths = [len(fmt.format(0)) for _, _, fmt in cols]
    print(
        f"{'VARIANT':<20}" + "".join(f"{h:>{w}}" for (h, _, _), w in zip(cols, widths, strict=True))
    )
    rows = [*sorted(variants.items()), ("(all)", body["total"])]
    for name, s in rows:
        cells = []
        for (_, key, fmt), width in zip(cols, widths, strict=True):
            value = s.get(key)
            cells.append(f"{'-':>{width}}" if value is None else fmt.format(value))
        print(f"{name[:19]:<20}" + "".join(cells))
    print(f"\nwindow {args.window} ending {_time(body.get('now'))}")
    return 0


def _time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _labels(labels: dict[str, str]) -> str:
    skip = {"alertname", "severity"}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in skip)
