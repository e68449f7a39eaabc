"""The ``promptd`` command: parse arguments, build settings, configure logging, call one function.

Every command's errors are one line on stderr and a non-zero exit, never a traceback.
The global flags (``--config``, ``--json``) are accepted before and after the subcommand.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from promptd import __version__
from promptd.daemon.cli.common import CommandError
from promptd.daemon.logs import configure_logging
from promptd.daemon.settings import Settings, SettingsError, load_settings

Handler = Callable[[argparse.Namespace, Settings], int]

#: Flags of ``run`` and ``init`` that set a setting (the README's configuration table);
#: they win over every other source. flag -> (setting, type, metavar, help).
SETTING_FLAGS: dict[str, tuple[str, Callable[[str], Any], str, str]] = {
    "--data-dir": (
        "storage.data_dir",
        str,
        "DIR",
        "where the SQLite file lives (PROMPTD_DATA_DIR; default ./data)",
    ),
    "--http-host": (
        "http.host",
        str,
        "HOST",
        "HTTP API bind address (PROMPTD_HTTP_HOST; default 127.0.0.1)",
    ),
    "--http-port": (
        "http.port",
        int,
        "PORT",
        "HTTP API port, 0 picks a free one (PROMPTD_HTTP_PORT; default 8787)",
    ),
    "--kafka-bootstrap-servers": (
        "kafka.bootstrap_servers",
        str,
        "HOST:PORT[,...]",
        "the Kafka cluster (PROMPTD_KAFKA_BOOTSTRAP_SERVERS); unset starts the embedded "
        "development broker on 127.0.0.1:9092",
    ),
    "--log-level": (
        "log_level",
        str,
        "LEVEL",
        "debug, info, warning or error (PROMPTD_LOG_LEVEL; default info)",
    ),
    "--log-format": (
        "log_format",
        str,
        "FORMAT",
        "auto, json or console (PROMPTD_LOG_FORMAT; default auto: JSON unless on a terminal)",
    ),
}
SETTING_COMMANDS = ("run", "init")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptd", description="Continuous prompt improvement for production LLM apps."
    )
    parser.add_argument("--version", action="version", version=f"promptd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _command_modules():
        _HANDLERS.update(module.register(sub))
    for name in SETTING_COMMANDS:
        _add_setting_flags(sub.choices[name])
    for each in _all_parsers(parser):
        _add_global_flags(each)
    return parser


def _add_global_flags(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS as the default everywhere, so a subcommand's default never overwrites a
    # value given before it; main() fills in the real defaults.
    existing = parser._option_string_actions
    if "--config" not in existing:
        parser.add_argument(
            "--config",
            default=argparse.SUPPRESS,
            metavar="FILE",
            help="the daemon's settings, a TOML file (also PROMPTD_CONFIG; see "
            "promptd.example.toml)",
        )
    if "--json" in existing:
        existing["--json"].default = argparse.SUPPRESS
    else:
        parser.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="print raw JSON"
        )


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for flag, (setting, kind, metavar, help_text) in SETTING_FLAGS.items():
        parser.add_argument(flag, type=kind, dest=_dest(setting), metavar=metavar, help=help_text)


def _dest(setting: str) -> str:
    return "setting:" + setting


def _all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _all_parsers(child)


_HANDLERS: dict[str, Handler] = {}


def _command_modules() -> list[Any]:
    """Modules that add subcommands: each has ``register(subparsers) -> {name: handler}``."""
    from promptd.daemon import demo
    from promptd.daemon.cli import (
        evaluation,
        monitoring,
        ops,
        optimize,
        pipelines,
        process,
        prompts,
        storage,
    )

    return [process, prompts, pipelines, monitoring, optimize, evaluation, ops, storage, demo]


def _flag_overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    overrides: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for flag, (setting, _, _, _) in SETTING_FLAGS.items():
        value = getattr(args, _dest(setting), None)
        if value is not None:
            overrides[setting] = value
            origins[setting] = flag
    return overrides, origins


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script.

    Output cut short by the reader (``promptd … --json | head``) ends quietly: Python's
    own message about the closed pipe is avoided by pointing stdout at /dev/null.
    """
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe can still be caught
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # as a shell reports a command ended by SIGPIPE
    return code


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    args.config = getattr(args, "config", None)
    args.json = getattr(args, "json", False)
    try:
        overrides, origins = _flag_overrides(args)
        settings = load_settings(args.config, overrides, origins)
    except SettingsError as exc:
        print(f"promptd: {chat_config_hint(args.config) or exc}", file=sys.stderr)
        return 2
    if args.command == "run":
        configure_logging(settings.log_level, settings.log_format, capture_warnings=True)
    else:
        # Other commands print their own one-line errors: the libraries stay quiet.
        configure_logging(
            "warning", settings.log_format, third_party_level="critical", capture_warnings=True
        )
    try:
        return _HANDLERS[args.command](args, settings)
    except CommandError as exc:
        print(f"promptd {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def chat_config_hint(config: str | None) -> str | None:
    """The message for a chat configuration given as ``--config`` (the daemon's settings
    file), which ``prompts register`` used to take; None for any other file."""
    if config is None or config == "-":
        return None
    from promptd.daemon.cli.prompts import read_chat_config

    try:
        data = read_chat_config(Path(config))
    except CommandError:
        return None
    if "messages" not in data:
        return None
    return (
        f"{config} is a chat configuration, not the daemon's settings (--config): register "
        f"it with `promptd prompts register NAME --chat {config}`"
    )
