"""Hostile HTTP input: every route of the real daemon answers it with a 4xx, never a 5xx.

The requests are written byte for byte on a raw TCP connection, so header values can be
non-UTF-8 and bodies anything at all, as an attacker or a broken client would send them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web

from promptd.daemon.http import build_app

pytestmark = pytest.mark.integration

TOKEN = "hostile-test-admin-token"
DEEP = 100_000


def _raw_request(
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if body or method == "POST":
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def _send(port: int, request: bytes) -> int:
    """Send one raw request; return the status code of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        # The server may answer (413, 401) before it has read a large body and close.
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", status_line)
    assert match, f"no HTTP answer: {status_line!r}"
    return int(match[1])


def _paths(app: web.Application) -> Iterator[tuple[str, str]]:
    """(method, concrete path) for every route, placeholders filled in, every alternative."""
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        info = route.resource.get_info()
        formatter = info.get("formatter", info.get("path", ""))
        pattern = info["pattern"].pattern if "pattern" in info else ""
        # A placeholder restricted to alternatives (``{action:promote|rollback}``) is
        # tried with each of them; any other placeholder gets ``x``.
        restricted = dict(re.findall(r"\(\?P<(\w+)>([\w|]+)\)", pattern))
        name, alternatives = next(iter(restricted.items()), ("", ""))
        for choice in alternatives.split("|"):
            path = formatter.replace("{" + name + "}", choice) if name else formatter
            yield route.method, re.sub(r"\{\w+\}", "x", path)


def _admin(extra: list[tuple[bytes, bytes]] | None = None) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", f"Bearer {TOKEN}".encode()), *(extra or [])]


JSON = [(b"Content-Type", b"application/json")]

#: name -> (headers, body, path suffix): hostile requests sent to every route.
CASES: dict[str, tuple[list[tuple[bytes, bytes]], bytes, str]] = {
    "non_utf8_bearer": ([(b"Authorization", b"Bearer \xff\xfe\xfd")], b"{}", ""),
    "non_utf8_authorization": ([(b"Authorization", b"\xc3\x28 \xa0\xa1")], b"{}", ""),
    "non_utf8_content_type": (_admin([(b"Content-Type", b"application/\xffjson")]), b"{}", ""),
    "bogus_charset": (_admin([(b"Content-Type", b"text/plain; charset=bogus")]), b"{}", ""),
    "form_body": (
        _admin([(b"Content-Type", b"application/x-www-form-urlencoded")]),
        b"reason=a&reason=b",
        "",
    ),
    "multipart_garbage": (
        _admin([(b"Content-Type", b"multipart/form-data; boundary=zz")]),
        b"--zz\r\ngarbage",
        "",
    ),
    "nested_arrays": (_admin(JSON), b"[" * DEEP + b"]" * DEEP, ""),
    "nested_objects": (_admin(JSON), b'{"a":' * DEEP + b"1" + b"}" * DEEP, ""),
    "nested_in_field": (
        _admin(JSON),
        b'{"reason": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        "",
    ),
    "moderately_nested": (_admin(JSON), b"[" * 900 + b"]" * 900, ""),
    "nul_bytes": (_admin(JSON), b"\x00\x00{\x00}", ""),
    "nul_in_strings": (
        _admin(JSON),
        b'{"template": "a\\u0000b", "version": "\\u0000", "reason": "\\u0000"}',
        "",
    ),
    "invalid_utf8_body": (_admin(JSON), b'{"reason": "\xff\xfe"}', ""),
    "not_an_object": (_admin(JSON), b'"just a string"', ""),
    "huge_number": (_admin(JSON), b'{"reason": 1e999999}', ""),
    "nan": (_admin(JSON), b'{"reason": NaN}', ""),
    "non_utf8_query": (_admin(), b"", "?limit=%ff%fe&window=%00&prompt=%c3%28"),
    "nul_query": (_admin(), b"", "?limit=%00&window=5m%00"),
}


@pytest.fixture
async def daemon_port(
    make_settings: Callable[..., Any], start_daemon: Callable[..., Any]
) -> tuple[int, web.Application]:
    """A running daemon with every component and an admin token."""
    running = await start_daemon(make_settings(http={"admin_token": TOKEN}), ready=False)
    return running.daemon.http_port, build_app(running.daemon)


#: The probes answer 503 by design while the daemon is not healthy or ready (here: it has
#: just started); that is their answer, not a server error.
PROBES = {"/healthz", "/readyz"}


async def _failures(
    port: int, app: web.Application, wanted: Callable[[str, str, str], bool]
) -> list[tuple[str, str, str, int]]:
    failures = []
    for method, path in _paths(app):
        for name, (headers, body, suffix) in CASES.items():
            if not wanted(method, path, name):
                continue
            status = await _send(port, _raw_request(method, path + suffix, headers, body))
            if status >= 500 and not (path in PROBES and status == 503):
                failures.append((method, path, name, status))
    return failures


async def test_hostile_requests_never_get_a_5xx(daemon_port: tuple[int, web.Application]) -> None:
    """Non-UTF-8 headers, 100k-deep JSON, wrong content types, NULs, odd queries: on every
    route of the daemon, each gets an answer below 500."""
    port, app = daemon_port
    failures = await _failures(port, app, lambda m, p, c: True)
    assert failures == [], "\n".join(map(str, failures))


async def test_optimize_route_reads_hostile_bodies_safely(
    daemon_port: tuple[int, web.Application],
) -> None:
    """POST /v1/optimize/{prompt} answers deep and mis-encoded bodies with a 4xx."""
    port, app = daemon_port
    failures = await _failures(
        port, app, lambda m, p, c: m == "POST" and p.startswith("/v1/optimize/")
    )
    assert failures == [], "\n".join(map(str, failures))


async def test_huge_bodies_are_refused_with_413(daemon_port: tuple[int, web.Application]) -> None:
    """A body over the size limit gets 413 on every POST route, never a 5xx."""
    port, app = daemon_port
    body = b'{"reason": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    statuses = {
        path: await _send(port, _raw_request(method, path, _admin(JSON), body))
        for method, path in _paths(app)
        if method == "POST"
    }
    assert statuses
    assert set(statuses.values()) == {413}, statuses


async def test_nul_in_path_segments(daemon_port: tuple[int, web.Application]) -> None:
    """Path parameters holding NUL or non-UTF-8 escapes get a 4xx (or a 200 for reads of
    nothing), never a 5xx."""
    port, app = daemon_port
    failures = []
    for method, path in _paths(app):
        for bad in ("%00", "a%00b", "%ff%fe", "%c3%28"):
            hostile = path.replace("/x", "/" + bad)
            if hostile == path:
                continue
            status = await _send(port, _raw_request(method, hostile, _admin(JSON), b"{}"))
            if status >= 500:
                failures.append((method, hostile, status))
    assert failures == [], "\n".join(map(str, failures))


async def test_unexpected_exception_is_a_logged_json_500() -> None:
    """An unexpected exception in a handler is logged and becomes a JSON 500 (not
    aiohttp's HTML page) that does not show the exception to the client."""
    from structlog.testing import capture_logs

    from promptd.daemon.http import error_middleware

    async def boom(request: web.Request) -> web.Response:
        raise ZeroDivisionError("secret detail")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/boom", boom)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        with capture_logs() as logs:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_raw_request("GET", "/boom", []))
            raw = await reader.read()
            writer.close()
    finally:
        await runner.cleanup()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500")
    assert b"application/json" in head
    assert b'"error"' in body
    assert b"secret detail" not in body
    failed = [e for e in logs if e["event"] == "http_request_failed"]
    assert len(failed) == 1
    assert failed[0]["path"] == "/boom"
    assert failed[0]["log_level"] == "error"


async def test_unknown_route_and_method_are_json(
    daemon_port: tuple[int, web.Application],
) -> None:
    """aiohttp's own 404 and 405 come back as JSON errors, 405 with its Allow header."""
    import aiohttp

    port, _ = daemon_port
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/nope") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "Not Found"
        async with http.delete(f"http://127.0.0.1:{port}/v1/status") as resp:
            assert resp.status == 405
            assert "GET" in resp.headers["Allow"]
            assert "error" in await resp.json()


@pytest.mark.parametrize(
    ("headers", "body", "status", "message"),
    [
        (JSON, b"[" * DEEP + b"]" * DEEP, 400, "nested too deeply (at most 32 levels)"),
        (JSON, b'{"reason": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "nested too deeply"),
        (JSON, b'{"reason": NaN}', 400, "NaN is not a JSON number"),
        (JSON, b'{"reason": "\xff"}', 400, "not UTF-8"),
        (JSON, b"{oops", 400, "not valid JSON"),
        ([(b"Content-Type", b"text/plain")], b'{"reason": "x"}', 415, "application/json"),
    ],
)
async def test_bad_bodies_get_a_clear_json_error(
    daemon_port: tuple[int, web.Application],
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    status: int,
    message: str,
) -> None:
    """Each kind of bad body is refused with its own status and a one-line JSON reason."""
    port, _ = daemon_port
    request = _raw_request("POST", "/v1/rollouts/x/pause", _admin(headers), body)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    raw = await reader.read()
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode()), head
    assert message in json.loads(payload)["error"]
