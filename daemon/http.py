"""The HTTP API: health, readiness, Prometheus metrics and status.

Other parts of the daemon add their routes through :func:`add_routes` callbacks; every
mutating route goes through :func:`require_admin`.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from promptd.daemon.app import Daemon

DAEMON_KEY: web.AppKey[Daemon] = web.AppKey("daemon")


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    """A JSON error body ``{"error": message, ...}`` with ``status``."""
    return web.json_response({"error": message, **extra}, status=status)


def require_admin(request: web.Request) -> web.Response | None:
    """``None`` when the bearer token matches the admin token, else a 401 response.

    Constant-time comparison. Without a configured token, mutating routes only answer
    on a loopback bind (the daemon refuses to start otherwise), so local use works.
    """
    daemon = request.app[DAEMON_KEY]
    token = daemon.settings.http.admin_token
    if token is None:
        return None
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        return json_error(401, "missing or wrong admin token (Authorization: Bearer …)")
    return None


def is_loopback(host: str) -> bool:
    """True for loopback addresses and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process works (a stalled consumer is not alive in this sense)."""
    healthy, reason = request.app[DAEMON_KEY].health()
    return web.json_response(
        {"status": "ok" if healthy else "unhealthy", "reason": reason},
        status=200 if healthy else 503,
    )


async def readyz(request: web.Request) -> web.Response:
    """Readiness: connected to Kafka and storage open."""
    ready, reason = request.app[DAEMON_KEY].readiness()
    return web.json_response(
        {"status": "ready" if ready else "not_ready", "reason": reason},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of the daemon's registry."""
    body = generate_latest(request.app[DAEMON_KEY].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status(request: web.Request) -> web.Response:
    """``/v1/status``: counters, Kafka connection and lag, as JSON."""
    return web.json_response(await request.app[DAEMON_KEY].status())


def build_app(daemon: Daemon) -> web.Application:
    """The aiohttp application with the core routes and every registered extension."""
    app = web.Application(client_max_size=1024 * 1024)
    app[DAEMON_KEY] = daemon
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/status", status)
    for add in daemon.route_extensions:
        add(app)
    return app
