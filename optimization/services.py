"""What a run uses of the daemon: one small object instead of the whole runner.

:class:`RunServices` is built once by the
:class:`~promptd.optimization.runner.OptimizationRunner` and handed to every run: the
settings, the stores, the registry and the rollout controller, the model client, the
clock, the event channel, metrics and tracking. A run reads nothing else of the runner;
what the runner must learn from a run's end reaches it through the callback the run's
task is given (see :mod:`promptd.optimization.task`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from promptd.optimization.config import OptimizationSettings
from promptd.optimization.examples import ExampleStore
from promptd.optimization.llm import LLMClient
from promptd.optimization.metrics import OptimizationMetrics
from promptd.optimization.plan import RunPlan
from promptd.optimization.store import OptimizationStore
from promptd.optimization.targets import EpisodeSource
from promptd.optimization.tracking import Tracker
from promptd.replacement.registry import Registry

log = structlog.get_logger("promptd.optimizer")

Publish = Callable[[dict[str, Any]], Awaitable[None]]


class Rollouts(Protocol):
    """The part of the rollout controller the optimizer uses."""

    def live_prompts(self) -> set[str]:
        """Prompts with a live rollout."""
        ...

    async def start_rollout(
        self,
        prompt: str,
        candidate: str,
        profile: str | None = None,
        primary_metric: str = "feedback_score",
        *,
        require_win: bool = False,
    ) -> Any:
        """Start a rollout; returns the stored rollout (with ``id``)."""
        ...

    async def start_pipeline_rollout(
        self,
        pipeline: str,
        candidates: Mapping[str, str],
        *,
        profile: str | None = None,
        primary_metric: str | None = None,
        require_win: bool = False,
    ) -> Any:
        """Start one coordinated rollout of a pipeline's changed steps."""
        ...

    async def describe(self, rollout_id: str) -> dict[str, Any]:
        """A rollout as the API shows it (with ``status``)."""
        ...

    async def list(self) -> list[dict[str, Any]]:
        """Recent rollouts (``id``, ``prompt``, ``candidate_version``, ``members``...)."""
        ...


@dataclass(frozen=True)
class RunServices:
    """See the module docstring."""

    settings: OptimizationSettings
    store: OptimizationStore
    registry: Registry
    rollouts: Rollouts
    examples: ExampleStore
    episodes: EpisodeSource | None
    client_factory: Callable[[], LLMClient]
    clock: Callable[[], float]
    publish: Publish
    metrics: OptimizationMetrics
    tracker: Tracker
    primary_metric: str

    async def emit(self, event: str, plan: RunPlan, **fields: Any) -> None:
        """One optimization event: to the log (without template text) and to the topic."""
        log.info(
            event,
            run_id=plan.run_id,
            prompt=plan.prompt,
            **{k: v for k, v in fields.items() if k not in ("template", "details")},
        )
        body = {"event": event, "run_id": plan.run_id, "prompt": plan.prompt, "ts": self.clock()}
        try:
            await self.publish({**body, **fields})
        except Exception as exc:
            # The topic is a notification channel; a run never fails because Kafka is down.
            log.warning("optimization_publish_failed", event_name=event, error=repr(exc))
