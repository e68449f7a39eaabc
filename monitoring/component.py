"""Wiring of the monitor into the daemon (windows, rules, sinks, export).

:func:`install` validates the rules at once (a bad rule stops ``promptd run`` with a message
naming the rule and field), then adds a startup hook that, once storage is open and before
ingestion starts, rebuilds the windows, restores the alert states and registers the batch
listener, the HTTP routes and the ``monitor`` task.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web

from .config import MonitoringSettings
from .export import MonitorExport
from .rules import RuleConfigError, load_rules
from .signals import MonitorSignals
from .sinks import AlertmanagerSink, KafkaSink, SinkError, SinkWorker, WebhookSink
from .windows import WindowStore

if TYPE_CHECKING:
    from promptd.daemon.app import Daemon

    from .monitor import Monitor


def build_sinks(daemon: Daemon, export: MonitorExport) -> list[SinkWorker]:
    """The configured sink workers (the structlog sink needs none)."""
    settings: MonitoringSettings = daemon.settings.monitoring
    workers: list[SinkWorker] = []
    size = settings.sink_queue_size
    if settings.kafka_sink:

        async def send(topic: str, key: bytes, value: bytes) -> None:
            if daemon.producer is None or not daemon.kafka_ready:
                raise SinkError("kafka", "Kafka is not connected yet")
            await daemon.producer.send(topic, value, key=key)

        sink = KafkaSink(daemon.settings.kafka.alerts_topic, send)
        workers.append(SinkWorker(sink, export, retries=5, backoff_s=0.5, queue_size=size))
    hook = settings.webhook
    if hook.url:
        webhook = WebhookSink(hook.url, hook.timeout_s, hook.headers)
        workers.append(
            SinkWorker(
                webhook,
                export,
                retries=hook.retries,
                backoff_s=hook.retry_backoff_s,
                queue_size=size,
            )
        )
    am = settings.alertmanager
    if am.url:
        push = AlertmanagerSink(am.url, am.timeout_s, am.generator_url)
        workers.append(
            SinkWorker(
                push, export, retries=am.retries, backoff_s=am.retry_backoff_s, queue_size=size
            )
        )
    return workers


def install(daemon: Daemon) -> None:
    """Attach the monitor to ``daemon`` (startup hook, batch listener, routes, task)."""
    from promptd.daemon.api.monitoring import add_routes
    from promptd.daemon.app import ConfigurationError
    from promptd.storage.alerts import AlertStore
    from promptd.storage.repository import EventRepository
    from promptd.storage.snapshots import SnapshotStore, last_ids

    from .monitor import Monitor, rebuild_windows
    from .snapshot import restore

    settings = daemon.settings.monitoring
    window_config = settings.window_config()
    try:
        rules = load_rules(settings.rule_dicts(), window_config)
    except RuleConfigError as exc:
        # ConfigurationError is what `promptd run` reports as one line (exit 1).
        raise ConfigurationError(f"[monitoring] {exc}") from exc
    export = MonitorExport(daemon.registry, settings.label_cardinality_cap)
    triggers = daemon.components["optimization_triggers"]
    signals = MonitorSignals(daemon.settings.evaluation)

    async def setup() -> None:
        db = daemon.db
        assert db is not None
        snapshots = SnapshotStore(db) if settings.snapshot_interval_s > 0 else None
        restored = await restore(window_config, db, time.time(), signals) if snapshots else None
        if restored is not None:
            store, covered = restored
        else:
            # Before ingestion starts: the windows hold every stored row up to now.
            covered = await last_ids(db)
            store = WindowStore(window_config)
            await rebuild_windows(store, db, time.time(), settings.rebuild_horizon_s, signals)
        alerts = AlertStore(db)
        monitor = Monitor(
            settings,
            rules,
            store,
            alerts,
            export,
            triggers,
            build_sinks(daemon, export),
            snapshots=snapshots,
            episodes=EventRepository(db),
            signals=signals,
        )
        monitor.covered = covered
        await monitor.restore()
        await alerts.purge_history(time.time() - settings.history_retention_s)
        daemon.components["monitor"] = monitor
        daemon.batch_listeners.append(monitor.on_batch)

        def routes(app: web.Application) -> None:
            add_routes(app, monitor, alerts)

        daemon.route_extensions.append(routes)
        daemon.task_factories.append(("monitor", monitor.run))

    daemon.startup_hooks.append(setup)


def get_monitor(daemon: Daemon) -> Monitor | None:
    """The daemon's monitor once started (``None`` when monitoring is off)."""
    monitor: Monitor | None = daemon.components.get("monitor")
    return monitor
