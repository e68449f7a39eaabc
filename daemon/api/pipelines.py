"""HTTP routes of pipelines (``/v1/pipelines``).

* ``POST /v1/pipelines`` (admin) — register or redefine a pipeline: body
  ``{"name": "qa", "steps": [{"prompt": "extract", "bindings": {"text": "input.text"}},
  {"prompt": "answer", "bindings": {"facts": "extract.output",
  "question": "input.question"}}]}``. 201 with the definition; 422 when it does not fit
  the registry (the error says what), 409 when a prompt already belongs to another one
  or, for a redefinition, while a coordinated rollout of the pipeline is live.
* ``GET /v1/pipelines`` — every pipeline; ``GET /v1/pipelines/{name}`` — one.
* ``POST /v1/pipelines/{name}/rollouts`` (admin) — start one coordinated rollout of the
  pipeline: body ``{"candidates": {"extract": "v3", "answer": "v2"}, "profile"?,
  "primary_metric"?, "require_win"?}``. 201 with the rollout as ``GET /v1/rollouts/{id}``
  shows it (``pipeline`` and ``members`` included); 400 for a malformed body, 404 for an
  unknown pipeline or version, 409 while a step (or a prompt related to one) has a live
  rollout or a candidate is already active, 422 for candidates that are not steps of the
  pipeline. The rollout's commands (``/v1/rollouts/{id}/promote|rollback|...``) act on
  every step at once.
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from promptd.daemon.http import admin_only, domain_errors, read_body, read_json_body
from promptd.replacement.controller import RolloutController
from promptd.replacement.pipelines import MAX_STEPS, PipelineRegistry
from promptd.replacement.registry import PromptName, VersionName

PIPELINES_KEY: web.AppKey[PipelineRegistry] = web.AppKey("pipelines")
ROLLOUTS_KEY: web.AppKey[RolloutController] = web.AppKey("pipeline_rollouts")
DEFAULT_METRIC_KEY: web.AppKey[str] = web.AppKey("pipeline_default_metric")


class StartPipelineRollout(BaseModel):
    """Body of ``POST /v1/pipelines/{name}/rollouts``: the changed steps' candidates."""

    model_config = ConfigDict(extra="forbid")

    candidates: dict[PromptName, VersionName] = Field(min_length=1, max_length=MAX_STEPS)
    profile: str | None = Field(default=None, max_length=200)
    primary_metric: Literal["feedback_score", "success_rate", "quality"] | None = None
    # Promote only on a significant win; else end as no_improvement at the horizon.
    require_win: StrictBool = False


@admin_only
async def register_pipeline(request: web.Request) -> web.StreamResponse:
    """Register a pipeline."""
    body = await read_json_body(request)
    if not isinstance(body, dict):
        return web.json_response({"error": "the body must be a JSON object"}, status=400)
    pipeline = await request.app[PIPELINES_KEY].register(body)
    return web.json_response(pipeline.to_dict(), status=201)


@domain_errors
async def list_pipelines(request: web.Request) -> web.StreamResponse:
    """Every pipeline."""
    pipelines = await request.app[PIPELINES_KEY].list()
    return web.json_response({"pipelines": [p.to_dict() for p in pipelines]})


@domain_errors
async def get_pipeline(request: web.Request) -> web.StreamResponse:
    """One pipeline."""
    pipeline = await request.app[PIPELINES_KEY].get(request.match_info["name"])
    return web.json_response(pipeline.to_dict())


@admin_only
async def start_pipeline_rollout(request: web.Request) -> web.StreamResponse:
    """Start a coordinated rollout of a pipeline's candidates."""
    body = await read_body(request, StartPipelineRollout)
    controller = request.app[ROLLOUTS_KEY]
    row = await controller.start_pipeline_rollout(
        request.match_info["name"],
        body.candidates,
        profile=body.profile,
        primary_metric=body.primary_metric or request.app[DEFAULT_METRIC_KEY],
        require_win=body.require_win,
    )
    return web.json_response(await controller.describe(row.id), status=201)


def add_routes(
    app: web.Application,
    pipelines: PipelineRegistry,
    rollouts: RolloutController,
    default_metric: str,
) -> None:
    """Mount the pipeline routes on ``app``."""
    app[PIPELINES_KEY] = pipelines
    app[ROLLOUTS_KEY] = rollouts
    app[DEFAULT_METRIC_KEY] = default_metric
    app.router.add_post("/v1/pipelines", register_pipeline)
    app.router.add_get("/v1/pipelines", list_pipelines)
    app.router.add_get("/v1/pipelines/{name}", get_pipeline)
    app.router.add_post("/v1/pipelines/{name}/rollouts", start_pipeline_rollout)
