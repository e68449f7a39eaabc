"""The HTTP API: health, readiness, Prometheus metrics and status.

Other parts of the daemon add their routes through :func:`add_routes` callbacks; every
mutating route goes through :func:`require_admin` and reads its body with
:func:`read_json_body`. No input gives a 5xx: bad bodies and headers are 4xx, and an
unexpected exception is logged and answered with a JSON 500 by :func:`error_middleware`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from promptd.daemon.ports import bind_reason, check_bindable
from promptd.daemon.settings import Settings

log = structlog.get_logger("promptd.http")

if TYPE_CHECKING:
    from pydantic import BaseModel

RouteExtension = Callable[[web.Application], None]
ModelT = TypeVar("ModelT", bound="BaseModel")


class Served(Protocol):
    """What the HTTP API needs of the daemon (``app.Daemon`` is the one implementation)."""

    settings: Settings
    registry: CollectorRegistry
    route_extensions: list[RouteExtension]

    def health(self) -> tuple[bool, str]: ...

    def readiness(self) -> tuple[bool, str]: ...

    def role(self) -> dict[str, Any]: ...

    def degraded(self) -> list[str]: ...

    async def status(self) -> dict[str, Any]: ...


DAEMON_KEY: web.AppKey[Served] = web.AppKey("daemon")

#: Largest request body accepted (413 above it).
MAX_BODY_BYTES = 1024 * 1024
#: Deepest JSON nesting accepted in a request body (every API body is a flat object).
MAX_JSON_DEPTH = 32


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    """A JSON error body ``{"error": message, ...}`` with ``status``."""
    return web.json_response({"error": message, **extra}, status=status)


def _http_error(kind: type[web.HTTPError], message: str) -> web.HTTPError:
    return kind(text=json.dumps({"error": message}), content_type="application/json")


def _too_large(size: int | None) -> web.HTTPRequestEntityTooLarge:
    message = f"the request body is over the limit of {MAX_BODY_BYTES} bytes"
    return web.HTTPRequestEntityTooLarge(
        MAX_BODY_BYTES,
        size if size is not None else MAX_BODY_BYTES + 1,
        text=json.dumps({"error": message}),
        content_type="application/json",
    )


def _is_json_type(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


async def read_json_body(request: web.Request) -> Any:
    """The request's JSON body (``{}`` when there is none), or a JSON 4xx raised.

    Every POST route reads its body through this one function, so every route refuses
    the same inputs the same way: 413 over :data:`MAX_BODY_BYTES`; 415 unless the
    Content-Type is JSON (which also keeps browsers from posting cross-site without a
    preflight); 400 for a body that is not UTF-8, not JSON, holds NaN or infinities, or
    is nested deeper than :data:`MAX_JSON_DEPTH`.
    """
    if not request.body_exists:
        return {}
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _too_large(request.content_length)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(None) from None
    if not raw.strip():
        return {}
    if not _is_json_type(request.content_type):
        raise _http_error(web.HTTPUnsupportedMediaType, "Content-Type must be application/json")
    return parse_json_body(raw)


async def read_body(request: web.Request, model: type[ModelT]) -> ModelT:
    """The request's body (:func:`read_json_body`) validated as ``model``; a JSON 400
    naming the first problem otherwise (an unknown key with the closest allowed one)."""
    from pydantic import ValidationError

    from promptd._validation import validation_message

    raw = await read_json_body(request)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _http_error(web.HTTPBadRequest, validation_message(exc, model)) from None


def parse_json_body(raw: bytes) -> Any:
    """Parse a request body strictly (UTF-8, finite numbers, bounded depth); 400 if not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _http_error(web.HTTPBadRequest, "the request body is not UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        value = _TOO_DEEP
    except ValueError as exc:
        raise _http_error(
            web.HTTPBadRequest, f"the request body is not valid JSON: {exc}"
        ) from None
    if value is _TOO_DEEP or _nested_deeper_than(value, MAX_JSON_DEPTH):
        raise _http_error(
            web.HTTPBadRequest,
            f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
        )
    return value


_TOO_DEEP = object()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def _nested_deeper_than(value: Any, limit: int) -> bool:
    # Iterative, so checking a hostile value cannot itself overflow the stack.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """JSON errors everywhere: aiohttp's own 4xx (404, 405, 413…) get a JSON body, and an
    unexpected exception is logged with its traceback and answered with a JSON 500 that
    does not show internals."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return web.json_response({"error": exc.reason}, status=exc.status, headers=headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("http_request_failed", method=request.method, path=request.path)
        return json_error(500, "internal error; the daemon logged it (http_request_failed)")
    return response


def require_admin(request: web.Request) -> web.Response | None:
    """``None`` when the bearer token matches the admin token, else a 401 response.

    Constant-time comparison. Without a configured token, mutating routes only answer
    on a loopback bind (the daemon refuses to start otherwise), so local use works.
    """
    daemon = request.app[DAEMON_KEY]
    token = daemon.settings.http.admin_token
    if token is None:
        return None
    header = request.headers.get("Authorization")
    if not header:
        return json_error(401, MISSING_TOKEN)
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return json_error(401, f"the Authorization header is not 'Bearer …': {MISSING_TOKEN}")
    # aiohttp keeps non-UTF-8 header bytes as surrogate escapes: compare the raw bytes.
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given_bytes, token.encode()):
        return json_error(401, WRONG_TOKEN)
    return None


#: The 401 answers: a missing token and a wrong one need different fixes.
MISSING_TOKEN = (
    "this route needs the daemon's admin token: send 'Authorization: Bearer <token>' with "
    "the value of its PROMPTD_ADMIN_TOKEN (the promptd CLI sends PROMPTD_ADMIN_TOKEN from "
    "its own environment)"
)
WRONG_TOKEN = (
    "wrong admin token: the bearer token is not the daemon's PROMPTD_ADMIN_TOKEN (set the "
    "same value where the request comes from)"
)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def domain_errors(handler: Handler) -> Handler:
    """Map the registry's errors (their ``status``), validation errors and an unknown
    name looked up in a table of settings (``KeyError``, e.g. a rollout profile) to JSON
    4xx."""
    from pydantic import ValidationError

    from promptd._validation import validation_message
    from promptd.replacement.registry import RegistryError

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except RegistryError as exc:
            return json_error(exc.status, str(exc))
        except KeyError as exc:
            return json_error(400, str(exc.args[0]) if exc.args else "unknown key")
        except ValidationError as exc:
            return json_error(400, validation_message(exc))

    return wrapped


def admin_only(handler: Handler) -> Handler:
    """:func:`domain_errors`, behind :func:`require_admin`."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        denied = require_admin(request)
        if denied is not None:
            return denied
        return await handler(request)

    return domain_errors(wrapped)


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
    """Readiness: connected to Kafka and storage open (a leader); the database reachable
    (a standby). The body says which role this daemon has and who leads;
    ``?role=leader`` is ready only on the leader (a Service that targets the leader).
    ``degraded`` lists parts that work only in part (an evaluator down) without making
    the daemon unready."""
    daemon = request.app[DAEMON_KEY]
    ready, reason = daemon.readiness()
    role = daemon.role()
    wanted = request.query.get("role")
    if wanted is not None and wanted != role["role"]:
        ready, reason = False, f"this daemon is the {role['role']}, not the {wanted}"
    body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "reason": reason, **role}
    degraded = daemon.degraded()
    if degraded:
        body["degraded"] = degraded
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of the daemon's registry."""
    body = generate_latest(request.app[DAEMON_KEY].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status(request: web.Request) -> web.Response:
    """``/v1/status``: counters, Kafka connection and lag, as JSON."""
    return web.json_response(await request.app[DAEMON_KEY].status())


class HttpBindError(RuntimeError):
    """The HTTP API cannot listen on its address; the message names the settings."""


def _http_bind_error(host: str, port: int, exc: OSError) -> HttpBindError:
    return HttpBindError(
        f"cannot listen on {host}:{port} (http.host / http.port: PROMPTD_HTTP_HOST, "
        f"PROMPTD_HTTP_PORT or --http-host, --http-port): {bind_reason(exc)}"
    )


def check_http_port(host: str, port: int) -> None:
    """:func:`check_bindable` for the HTTP API: :class:`HttpBindError` naming the settings."""
    try:
        check_bindable(host, port)
    except OSError as exc:
        raise _http_bind_error(host, port, exc) from None


async def start_site(
    runner: web.AppRunner, host: str, port: int, reuse_port: bool = False
) -> web.TCPSite:
    """Listen on ``host:port``; :class:`HttpBindError` (one clear line) if that fails."""
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        raise _http_bind_error(host, port, exc) from None
    return site


def build_app(daemon: Served, middlewares: Sequence[Any] = ()) -> web.Application:
    """The aiohttp application with the core routes and every registered extension
    (``middlewares`` run inside the error middleware)."""
    app = web.Application(
        client_max_size=MAX_BODY_BYTES, middlewares=[error_middleware, *middlewares]
    )
    app[DAEMON_KEY] = daemon
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/status", status)
    for add in daemon.route_extensions:
        add(app)
    return app
