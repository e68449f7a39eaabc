"""Wiring of online evaluation into the daemon.

:func:`install` runs when the daemon is assembled (after the registry's hook, so version
output schemas can be looked up). Its startup hook, once storage is open and before
ingestion starts, builds the :class:`~.engine.Engine`, places its cursor and plans the
re-read of calls a restart left undecided; then registers the batch listener, the HTTP
routes, the readiness detail and the ``evaluation`` task. Without evaluators (or with
``evaluation.enabled = false``) nothing is installed and nothing changes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from .config import EvaluationSettings, JudgeEvaluator

if TYPE_CHECKING:
    from promptd.daemon.app import Daemon
    from promptd.monitoring.rules import Notification

    from .engine import Engine

log = structlog.get_logger("promptd.evaluation")

OUTAGE_RULE = "evaluator_down"
#: Output schemas of prompt versions kept in memory (versions are immutable).
SCHEMA_CACHE = 1000


def notification(
    rule: str, labels: dict[str, str], firing: bool, reason: str, at: float
) -> Notification:
    """An evaluation alert as a notification for the monitor's sinks."""
    from promptd.monitoring.rules import Notification, fingerprint

    full = {"alertname": rule, **labels, "severity": "warning"}
    return Notification(
        rule=rule,
        fingerprint=fingerprint(full),
        labels=full,
        state="firing" if firing else "resolved",
        reason=reason,
        metric=rule,
        value=None,
        threshold=None,
        baseline=None,
        severity="warning",
        started_at=at,
        resolved_at=None if firing else at,
        degradation=False,
        window_seconds=0.0,
    )


def install(daemon: Daemon) -> None:
    """Attach the evaluation engine to ``daemon`` when evaluators are configured."""
    settings: EvaluationSettings = daemon.settings.evaluation
    if not settings.active:
        return

    async def setup() -> None:
        engine = build_engine(daemon, settings)
        await engine.start()
        daemon.components["evaluation"] = engine
        daemon.batch_listeners.append(engine.on_batch)
        daemon.readiness_details.append(engine.readiness_detail)

        def routes(app: Any) -> None:
            from promptd.daemon.api.evaluation import add_routes

            add_routes(app, engine)

        daemon.route_extensions.append(routes)

        async def run(stop: Any) -> None:
            try:
                await engine.run(stop)
            finally:
                if any(isinstance(e, JudgeEvaluator) for e in settings.evaluators):
                    from promptd.optimization.llm import close_litellm

                    # Judges' calls leave litellm's logging worker behind (see there).
                    await close_litellm()

        daemon.task_factories.append(("evaluation", run))

    daemon.startup_hooks.append(setup)


def build_engine(daemon: Daemon, settings: EvaluationSettings) -> Engine:
    """The engine on the daemon's storage, producer, registry, metrics and alert sinks."""
    import time

    from promptd.daemon.kafka import KafkaSendError
    from promptd.monitoring.sinks import log_notification
    from promptd.optimization.llm import LiteLLMClient

    from .calibrator import ALERT_RULE, Calibrator
    from .engine import Engine
    from .metrics import EvaluationMetrics
    from .outbox import Outbox, Record
    from .runner import Runner
    from .store import EvaluationStore

    assert daemon.db is not None
    store = EvaluationStore(daemon.db)
    metrics = EvaluationMetrics(daemon.registry, daemon.settings.monitoring.label_cardinality_cap)
    topic = daemon.settings.kafka.feedback_topic

    async def publish(records: Sequence[Record]) -> None:
        if daemon.producer is None or not daemon.kafka_ready:
            raise KafkaSendError(topic, "Kafka is not connected yet")
        await daemon.producer.send_many(topic, [(k, v, []) for k, v in records])

    def alert(note: Notification) -> None:
        monitor = daemon.components.get("monitor")
        if monitor is not None:
            monitor.notify(note)
        else:
            log_notification(note)

    def on_outage(evaluator: str, down: bool, reason: str) -> None:
        alert(notification(OUTAGE_RULE, {"evaluator": evaluator}, down, reason, time.time()))

    def on_agreement(prompt: str, evaluator: str, firing: bool, reason: str) -> None:
        labels = {"evaluator": evaluator, "prompt": prompt}
        alert(notification(ALERT_RULE, labels, firing, reason, time.time()))

    clients = {
        e.name: LiteLLMClient(max_retries=e.retries, backoff_s=0.5)
        for e in settings.evaluators
        if isinstance(e, JudgeEvaluator)
    }
    runner = Runner(settings, metrics, clients, _schema_lookup(daemon), store.correction, on_outage)
    outbox = Outbox(store, publish, metrics, settings.outbox_interval_s)
    calibrator = Calibrator(settings, store, metrics, on_agreement)
    return Engine(
        settings,
        store,
        metrics,
        runner,
        outbox,
        calibrator,
        retention_days=daemon.settings.storage.retention_days,
    )


def _schema_lookup(daemon: Daemon) -> Any:
    """``(prompt, version) -> output schema | None`` through the registry, cached."""
    cache: OrderedDict[tuple[str, str], dict[str, Any] | None] = OrderedDict()

    async def schema_of(prompt: str, version: str) -> dict[str, Any] | None:
        key = (prompt, version)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        registry = daemon.components.get("registry")
        schema = None
        if registry is not None:
            from promptd.replacement.registry import NotFound

            try:
                found = await registry.get_version(prompt, version)
            except NotFound:
                found = None
            if found is not None and found.config:
                schema = found.config.get("output_schema")
        cache[key] = schema
        if len(cache) > SCHEMA_CACHE:
            cache.popitem(last=False)
        return schema

    return schema_of


def get_engine(daemon: Daemon) -> Engine | None:
    """The daemon's evaluation engine once started (``None`` without evaluators)."""
    engine: Engine | None = daemon.components.get("evaluation")
    return engine
