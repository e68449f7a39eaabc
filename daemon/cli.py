"""The ``promptd`` command: parse arguments, build settings, configure logging, call one function.

Every command's errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from promptd.daemon import commands
from promptd.daemon.logs import configure_logging
from promptd.daemon.settings import Settings, SettingsError, load_settings

Handler = Callable[[argparse.Namespace, Settings], int]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptd", description="Continuous prompt improvement for production LLM apps."
    )
    parser.add_argument("--config", help="TOML config file (also PROMPTD_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for module in _command_modules():
        _HANDLERS.update(module.register(sub))
    return parser


_HANDLERS: dict[str, Handler] = {}


def _command_modules() -> list[Any]:
    """Modules that add subcommands: each has ``register(subparsers) -> {name: handler}``."""
    from promptd.daemon import (
        commands_monitoring,
        commands_ops,
        commands_optimize,
        commands_prompts,
        demo,
    )

    return [commands, commands_prompts, commands_monitoring, commands_optimize, commands_ops, demo]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    try:
        overrides: dict[str, Any] = {}
        if getattr(args, "http_port", None) is not None:
            overrides["http_port"] = args.http_port
        settings = load_settings(args.config, **overrides)
    except SettingsError as exc:
        print(f"promptd: {exc}", file=sys.stderr)
        return 2
    quiet = args.command not in {"run"}
    configure_logging("warning" if quiet else settings.log_level, settings.log_format)
    try:
        return _HANDLERS[args.command](args, settings)
    except commands.CommandError as exc:
        print(f"promptd {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def print_json(value: Any) -> None:
    """Pretty JSON on stdout."""
    print(json.dumps(value, indent=2, sort_keys=True))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
