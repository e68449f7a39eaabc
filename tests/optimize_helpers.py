"""Helpers for the optimizer's tests: examples written straight into the event tables,
recording stand-ins for the rollout controller, and a runner on a database."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from promptd.events import FeedbackEvent, MetricEvent
from promptd.optimization.config import OptimizationSettings
from promptd.optimization.metrics import OptimizationMetrics
from promptd.optimization.runner import OptimizationRunner
from promptd.replacement.registry import Registry
from promptd.storage.database import Database
from promptd.storage.repository import EventRepository
from tests.optimize_fake_llm import FakeLLM


@dataclass(frozen=True)
class Row:
    """One captured call and the feedback scores it got."""

    request_id: str
    input: dict[str, Any] | str
    output: str
    scores: tuple[float, ...]
    comment: str | None = None
    correction: str | None = None


async def seed(db: Database, prompt: str, rows: list[Row], now: float | None = None) -> None:
    """Store a MetricEvent (with capture) and its FeedbackEvents for every row, through
    the same repository call as ingestion (so the time ranges are recorded too)."""
    ts = time.time() if now is None else now
    metrics: list[MetricEvent] = []
    feedback: list[FeedbackEvent] = []
    for i, r in enumerate(rows):
        metrics.append(
            MetricEvent(
                event_id=uuid.uuid4().hex,
                ts=ts - 100 + i,
                prompt=prompt,
                variant="v1",
                model="m",
                request_id=r.request_id,
                latency_ms=10.0,
                success=True,
                input=r.input,
                output=r.output,
            )
        )
        for j, score in enumerate(r.scores):
            feedback.append(
                FeedbackEvent(
                    event_id=uuid.uuid4().hex,
                    ts=ts - 50 + i + j * 0.01,
                    prompt=prompt,
                    variant="v1",
                    request_id=r.request_id,
                    score=score,
                    kind="quality",
                    comment=r.comment if j == 0 else None,
                    correction=r.correction if j == 0 else None,
                )
            )
    await EventRepository(db).store_batch(metrics, feedback, {})


def run_services(
    db: Database,
    settings: Any,
    *,
    episodes: Any = None,
    rollouts: Any = None,
    registry: Any = None,
) -> Any:
    """The services a run uses, on ``db`` (a fresh metrics registry, no publishing)."""
    from prometheus_client import CollectorRegistry

    from promptd.optimization.examples import ExampleStore
    from promptd.optimization.llm import LiteLLMClient
    from promptd.optimization.metrics import OptimizationMetrics
    from promptd.optimization.services import RunServices
    from promptd.optimization.store import OptimizationStore
    from promptd.optimization.tracking import NoTracker
    from promptd.replacement.registry import Registry

    async def publish(event: dict[str, Any]) -> None:
        return None

    return RunServices(
        settings=settings,
        store=OptimizationStore(db),
        registry=registry or Registry(db),
        rollouts=rollouts,
        examples=ExampleStore(db, 30 * 86_400, 2_000),
        episodes=episodes,
        client_factory=lambda: LiteLLMClient(0, 0.0),
        clock=time.time,
        publish=publish,
        metrics=OptimizationMetrics(CollectorRegistry()),
        tracker=NoTracker(),
        primary_metric="feedback_score",
    )


class FakeRollouts:
    """Records rollout starts; ``status`` says how each ends."""

    def __init__(self) -> None:
        self.started: list[dict[str, Any]] = []
        self.status: dict[str, str] = {}

    def live_prompts(self) -> set[str]:
        """Prompts with a running rollout."""
        return {s["prompt"] for s in self.started if self.status[s["id"]] == "running"}

    async def start_rollout(
        self,
        prompt: str,
        candidate: str,
        profile: str | None = None,
        primary_metric: str = "feedback_score",
        require_win: bool = False,
    ) -> Any:
        """Remember the start."""
        rid = f"ro-{len(self.started) + 1}"
        self.started.append(
            {
                "id": rid,
                "prompt": prompt,
                "candidate": candidate,
                "profile": profile,
                "require_win": require_win,
            }
        )
        self.status[rid] = "running"
        return type("Rollout", (), {"id": rid})()

    async def describe(self, rollout_id: str) -> dict[str, Any]:
        """The rollout's status."""
        return {"id": rollout_id, "status": self.status[rollout_id]}

    async def list(self) -> list[dict[str, Any]]:
        """Every rollout, as the controller lists them."""
        return [
            {
                "id": s["id"],
                "prompt": s["prompt"],
                "candidate_version": s["candidate"],
                "members": [],
                "status": self.status[s["id"]],
            }
            for s in self.started
        ]


class PipelineRollouts(FakeRollouts):
    """Also records coordinated pipeline rollouts."""

    def __init__(self) -> None:
        super().__init__()
        self.pipelines: list[dict[str, Any]] = []

    async def start_pipeline_rollout(
        self,
        pipeline: str,
        candidates: dict[str, str],
        profile: str | None = None,
        primary_metric: str = "feedback_score",
        require_win: bool = False,
    ) -> Any:
        """Remember the start."""
        rid = f"pro-{len(self.pipelines) + 1}"
        self.pipelines.append(
            {"id": rid, "pipeline": pipeline, "candidates": candidates, "require_win": require_win}
        )
        self.status[rid] = "running"
        return type("Rollout", (), {"id": rid})()

    async def list(self) -> list[dict[str, Any]]:
        """Prompt and pipeline rollouts."""
        pipelines = [
            {
                "id": p["id"],
                "members": [{"prompt": k, "candidate": v} for k, v in p["candidates"].items()],
                "status": self.status[p["id"]],
            }
            for p in self.pipelines
        ]
        return [*await super().list(), *pipelines]


def runner_settings(fake: FakeLLM | None, **over: Any) -> OptimizationSettings:
    """Small searches on the scripted model at ``fake`` (no evaluation model without it)."""
    model = (
        {"model": "openai/test-model", "api_base": fake.api_base, "temperature": 0.0}
        if fake
        else None
    )
    base: dict[str, Any] = {
        "proposer": model,
        "evaluation": {"model": model, "metric": "token_f1", "bootstrap_samples": 1000},
        "retry_backoff_s": 0.01,
        "schedule_check_interval_s": 3600,
        "fewshot": {"num_candidates": 3},
        "instruction": {"n_candidates": 2, "depth": 2},
        "mipro": {"num_instructions": 2, "num_demo_sets": 2, "num_trials": 4},
    }
    return OptimizationSettings.model_validate({**base, **over})


def make_runner(
    db: Database, settings: OptimizationSettings, rollouts: FakeRollouts | None = None, **kw: Any
) -> OptimizationRunner:
    """A runner on ``db`` with a fresh metrics registry, publishing nowhere."""
    return OptimizationRunner(
        db,
        kw.pop("registry", None) or Registry(db),
        rollouts if rollouts is not None else FakeRollouts(),
        settings,
        OptimizationMetrics(CollectorRegistry()),
        publish=no_publish,
        **kw,
    )


async def no_publish(event: dict[str, Any]) -> None:
    """The optimization topic, discarded."""
    return


async def run_once(
    runner: OptimizationRunner, strategies: list[str] | None = None, prompt: str = "city"
) -> dict[str, Any]:
    """Start a manual run of ``prompt`` and wait for its end; its row."""
    _decision, run_id = await runner.start_manual(prompt, strategies, "test")
    await runner.wait_idle()
    run = await runner.get_run(run_id)
    assert run is not None
    return run
