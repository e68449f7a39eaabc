"""The process commands: ``init``, ``run``, ``status``, and publishing one event by hand."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
import tempfile
import time
from typing import Any

import structlog

from promptd.daemon.app import ConfigurationError, Daemon
from promptd.daemon.broker import EmbeddedBrokerError
from promptd.daemon.cli.common import CommandError, http_json, resolve_bootstrap
from promptd.daemon.http import HttpBindError
from promptd.daemon.kafka import KafkaSendError, Producer, ensure_topics
from promptd.daemon.settings import Settings
from promptd.events import FeedbackEvent, MetricEvent, new_event_id, now_ts
from promptd.storage.database import Database, StorageError

log = structlog.get_logger("promptd.cli")


def register(sub: Any) -> dict[str, Any]:
    """Add the core subcommands to the CLI's subparsers."""
    # run and init also take the common settings as flags (cli.SETTING_FLAGS).
    sub.add_parser("init", help="create the data dir, the database and the Kafka topics")
    run_parser = sub.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    run_parser.add_argument(
        "--new-store",
        action="store_true",
        help="start over with an empty database although the consumer group has "
        "committed offsets: read every partition from its earliest offset "
        "(storage.accept_new_store)",
    )
    sub.add_parser("status", help="show the running daemon's status")

    metrics = sub.add_parser("metrics", help="publish one MetricEvent (one LLM call)")
    metrics.add_argument("variant", help="the prompt version that served the call")
    metrics.add_argument("model", help="the model name, as the app called it")
    metrics.add_argument("latency_ms", type=float, help="the call's latency in milliseconds")
    metrics.add_argument("--prompt", required=True, metavar="NAME", help="the prompt's name")
    metrics.add_argument(
        "--success",
        dest="success",
        action="store_true",
        default=True,
        help="the call succeeded (the default)",
    )
    metrics.add_argument("--failure", dest="success", action="store_false", help="it failed")
    metrics.add_argument("--error", metavar="TEXT", help="error type or message of a failure")
    metrics.add_argument(
        "--request-id", metavar="ID", help="joins feedback to the call (default: a new id)"
    )
    metrics.add_argument("--unit-id", metavar="ID", help="the user or session of the call")
    metrics.add_argument(
        "--quality", type=float, metavar="0..1", help="an automatic quality score, 0 to 1"
    )

    feedback = sub.add_parser("feedback", help="publish one FeedbackEvent")
    feedback.add_argument("variant", help="the prompt version of the call judged")
    feedback.add_argument("model", help="the model of the call judged")
    feedback.add_argument("score", type=float, help="0 to 1: 0 is bad, 1 is good (thumbs: 0 or 1)")
    feedback.add_argument(
        "kind",
        nargs="?",
        default="quality",
        help="quality (default), thumbs, rating, correction, or your own",
    )
    feedback.add_argument("--prompt", required=True, metavar="NAME", help="the prompt's name")
    feedback.add_argument(
        "--request-id", metavar="ID", help="the call judged (its metric's --request-id)"
    )
    feedback.add_argument("--comment", metavar="TEXT", help="a free-text comment")
    return {
        "init": init,
        "run": run,
        "status": status,
        "metrics": publish_metric,
        "feedback": publish_feedback,
    }


def init(args: argparse.Namespace, settings: Settings) -> int:
    """``promptd init``: data dir, database (migrated), and topics when Kafka is set."""
    check_data_dir(settings)

    async def _init() -> None:
        await _open_database(settings)
        if settings.kafka.bootstrap_servers:
            try:
                created = await ensure_topics(settings.kafka, settings.kafka.bootstrap_servers)
            except Exception as exc:
                raise CommandError(
                    f"cannot create topics on {settings.kafka.bootstrap_servers}: {exc!r}"
                ) from None
            print(f"topics created: {', '.join(created) or 'none (all exist)'}")
        else:
            print("no Kafka configured: topics are created by `promptd run` on its broker")

    asyncio.run(_init())
    print(f"database ready: {_location(settings)}")
    return 0


_DATA_DIR_SETTING = "storage.data_dir: PROMPTD_DATA_DIR or --data-dir"


def _location(settings: Settings) -> str:
    """The store, as messages name it (a PostgreSQL URL without its password)."""
    if settings.storage.url is not None:
        from promptd.storage.postgres import redact

        return redact(settings.storage.url)
    return str(settings.storage.database_path)


def check_data_dir(settings: Settings) -> None:
    """Fail with one line unless the data directory (and database file) can be written.

    Checked by writing, not by permission bits, so a read-only mount is caught too.
    """
    data_dir = settings.storage.data_dir
    database = settings.storage.database_path
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=data_dir):
            pass
        if database.exists():
            with database.open("r+b"):
                pass
    except OSError as exc:
        what = database if exc.filename == str(database) else data_dir
        raise CommandError(
            f"cannot write to {what} (the data directory, {_DATA_DIR_SETTING}): "
            f"{exc.strerror or exc}"
        ) from None


async def _open_database(settings: Settings) -> None:
    try:
        db = await Database.open(settings.storage.target, settings.storage.busy_timeout_ms)
    except (StorageError, sqlite3.Error, OSError) as exc:
        raise CommandError(_storage_message(settings, exc)) from None
    await db.close()


_URL_SETTING = "storage.url: PROMPTD_STORAGE_URL"


def _storage_message(settings: Settings, exc: BaseException) -> str:
    setting = _URL_SETTING if settings.storage.shared else _DATA_DIR_SETTING
    if isinstance(exc, StorageError):  # already names the database
        return f"{exc} ({setting})"
    where = "the PostgreSQL store" if settings.storage.shared else settings.storage.database_path
    return f"cannot use the database {where} ({setting}): {exc}"


def run(args: argparse.Namespace, settings: Settings) -> int:
    """``promptd run``: the daemon until SIGTERM/SIGINT."""
    check_data_dir(settings)
    if getattr(args, "new_store", False):
        storage = settings.storage.model_copy(update={"accept_new_store": True})
        settings = settings.model_copy(update={"storage": storage})
    try:
        asyncio.run(_run_daemon(settings))
    except (ConfigurationError, EmbeddedBrokerError, HttpBindError) as exc:
        raise CommandError(str(exc)) from None
    except (StorageError, sqlite3.Error) as exc:
        raise CommandError(_storage_message(settings, exc)) from None
    return 0


async def _run_daemon(settings: Settings) -> None:
    # The daemon writes runtime.json once started and removes it at exit: it holds the
    # data directory's lock, so no other process ever touches that file.
    daemon = Daemon(settings)
    from promptd.daemon.wiring import install_components

    install_components(daemon)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await daemon.run(stop)


def status(args: argparse.Namespace, settings: Settings) -> int:
    """``promptd status``: a table, or ``--json``."""
    body = http_json(settings, "GET", "/v1/status")
    if args.json:
        print(json.dumps(body, indent=2, sort_keys=True))
        return 0
    events, kafka = body["events"], body["kafka"]
    rows = [
        ("healthy", body["healthy"]),
        ("ready", body["ready"]),
        ("role", role_text(body.get("leadership") or {})),
        ("events stored", events["stored"]),
        ("  metrics / feedback", f"{events['stored_metrics']} / {events['stored_feedback']}"),
        ("duplicates", events["duplicates"]),
        ("dead-lettered", events["dead_lettered"]),
        ("kafka", kafka["bootstrap_servers"] + (" (embedded)" if kafka["embedded"] else "")),
        ("kafka connected", kafka["connected"]),
        ("consumer lag", kafka["lag"]),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0 if body["healthy"] else 1


def role_text(leadership: dict[str, Any]) -> str:
    """Who leads, in one line: ``leader (single daemon)``, ``leader (generation 3)``,
    ``standby; leader: b at http://10.0.0.2:8787 (generation 3)``, and a step-down."""
    if not leadership.get("shared"):
        return "leader (single daemon)"
    generation = leadership.get("generation")
    if leadership.get("role") == "leader":
        text = f"leader {leadership.get('identity')} (generation {generation})"
    else:
        leader = leadership.get("leader")
        who = f"{leader['identity']} at {leader['address']}" if leader else "none right now"
        text = f"standby {leadership.get('identity')}; leader: {who} (generation {generation})"
    stepped = leadership.get("stepped_down")
    if stepped:
        text += f"; stepped down at {time.strftime('%H:%M:%S', time.localtime(stepped['at']))}"
        text += f": {stepped['reason']}"
    return text


def _publish(settings: Settings, topic: str, event: MetricEvent | FeedbackEvent) -> None:
    bootstrap = resolve_bootstrap(settings)

    async def _send() -> None:
        producer = Producer(settings.kafka, bootstrap)
        try:
            try:
                await producer.start()
            except Exception as exc:
                raise CommandError(f"Kafka not reachable at {bootstrap}: {exc!r}") from None
            await producer.send(topic, event.to_json(), key=(event.prompt or "").encode())
        finally:
            # Also after a failed start, or aiokafka warns about an unclosed producer.
            await producer.stop()

    try:
        asyncio.run(_send())
    except KafkaSendError as exc:
        raise CommandError(str(exc)) from None
    print(
        json.dumps({"published": topic, "event_id": event.event_id, "request_id": event.request_id})
    )


def _build(event_type: type[MetricEvent] | type[FeedbackEvent], **fields: Any) -> Any:
    from pydantic import ValidationError

    from promptd._validation import validation_message

    try:
        return event_type(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise CommandError(validation_message(exc), 2) from None


def publish_metric(args: argparse.Namespace, settings: Settings) -> int:
    """``promptd metrics VARIANT MODEL LATENCY_MS --prompt NAME``."""
    event = _build(
        MetricEvent,
        event_id=new_event_id(),
        ts=now_ts(),
        prompt=args.prompt,
        variant=args.variant,
        model=args.model,
        request_id=args.request_id or new_event_id(),
        unit_id=args.unit_id,
        latency_ms=args.latency_ms,
        success=args.success,
        error=args.error,
        quality=args.quality,
    )
    _publish(settings, settings.kafka.metrics_topic, event)
    return 0


def publish_feedback(args: argparse.Namespace, settings: Settings) -> int:
    """``promptd feedback VARIANT MODEL SCORE [KIND] --prompt NAME``."""
    event = _build(
        FeedbackEvent,
        event_id=new_event_id(),
        ts=now_ts(),
        prompt=args.prompt,
        variant=args.variant,
        model=args.model,
        request_id=args.request_id or new_event_id(),
        score=args.score,
        kind=args.kind,
        comment=args.comment,
    )
    _publish(settings, settings.kafka.feedback_topic, event)
    return 0
