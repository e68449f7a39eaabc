"""HTTP API of online evaluation: ``GET /v1/evaluators`` and ``GET /v1/evaluators/{name}``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from promptd.daemon.http import json_error

if TYPE_CHECKING:
    from promptd.evaluation.engine import Engine


def add_routes(app: web.Application, engine: Engine) -> None:
    """Register the evaluation routes on ``app``."""

    async def list_evaluators(request: web.Request) -> web.Response:
        """Every evaluator: configuration, counts since start (sampled, scored, skipped by
        reason), stored results and costs, health, agreement with people."""
        return web.json_response({"evaluators": await engine.describe()})

    async def one_evaluator(request: web.Request) -> web.Response:
        """One evaluator as in the list, with its most recent results."""
        name = request.match_info["name"]
        for item in await engine.describe():
            if item["name"] == name:
                return web.json_response({**item, "recent": await engine.recent(name)})
        return json_error(404, f"no evaluator named {name!r}")

    app.router.add_get("/v1/evaluators", list_evaluators)
    app.router.add_get("/v1/evaluators/{name}", one_evaluator)
