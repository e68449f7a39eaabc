"""CLI: ``promptd pipelines list|show|register|rollout`` (through the daemon's HTTP API).

``promptd pipelines rollout NAME --candidate PROMPT=VERSION ...`` starts one coordinated
rollout of the pipeline; follow and command it with ``promptd rollout status|promote|
rollback|pause|resume ID`` like any rollout (its commands act on every step at once).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import quote

from promptd.daemon.cli.common import CommandError, http_json
from promptd.daemon.cli.prompts import rollout_options
from promptd.daemon.cli.rollout_text import traffic
from promptd.daemon.settings import Settings


def register(sub: Any) -> dict[str, Any]:
    """Add ``pipelines`` with its subcommands."""
    pipelines = sub.add_parser("pipelines", help="pipelines of prompts")
    psub = pipelines.add_subparsers(dest="pipelines_command", required=True, metavar="ACTION")
    psub.add_parser("list", help="every pipeline and its steps")
    show = psub.add_parser("show", help="one pipeline with each step's bindings")
    show.add_argument("name", help="the pipeline's name")
    reg = psub.add_parser("register", help="register or redefine a pipeline from a file")
    reg.add_argument(
        "file",
        type=Path,
        help="JSON or TOML: name, and steps with prompt and bindings ('-': stdin)",
    )
    roll = psub.add_parser("rollout", help="start one coordinated rollout of a pipeline")
    roll.add_argument("name", help="the pipeline's name")
    roll.add_argument(
        "--candidate",
        action="append",
        required=True,
        metavar="PROMPT=VERSION",
        help="a changed step and its candidate version (repeat for each changed step)",
    )
    rollout_options(roll)
    pipelines.add_argument("--json", action="store_true", help="print raw JSON")
    return {"pipelines": pipelines_command}


def pipelines_command(args: argparse.Namespace, settings: Settings) -> int:
    """Dispatch ``pipelines`` actions."""
    action = args.pipelines_command
    if action == "list":
        body = http_json(settings, "GET", "/v1/pipelines")
        text = "\n".join(_line(p) for p in body["pipelines"]) or "no pipelines"
    elif action == "show":
        body = http_json(settings, "GET", f"/v1/pipelines/{quote(args.name, safe='')}")
        text = _detail(body)
    elif action == "rollout":
        body = http_json(
            settings,
            "POST",
            f"/v1/pipelines/{quote(args.name, safe='')}/rollouts",
            _rollout_body(args),
        )
        text = _rollout_text(body)
    else:
        body = http_json(settings, "POST", "/v1/pipelines", _read(args.file))
        text = f"registered pipeline {body['name']}\n{_detail(body)}"
    print(json.dumps(body, indent=2, sort_keys=True) if args.json else text)
    return 0


def _rollout_body(args: argparse.Namespace) -> dict[str, Any]:
    candidates: dict[str, str] = {}
    for item in args.candidate:
        prompt, sep, version = item.partition("=")
        if not sep or not prompt or not version:
            raise CommandError(f"--candidate {item!r}: use PROMPT=VERSION")
        if prompt in candidates:
            raise CommandError(f"--candidate: step {prompt!r} is named twice")
        candidates[prompt] = version
    body: dict[str, Any] = {"candidates": candidates}
    if args.profile:
        body["profile"] = args.profile
    if args.metric:
        body["primary_metric"] = args.metric
    if args.require_win:
        body["require_win"] = True
    return body


def _rollout_text(body: dict[str, Any]) -> str:
    lines = [f"rollout {body['id']} of pipeline {body['pipeline']}: {traffic(body)}"]
    for m in body["members"]:
        change = f" -> {m['candidate']}" if m["candidate"] else " (unchanged)"
        lines.append(f"  {m['prompt']}: {m['baseline']}{change}")
    lines.append(f"follow it with: promptd rollout status {body['id']}")
    return "\n".join(lines)


def _read(path: Path) -> dict[str, Any]:
    raw = sys.stdin.read() if str(path) == "-" else _text(path)
    try:
        data = tomllib.loads(raw) if path.suffix == ".toml" else json.loads(raw)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise CommandError(
            f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise CommandError(f"{path}: expected an object with 'name' and 'steps'")
    return data


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None


def _line(p: dict[str, Any]) -> str:
    return f"{p['name']}: " + " -> ".join(s["prompt"] for s in p["steps"])


def _detail(p: dict[str, Any]) -> str:
    lines = [_line(p)]
    for step in p["steps"]:
        bound = ", ".join(f"{k} <- {v}" for k, v in sorted(step["bindings"].items()))
        lines.append(f"  {step['prompt']}: {bound}")
    return "\n".join(lines)
