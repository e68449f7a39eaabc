"""HTTP API of the monitor: ``GET /v1/alerts`` and ``GET /v1/prompts/{name}/stats``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from promptd.daemon.http import json_error
from promptd.monitoring.rules import parse_duration

if TYPE_CHECKING:
    from promptd.monitoring.monitor import Monitor
    from promptd.storage.alerts import AlertStore

MAX_RECENT = 1000


def add_routes(app: web.Application, monitor: Monitor, alerts: AlertStore) -> None:
    """Register the monitoring routes on ``app``."""

    async def list_alerts(request: web.Request) -> web.Response:
        """Active (pending and firing) alerts and the recent history, newest first."""
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            return json_error(400, "limit must be an integer")
        limit = max(0, min(limit, MAX_RECENT))
        recent = await alerts.recent(limit) if limit else []
        return web.json_response({"active": monitor.active(), "recent": recent})

    async def prompt_stats(request: web.Request) -> web.Response:
        """Window statistics of one prompt per variant (``?window=5m``, default 5m)."""
        name = request.match_info["name"]
        raw = request.query.get("window", "5m")
        try:
            window = parse_duration(raw)
            if window <= 0:
                raise ValueError("window must be positive")
            monitor.store.tier_for(window)
        except ValueError as exc:
            return json_error(400, f"window: {exc}")
        return web.json_response(monitor.prompt_stats(name, window))

    app.router.add_get("/v1/alerts", list_alerts)
    app.router.add_get("/v1/prompts/{name}/stats", prompt_stats)
