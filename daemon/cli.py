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

    sub.add_parser("init", help="create the data dir, the database and the Kafka topics")
    run = sub.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    run.add_argument("--http-port", type=int, help="override http.port (0 picks a free one)")

    status = sub.add_parser("status", help="show the running daemon's status")
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    metrics = sub.add_parser("metrics", help="publish one MetricEvent")
    metrics.add_argument("variant")
    metrics.add_argument("model")
    metrics.add_argument("latency_ms", type=float)
    metrics.add_argument("--prompt", required=True)
    metrics.add_argument("--success", dest="success", action="store_true", default=True)
    metrics.add_argument("--failure", dest="success", action="store_false")
    metrics.add_argument("--error", help="error type or message for a failed call")
    metrics.add_argument("--request-id")
    metrics.add_argument("--unit-id")
    metrics.add_argument("--quality", type=float)

    feedback = sub.add_parser("feedback", help="publish one FeedbackEvent")
    feedback.add_argument("variant")
    feedback.add_argument("model")
    feedback.add_argument("score", type=float)
    feedback.add_argument("kind", nargs="?", default="quality")
    feedback.add_argument("--prompt", required=True)
    feedback.add_argument("--request-id")
    feedback.add_argument("--comment")
    return parser


def _handlers() -> dict[str, Handler]:
    return {
        "init": commands.init,
        "run": commands.run,
        "status": commands.status,
        "metrics": commands.publish_metric,
        "feedback": commands.publish_feedback,
    }


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
        return _handlers()[args.command](args, settings)
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
