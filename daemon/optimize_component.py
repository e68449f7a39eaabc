"""Wiring of the optimizer into the daemon.

A startup hook builds the :class:`~promptd.optimization.runner.OptimizationRunner` once
storage, the registry and the rollout controller exist (``install_rollouts`` runs
first), checks the configured strategies and tracking, loads the runs a restart cut
short (the ``optimizer`` task resumes them once the daemon is ready), mounts the HTTP
routes and adds the task that consumes the monitor's trigger queue.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from promptd.daemon.kafka import KafkaSendError

if TYPE_CHECKING:
    from promptd.daemon.app import Daemon


def install(daemon: Daemon) -> None:
    """Attach the optimizer to ``daemon`` (startup hook, routes, task)."""
    from aiohttp import web

    from promptd.daemon.api.optimize import add_routes
    from promptd.daemon.api.pools import add_routes as add_pool_routes
    from promptd.daemon.app import ConfigurationError
    from promptd.optimization.episodes import EpisodeStore
    from promptd.optimization.metrics import OptimizationMetrics
    from promptd.optimization.pool_refresh import PoolBuilder, PoolRefresher
    from promptd.optimization.runner import OptimizationRunner
    from promptd.optimization.strategies import known_strategies
    from promptd.optimization.tracking import TrackingUnavailable, build_tracker
    from promptd.storage.pools import PoolStore

    settings = daemon.settings
    metrics = OptimizationMetrics(daemon.registry)

    async def publish(event: dict[str, Any]) -> None:
        if daemon.producer is None or not daemon.kafka_ready:
            raise KafkaSendError(settings.kafka.optimization_topic, "Kafka is not connected yet")
        await daemon.producer.send(
            settings.kafka.optimization_topic,
            json.dumps(event, default=str).encode(),
            key=str(event["prompt"]).encode(),
        )

    async def setup() -> None:
        assert daemon.db is not None
        known = known_strategies()
        unknown = [s for s in settings.optimization.strategies if s not in known]
        if unknown:
            raise ConfigurationError(
                f"optimization.strategies: unknown strategy {unknown[0]!r}; known: {known}"
            )
        try:
            tracker = build_tracker(settings.optimization.tracking)
        except TrackingUnavailable as exc:
            raise ConfigurationError(str(exc)) from None
        registry = daemon.components["registry"]
        rollouts = daemon.components["rollouts"]
        runner = OptimizationRunner(
            daemon.db,
            registry,
            rollouts,
            settings.optimization,
            metrics,
            publish,
            primary_metric=settings.rollout.default_primary_metric,
            tracker=tracker,
            # A trigger for a pipeline's prompt optimizes the pipeline on its episodes
            # and hands the result to one coordinated rollout.
            pipelines=daemon.components["pipelines"],
            episodes=EpisodeStore(
                daemon.db,
                settings.optimization.example_max_age_days * 86_400,
                settings.optimization.max_examples,
            ),
            # Runs a stop cut short resume once /readyz would answer 200.
            ready=lambda: daemon.readiness()[0],
            signals_of=lambda prompt: settings.evaluation.signals_for(prompt, "optimizer"),
        )
        await runner.resume()
        daemon.components["optimizer"] = runner
        queue = daemon.components["optimization_triggers"]
        # Demonstration pools: built from the optimizer's example store, refreshed on a
        # schedule (a refresh with enough new demos asks for a knn run).
        pools = PoolStore(daemon.db)
        builder = PoolBuilder(runner.services.examples, pools, settings.optimization)
        refresher = PoolRefresher(builder, registry, runner.submit)
        daemon.components["demo_pools"] = refresher

        def routes(app: web.Application) -> None:
            add_routes(app, runner, registry, rollouts)
            add_pool_routes(app, pools, builder, registry, settings.optimization.knn.embedding)

        daemon.route_extensions.append(routes)
        daemon.task_factories.append(("optimizer", lambda stop: runner.run(stop, queue)))
        daemon.task_factories.append(("demo_pools", refresher.run))

    daemon.startup_hooks.append(setup)
