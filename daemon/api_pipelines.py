"""HTTP routes of pipelines (``/v1/pipelines``).

* ``POST /v1/pipelines`` (admin) — register or redefine a pipeline: body
  ``{"name": "qa", "steps": [{"prompt": "extract", "bindings": {"text": "input.text"}},
  {"prompt": "answer", "bindings": {"facts": "extract.output",
  "question": "input.question"}}]}``. 201 with the definition; 422 when it does not fit
  the registry (the error says what), 409 when a prompt already belongs to another one.
* ``GET /v1/pipelines`` — every pipeline; ``GET /v1/pipelines/{name}`` — one.
"""

from __future__ import annotations

from aiohttp import web

from promptd.daemon.http import admin_only, domain_errors, read_json_body
from promptd.replacement.pipelines import PipelineRegistry

PIPELINES_KEY: web.AppKey[PipelineRegistry] = web.AppKey("pipelines")


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


def add_routes(app: web.Application, pipelines: PipelineRegistry) -> None:
    """Mount the pipeline routes on ``app``."""
    app[PIPELINES_KEY] = pipelines
    app.router.add_post("/v1/pipelines", register_pipeline)
    app.router.add_get("/v1/pipelines", list_pipelines)
    app.router.add_get("/v1/pipelines/{name}", get_pipeline)
