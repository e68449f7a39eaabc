"""CLI: ``promptd prompts …`` and ``promptd rollout …`` (through the daemon's HTTP API)."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import quote

from promptd.daemon.cli.common import CommandError, http_json
from promptd.daemon.cli.rollout_text import rollout_rows, traffic
from promptd.daemon.settings import Settings


def register(sub: Any) -> dict[str, Any]:
    """Add ``prompts`` and ``rollout`` with their subcommands."""
    prompts = sub.add_parser("prompts", help="the prompt registry")
    psub = prompts.add_subparsers(dest="prompts_command", required=True, metavar="ACTION")
    psub.add_parser("list", help="every prompt and its active version")
    show = psub.add_parser("show", help="a prompt, its active version and routing")
    show.add_argument("prompt", help="the prompt's name")
    history = psub.add_parser("history", help="all versions of a prompt")
    history.add_argument("prompt", help="the prompt's name")
    reg = psub.add_parser(
        "register",
        help="register a new version",
        description="Register a new version of a prompt: a template (--template, --file) "
        "or a chat configuration (--chat). The first version becomes active; later ones are "
        "candidates for a rollout.",
    )
    reg.add_argument("prompt", help="the prompt's name (created with its first version)")
    source = reg.add_mutually_exclusive_group()
    source.add_argument("--template", metavar="TEXT", help="the template text ({placeholders})")
    source.add_argument(
        "--file", type=Path, metavar="FILE", help="read the template from a file ('-': stdin)"
    )
    source.add_argument(
        "--chat",
        type=Path,
        metavar="FILE",
        help="a chat configuration (messages, model, params) as TOML or JSON ('-': stdin)",
    )
    reg.add_argument("--version", metavar="NAME", help="version name (default v<N>)")
    reg.add_argument("--activate", action="store_true", help="make it active at once")
    reg.add_argument(
        "--force",
        action="store_true",
        help="accept placeholders that differ from the active version's, or a template "
        "some version already has",
    )
    reg.add_argument("--profile", metavar="NAME", help="the prompt's rollout profile from now on")
    restore = psub.add_parser("restore", help="make an earlier version active again")
    restore.add_argument("prompt", help="the prompt's name")
    restore.add_argument("version", help="the version to make active (e.g. the backup)")

    rollout = sub.add_parser("rollout", help="gradual rollouts of candidate versions")
    rsub = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    start = rsub.add_parser("start", help="start a rollout")
    start.add_argument("prompt", help="the prompt's name")
    start.add_argument("candidate_version", help="the registered version to roll out")
    rollout_options(start)
    status = rsub.add_parser(
        "status", help="one rollout with its arms and test figures, or all of them"
    )
    status.add_argument("rollout_id", nargs="?", help="the rollout's id (default: list all)")
    for action in ("promote", "rollback", "pause", "resume"):
        cmd = rsub.add_parser(action, help=f"{action} a rollout now")
        cmd.add_argument("rollout_id", help="the rollout's id (promptd rollout status)")
        cmd.add_argument("--reason", metavar="TEXT", help="why, for the decision log")
    for p in (prompts, rollout):
        p.add_argument("--json", action="store_true", help="print raw JSON")
    return {"prompts": prompts_command, "rollout": rollout_command}


def rollout_options(parser: argparse.ArgumentParser) -> None:
    """``--profile``, ``--metric`` and ``--require-win`` of the commands that start one."""
    parser.add_argument(
        "--profile",
        metavar="NAME",
        help="conservative, balanced, aggressive or a custom one (default: the prompt's)",
    )
    parser.add_argument(
        "--metric",
        choices=["feedback_score", "success_rate", "quality"],
        help="primary metric (feedback_score and quality are 0..1, higher is better)",
    )
    parser.add_argument(
        "--require-win",
        action="store_true",
        help="promote only on a significant win; else end as no_improvement at the horizon",
    )


def read_chat_config(path: Path) -> dict[str, Any]:
    """A chat configuration file (TOML by its suffix, else JSON; '-' reads stdin)."""
    text = sys.stdin.read() if str(path) == "-" else _read(path)
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise CommandError(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise CommandError(f"{path}: expected an object with 'messages'")
    return data


def _out(args: argparse.Namespace, body: Any, table: list[tuple[str, Any]] | None = None) -> None:
    if getattr(args, "json", False) or table is None:
        print(json.dumps(body, indent=2, sort_keys=True))
        return
    width = max((len(k) for k, _ in table), default=0)
    for key, value in table:
        print(f"{key:<{width}}  {value}")


def prompts_command(args: argparse.Namespace, settings: Settings) -> int:
    """``promptd prompts list|show|history|register|restore``."""
    action = args.prompts_command
    if action == "list":
        body = http_json(settings, "GET", "/v1/prompts")
        rows = [
            (
                p["name"],
                f"{p['active_version']}" + ("  (rollout live)" if p["rollout_live"] else ""),
            )
            for p in body["prompts"]
        ]
        _out(args, body, rows or [("(no prompts)", "")])
    elif action == "show":
        body = http_json(settings, "GET", f"/v1/prompts/{quote(args.prompt, safe='')}")
        routing = body["routing"]
        _out(
            args,
            body,
            [
                ("prompt", body["name"]),
                ("active version", body["active_version"]),
                ("profile", body["profile"]),
                ("candidate", routing["candidate_version"] or "-"),
                ("candidate weight", routing["weight"]),
                ("template", (body["active"] or {}).get("template", "-")),
            ],
        )
    elif action == "history":
        body = http_json(settings, "GET", f"/v1/prompts/{quote(args.prompt, safe='')}/versions")
        _out(
            args,
            body,
            [(v["version"], f"{v['status']:<12} origin={v['origin']}") for v in body["versions"]],
        )
    elif action == "register":
        body = _register(args, settings)
        _out(args, body, [("registered", f"{body['prompt']} {body['version']} ({body['status']})")])
    elif action == "restore":
        body = http_json(
            settings,
            "POST",
            f"/v1/prompts/{quote(args.prompt, safe='')}/restore",
            {"version": args.version},
        )
        _out(args, body, [("active", f"{body['prompt']} {body['version']}")])
    return 0


def _register(args: argparse.Namespace, settings: Settings) -> Any:
    if args.template is None and args.file is None and args.chat is None:
        raise CommandError("give the version: --template TEXT, --file FILE or --chat FILE", 2)
    template = args.template
    if args.file is not None:
        template = sys.stdin.read() if str(args.file) == "-" else _read(args.file)
    payload = {
        "template": template,
        "config": read_chat_config(args.chat) if args.chat is not None else None,
        "version": args.version,
        "activate": args.activate,
        "force": args.force,
        "profile": args.profile,
    }
    try:
        return http_json(
            settings,
            "POST",
            f"/v1/prompts/{quote(args.prompt, safe='')}/versions",
            {k: v for k, v in payload.items() if v is not None},
        )
    except CommandError as exc:
        # The API's advice names its body field; here the flag does the same.
        raise CommandError(str(exc).replace("with force=true", "with --force"), 1) from None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None


def rollout_command(args: argparse.Namespace, settings: Settings) -> int:
    """``promptd rollout start|status|promote|rollback|pause|resume``."""
    action = args.rollout_command
    if action == "start":
        payload = {
            "prompt": args.prompt,
            "candidate_version": args.candidate_version,
            "profile": args.profile,
            "primary_metric": args.metric,
            "require_win": True if args.require_win else None,
        }
        body = http_json(
            settings, "POST", "/v1/rollouts", {k: v for k, v in payload.items() if v is not None}
        )
        _out(args, body, rollout_rows(body))
    elif action == "status":
        if args.rollout_id is None:
            body = http_json(settings, "GET", "/v1/rollouts")
            rows = [
                (
                    r["id"],
                    (f"pipeline {r['pipeline']} " if r.get("pipeline") else "")
                    + f"{r['prompt']} {r['baseline_version']} → {r['candidate_version']} "
                    f"{r['status']}: {traffic(r)}",
                )
                for r in body["rollouts"]
            ]
            _out(args, body, rows or [("(no rollouts)", "")])
        else:
            body = http_json(settings, "GET", f"/v1/rollouts/{quote(args.rollout_id, safe='')}")
            _out(args, body, rollout_rows(body))
    else:
        body = http_json(
            settings,
            "POST",
            f"/v1/rollouts/{quote(args.rollout_id, safe='')}/{action}",
            {"reason": args.reason} if args.reason else {},
        )
        _out(args, body, rollout_rows(body))
    return 0
