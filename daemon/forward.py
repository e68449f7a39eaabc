"""A standby's HTTP API: reads from the database, everything else handed to the leader.

Why mutations go to the leader rather than through the standby's own transactions: the
leader's rollout controller applies every transition and every manual command under one
lock against its live state, then publishes routing; its optimizer owns the runs. A
standby that wrote a rollback itself would race the leader's next tick, which holds the
state from before it (a transition lost or applied twice). Handed to the leader, every
documented guarantee holds as with one daemon: manual commands win over a tick in
flight, no transition is applied twice, routing changes with the transaction.

So a standby answers itself only ``GET`` routes it mounts (registry, routing, stored
rollouts and pipelines: all read from the database, routing at every request), plus
health, readiness, metrics and status. Everything else goes to the leader's
``ha.advertise_url`` with the caller's ``Authorization``; the answer is passed back as
it is. ``GET /v1/rollouts/{id}`` is asked of the leader first (its live arms and
statistics), the stored view being the fallback. With no leader, or none answering, a
mutation gets 503 with ``Retry-After``; nothing is lost or applied twice.
"""

from __future__ import annotations

from typing import Any, Final

import aiohttp
import structlog
from aiohttp import web

from promptd.daemon.http import Handler, json_error
from promptd.daemon.leadership import Leadership

log = structlog.get_logger("promptd.forward")

#: Marks a request a standby handed on (a second standby refuses it rather than loop).
FORWARDED_BY: Final = "X-Promptd-Forwarded-By"
#: Names the daemon that answered a forwarded request.
SERVED_BY: Final = "X-Promptd-Served-By"
#: Routes the standby answers itself whatever the method.
_LOCAL: Final = frozenset({"/healthz", "/readyz", "/metrics", "/v1/status"})
#: Reads the leader answers better (live state in memory); the stored view is the fallback.
_LEADER_FIRST: Final = ("/v1/rollouts/",)
_PASSED_HEADERS: Final = ("authorization", "content-type", "accept")
SESSION_KEY: web.AppKey[list[aiohttp.ClientSession]] = web.AppKey("forward_session")


def _answers_locally(request: web.Request) -> bool:
    if request.path in _LOCAL:
        return True
    if request.method not in ("GET", "HEAD") or request.match_info.http_exception is not None:
        return False
    return not request.path.startswith(_LEADER_FIRST)


def forwarding_middleware(leadership: Leadership, timeout_s: float) -> Any:
    """The standby app's middleware (see the module docstring)."""

    @web.middleware
    async def forward(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _answers_locally(request):
            return await handler(request)
        if FORWARDED_BY in request.headers:
            return _no_leader("this daemon is a standby too (the leadership just changed)")
        address = _leader_address(leadership)
        local = request.match_info.http_exception is None and request.method == "GET"
        if address is None:
            if local:
                return await handler(request)
            return _no_leader("no leader is elected right now")
        try:
            return await _send(request, address, leadership, timeout_s)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("forward_failed", leader=address, path=request.path, error=repr(exc))
            if local:
                return await handler(request)
            return _no_leader(f"the leader at {address} did not answer: {exc!r}")

    return forward


def _leader_address(leadership: Leadership) -> str | None:
    lease = leadership.lease
    if lease is None or lease.expires_in_s <= 0 or lease.holder == leadership.identity:
        return None
    return lease.address


def _no_leader(why: str) -> web.Response:
    response = json_error(503, f"this daemon is a standby and {why}; retry shortly")
    response.headers["Retry-After"] = "2"
    return response


async def _send(
    request: web.Request, address: str, leadership: Leadership, timeout_s: float
) -> web.Response:
    sessions = request.app[SESSION_KEY]
    if not sessions:
        sessions.append(aiohttp.ClientSession())
    headers = {k: v for k, v in request.headers.items() if k.lower() in _PASSED_HEADERS}
    headers[FORWARDED_BY] = leadership.identity
    body = await request.read() if request.body_exists else None
    async with sessions[0].request(
        request.method,
        address.rstrip("/") + request.rel_url.path_qs,
        headers=headers,
        data=body,
        allow_redirects=False,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as answer:
        payload = await answer.read()
        out = web.Response(status=answer.status, body=payload)
        for name in ("Content-Type", "Retry-After", "Allow"):
            if name in answer.headers:
                out.headers[name] = answer.headers[name]
        out.headers[SERVED_BY] = leadership.lease.holder if leadership.lease else "leader"
        return out


def install(app: web.Application) -> None:
    """Give ``app`` the client session the middleware forwards with (closed with it)."""
    sessions: list[aiohttp.ClientSession] = []
    app[SESSION_KEY] = sessions

    async def close(_: web.Application) -> None:
        for session in sessions:
            await session.close()

    app.on_cleanup.append(close)
