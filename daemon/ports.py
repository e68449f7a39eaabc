"""Listening ports, checked before the slow part of start-up.

``promptd run`` binds the HTTP API and (in development) the embedded broker's port only
after migrations and the broker's start. A port in use must be reported at once, so
both are checked first with :func:`check_bindable`.
"""

from __future__ import annotations

import errno
import socket


def bind_reason(exc: OSError) -> str:
    """Why a listening socket could not be bound, in words."""
    return {
        errno.EADDRINUSE: "address already in use (another promptd or program has it)",
        errno.EADDRNOTAVAIL: "no such address on this machine",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
    }.get(exc.errno or 0, exc.strerror or str(exc))


def check_bindable(host: str, port: int) -> None:
    """Bind ``host:port`` as a server would (SO_REUSEADDR, every address of ``host``) and
    let go at once; ``OSError`` if that fails. Port 0 always works."""
    if port == 0:
        return
    for family, kind, proto, _, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
