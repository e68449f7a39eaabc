"""CLI: ``promptd pipelines list|show|register`` (through the daemon's HTTP API)."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import quote

from promptd.daemon.commands import CommandError, http_json
from promptd.daemon.settings import Settings


def register(sub: Any) -> dict[str, Any]:
    """Add ``pipelines`` with its subcommands."""
    pipelines = sub.add_parser("pipelines", help="pipelines of prompts")
    psub = pipelines.add_subparsers(dest="pipelines_command", required=True, metavar="ACTION")
    psub.add_parser("list", help="every pipeline and its steps")
    show = psub.add_parser("show", help="one pipeline with each step's bindings")
    show.add_argument("name")
    reg = psub.add_parser("register", help="register or redefine a pipeline from a file")
    reg.add_argument(
        "file",
        type=Path,
        help="JSON or TOML: name, and steps with prompt and bindings ('-': stdin)",
    )
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
    else:
        body = http_json(settings, "POST", "/v1/pipelines", _read(args.file))
        text = f"registered pipeline {body['name']}\n{_detail(body)}"
    print(json.dumps(body, indent=2, sort_keys=True) if args.json else text)
    return 0


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
