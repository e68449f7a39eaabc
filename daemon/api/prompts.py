"""HTTP routes of the registry, routing and rollouts (``/v1/prompts``, ``/v1/rollouts``).

Mutating routes need the admin bearer token (see :func:`require_admin`). Errors are JSON
``{"error": …}`` with 400 (bad body, including a bad name in it), 401, 404, 409
(conflicting state, e.g. a command on a rollout another command just ended) or 422 (a bad
prompt name in the path, changed placeholders).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from promptd.daemon.http import admin_only, domain_errors, read_body
from promptd.daemon.rollout_profiles import experiment_profile_name
from promptd.events import MAX_PROMPT_CHARS
from promptd.replacement import machine
from promptd.replacement.controller import RolloutController
from promptd.replacement.registry import (
    NewVersion,
    PromptName,
    Registry,
    RegistryError,
    VersionName,
    check_name,
)

CONTROLLER_KEY: web.AppKey[RolloutController] = web.AppKey("rollout_controller")
REGISTRY_KEY: web.AppKey[Registry] = web.AppKey("registry")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Experiment(BaseModel):
    """A fixed-split A/B experiment: one step at ``candidate_share`` until significance."""

    model_config = ConfigDict(extra="forbid")

    candidate_share: float = Field(default=0.2, gt=0.0, lt=1.0)
    min_samples_per_arm: int = Field(default=500, ge=1)
    alpha: float = Field(default=0.05, gt=0.0, lt=0.5)
    min_duration_s: float = Field(default=3600.0, ge=0.0)


class StartRollout(BaseModel):
    """Body of ``POST /v1/rollouts`` (``experiment`` instead of ``profile`` for a fixed split)."""

    model_config = ConfigDict(extra="forbid")

    prompt: PromptName
    candidate_version: VersionName
    profile: str | None = Field(default=None, max_length=200)
    experiment: Experiment | None = None
    primary_metric: Literal["feedback_score", "success_rate", "quality"] | None = None
    # Promote only on a significant win; else end as no_improvement at the horizon.
    require_win: StrictBool = False


class Restore(BaseModel):
    """Body of ``POST /v1/prompts/{name}/restore``."""

    model_config = ConfigDict(extra="forbid")

    version: VersionName


class Reason(BaseModel):
    """Optional body of the rollout commands."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=1000)


# Every route maps the registry's errors, validation errors and an unknown profile name
# (KeyError) to JSON 4xx; mutating routes also need the admin token.
_errors = domain_errors
_admin = admin_only


async def _body(request: web.Request, model: type[BaseModel]) -> Any:
    return await read_body(request, model)


@_errors
async def list_prompts(request: web.Request) -> web.StreamResponse:
    """``GET /v1/prompts``."""
    registry = request.app[REGISTRY_KEY]
    live = await request.app[CONTROLLER_KEY].live_prompt_names()
    prompts = [
        p.model_dump() | {"rollout_live": p.name in live} for p in await registry.list_prompts()
    ]
    return web.json_response({"prompts": prompts})


@_errors
async def get_prompt(request: web.Request) -> web.StreamResponse:
    """``GET /v1/prompts/{name}``: the prompt, its active version and routing."""
    name = request.match_info["name"]
    registry = request.app[REGISTRY_KEY]
    prompt = await registry.get_prompt(name)
    active = await registry.active(name)
    routing = await request.app[CONTROLLER_KEY].routing(name)
    return web.json_response(
        prompt.model_dump()
        | {
            "active": active.model_dump() if active else None,
            "routing": routing.model_dump(),
        }
    )


@_errors
async def list_versions(request: web.Request) -> web.StreamResponse:
    """``GET /v1/prompts/{name}/versions``: the history, oldest first."""
    versions = await request.app[REGISTRY_KEY].versions(request.match_info["name"])
    return web.json_response({"versions": [v.model_dump() for v in versions]})


def _prompt_name(request: web.Request) -> str:
    """The ``{name}`` of the path, validated like every prompt name (422 otherwise)."""
    return check_name("prompt", request.match_info["name"], MAX_PROMPT_CHARS)


@_admin
async def register_version(request: web.Request) -> web.StreamResponse:
    """``POST /v1/prompts/{name}/versions``."""
    name = _prompt_name(request)
    body = await _body(request, NewVersion)
    version = await request.app[REGISTRY_KEY].register(name, body)
    controller = request.app[CONTROLLER_KEY]
    controller.mark_routing_dirty(name)
    await controller.flush_routing()
    return web.json_response(version.model_dump(), status=201)


@_admin
async def restore_version(request: web.Request) -> web.StreamResponse:
    """``POST /v1/prompts/{name}/restore``: make an earlier version active (the backup)."""
    name = _prompt_name(request)
    body = await _body(request, Restore)
    version = await request.app[REGISTRY_KEY].restore(name, body.version)
    controller = request.app[CONTROLLER_KEY]
    controller.mark_routing_dirty(name)
    await controller.flush_routing()
    return web.json_response(version.model_dump())


@_errors
async def get_routing(request: web.Request) -> web.StreamResponse:
    """``GET /v1/prompts/{name}/routing``: what the SDK needs to pick a version."""
    routing = await request.app[CONTROLLER_KEY].routing(request.match_info["name"])
    return web.json_response(routing.model_dump())


@_errors
async def list_rollouts(request: web.Request) -> web.StreamResponse:
    """``GET /v1/rollouts``."""
    return web.json_response({"rollouts": await request.app[CONTROLLER_KEY].list()})


@_errors
async def get_rollout(request: web.Request) -> web.StreamResponse:
    """``GET /v1/rollouts/{id}``: state, step, weight, arms, statistics, decision log."""
    body = await request.app[CONTROLLER_KEY].describe(request.match_info["id"])
    return web.json_response(body)


def _start_handler(default_metric: str) -> Handler:
    @_admin
    async def start_rollout(request: web.Request) -> web.StreamResponse:
        """``POST /v1/rollouts``: start a rollout of a candidate version."""
        body = await _body(request, StartRollout)
        controller = request.app[CONTROLLER_KEY]
        profile = body.profile
        if body.experiment is not None:
            if profile is not None:
                raise RegistryError("give either profile or experiment, not both")
            e = body.experiment
            profile = experiment_profile_name(
                e.candidate_share, e.min_samples_per_arm, e.alpha, e.min_duration_s
            )
        row = await controller.start_rollout(
            body.prompt,
            body.candidate_version,
            profile,
            body.primary_metric or default_metric,
            require_win=body.require_win,
        )
        return web.json_response(await controller.describe(row.id), status=201)

    return start_rollout


_COMMANDS: dict[str, type[machine.Pause | machine.Resume | machine.Promote | machine.Rollback]] = {
    "pause": machine.Pause,
    "resume": machine.Resume,
    "promote": machine.Promote,
    "rollback": machine.Rollback,
}


@_admin
async def rollout_command(request: web.Request) -> web.StreamResponse:
    """``POST /v1/rollouts/{id}/promote|rollback|pause|resume``: manual commands win."""
    action = request.match_info["action"]
    body = await _body(request, Reason)
    event_type = _COMMANDS[action]
    event = event_type(reason=body.reason or f"manual {action}")
    controller = request.app[CONTROLLER_KEY]
    row = await controller.command(request.match_info["id"], event)
    return web.json_response(await controller.describe(row.id))


def add_routes(
    app: web.Application,
    controller: RolloutController,
    registry: Registry,
    default_metric: str,
) -> None:
    """Register the registry, routing and rollout routes on ``app``."""
    app[CONTROLLER_KEY] = controller
    app[REGISTRY_KEY] = registry
    r = app.router
    r.add_get("/v1/prompts", list_prompts)
    r.add_get("/v1/prompts/{name}", get_prompt)
    r.add_get("/v1/prompts/{name}/versions", list_versions)
    r.add_post("/v1/prompts/{name}/versions", register_version)
    r.add_post("/v1/prompts/{name}/restore", restore_version)
    r.add_get("/v1/prompts/{name}/routing", get_routing)
    r.add_get("/v1/rollouts", list_rollouts)
    r.add_post("/v1/rollouts", _start_handler(default_metric))
    r.add_get("/v1/rollouts/{id}", get_rollout)
    r.add_post("/v1/rollouts/{id}/{action:promote|rollback|pause|resume}", rollout_command)
