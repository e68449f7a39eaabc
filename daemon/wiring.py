"""Plug the parts (registry and rollouts, monitoring, optimization, evaluation) into a
:class:`Daemon`.

Each part adds a startup hook that builds it once storage is open; the hook registers
the part's batch listener, HTTP routes and background task. The core lifecycle in
``app.py`` does not grow with every feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from aiohttp import web

from promptd.daemon.app import Daemon
from promptd.daemon.rollout_profiles import profile_lookup
from promptd.monitoring.rules import Notification, fingerprint
from promptd.monitoring.triggers import TriggerQueue
from promptd.routing import Routing

if TYPE_CHECKING:
    from promptd.replacement.controller import StarvationAlert


def install_components(daemon: Daemon) -> None:
    """Attach every component to ``daemon``."""
    # The monitor hands optimization triggers to the optimizer through this queue.
    daemon.components["optimization_triggers"] = TriggerQueue()
    install_rollouts(daemon)
    if daemon.settings.monitoring.enabled:
        from promptd.monitoring.component import install as install_monitoring

        install_monitoring(daemon)
    from promptd.daemon.optimize_component import install as install_optimizer

    install_optimizer(daemon)
    from promptd.evaluation.component import install as install_evaluation

    install_evaluation(daemon)
    install_traces(daemon)


def install_traces(daemon: Daemon) -> None:
    """``POST /v1/traces``: OTLP/HTTP export, published to the OTLP topic."""
    settings = daemon.settings
    if settings.kafka.otlp_topic is None:
        return
    from promptd.daemon.api.traces import Record, add_routes
    from promptd.daemon.kafka import KafkaSendError

    async def publish(topic: str, records: Sequence[Record]) -> None:
        if daemon.producer is None or not daemon.kafka_ready:
            raise KafkaSendError(topic, "Kafka is not connected yet")
        await daemon.producer.send_many(topic, records)

    daemon.route_extensions.append(lambda app: add_routes(app, settings, publish))


STARVATION_RULE = "rollout_starved"


def starvation_notification(alert: StarvationAlert) -> Notification:
    """The ``rollout_starved`` alert as a notification for the monitor's sinks."""
    labels = {
        "alertname": STARVATION_RULE,
        "prompt": alert.prompt,
        "rollout_id": alert.rollout_id,
        "severity": "warning",
    }
    return Notification(
        rule=STARVATION_RULE,
        fingerprint=fingerprint(labels),
        labels=labels,
        state="firing" if alert.firing else "resolved",
        reason=alert.reason,
        metric="rollout_samples",
        value=None,
        threshold=None,
        baseline=None,
        severity="warning",
        started_at=alert.started_at,
        resolved_at=None if alert.firing else alert.at,
        degradation=False,
        window_seconds=0.0,
    )


def install_rollouts(daemon: Daemon) -> None:
    """The prompt registry, routing and the rollout controller."""
    from promptd.daemon.api.pipelines import add_routes as add_pipeline_routes
    from promptd.daemon.api.prompts import add_routes
    from promptd.daemon.kafka import KafkaSendError
    from promptd.replacement.controller import RolloutController
    from promptd.replacement.metrics import RolloutMetrics
    from promptd.replacement.pipelines import PipelineRegistry
    from promptd.replacement.registry import Registry

    settings = daemon.settings
    metrics = RolloutMetrics(daemon.registry)

    async def publish(routing: Routing) -> None:
        if daemon.producer is None or not daemon.kafka_ready:
            raise KafkaSendError(settings.kafka.routing_topic, "Kafka is not connected yet")
        await daemon.producer.send(
            settings.kafka.routing_topic,
            routing.model_dump_json().encode(),
            key=routing.prompt.encode(),
        )

    async def alert(starved: StarvationAlert) -> None:
        # Through the monitor's sinks (log, Kafka, webhook, Alertmanager) when it runs;
        # the controller has logged it either way.
        monitor = daemon.components.get("monitor")
        if monitor is not None:
            monitor.notify(starvation_notification(starved))

    def build(follower: bool) -> tuple[Registry, PipelineRegistry, RolloutController]:
        # A follower (a standby's) serves the registry, routing and stored rollouts from
        # the database, and never acts: no publisher, no alerts, no snapshots.
        assert daemon.db is not None
        registry = Registry(daemon.db, settings.rollout.default_profile)
        pipelines = PipelineRegistry(daemon.db, registry)
        controller = RolloutController(
            daemon.db,
            registry,
            profile_lookup(settings.rollout),  # type: ignore[arg-type]
            metrics,
            publish=None if follower else publish,
            alert=None if follower else alert,
            routing_ttl_s=settings.http.routing_ttl_s,
            snapshot_interval_s=0.0 if follower else settings.rollout.snapshot_interval_s,
            pipelines=pipelines,
            follower=follower,
            # One rule for timestamps ahead of the clock, the monitor's and the rollouts'.
            max_future_s=settings.monitoring.max_future_s,
            signals_of=lambda prompt: settings.evaluation.signals_for(prompt, "rollout"),
        )
        metric = settings.rollout.default_primary_metric

        def routes(app: web.Application) -> None:
            add_routes(app, controller, registry, metric)
            add_pipeline_routes(app, pipelines, controller, metric)

        daemon.route_extensions.append(routes)
        return registry, pipelines, controller

    async def setup() -> None:
        registry, pipelines, controller = build(follower=False)
        await controller.resume()
        daemon.components["registry"] = registry
        daemon.components["rollouts"] = controller
        daemon.components["pipelines"] = pipelines
        daemon.batch_listeners.append(controller.on_batch)
        daemon.task_factories.append(
            ("rollouts", lambda stop: controller.run(stop, settings.rollout.tick_interval_s))
        )

    async def standby_setup() -> None:
        build(follower=True)

    daemon.startup_hooks.append(setup)
    daemon.standby_hooks.append(standby_setup)
