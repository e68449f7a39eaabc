"""What every client command shares: errors, the running daemon's address, HTTP calls."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from promptd.daemon.settings import Settings

RUNTIME_FILE = "runtime.json"


class CommandError(Exception):
    """A command failed; the message is shown as one line."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def runtime_path(settings: Settings) -> Path:
    """Where a running daemon records its HTTP port and Kafka address."""
    return settings.storage.data_dir / RUNTIME_FILE


def read_runtime(settings: Settings) -> dict[str, Any]:
    """The running daemon's runtime record, or ``{}``."""
    try:
        data = json.loads(runtime_path(settings).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resolve_bootstrap(settings: Settings) -> str:
    """Kafka address: configured, else the embedded broker of a running daemon."""
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers
    runtime = read_runtime(settings)
    if runtime.get("bootstrap_servers"):
        return str(runtime["bootstrap_servers"])
    raise CommandError(
        "no Kafka address: set PROMPTD_KAFKA_BOOTSTRAP_SERVERS, or start `promptd run` "
        "(its embedded broker is found through the data dir)"
    )


def base_url(settings: Settings) -> str:
    """URL of the daemon's HTTP API (the runtime record knows an ephemeral port)."""
    runtime = read_runtime(settings)
    host = settings.http.host if settings.http.host not in ("0.0.0.0", "::") else "127.0.0.1"
    port = runtime.get("http_port") or settings.http.port
    return f"http://{host}:{port}"


def http_json(
    settings: Settings, method: str, path: str, body: Any = None, timeout: float = 10.0
) -> Any:
    """Call the daemon's API; raise :class:`CommandError` with the server's message."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base_url(settings) + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if settings.http.admin_token:
        request.add_header("Authorization", f"Bearer {settings.http.admin_token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise CommandError(f"{method} {path}: HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CommandError(f"daemon not reachable at {base_url(settings)}: {exc}") from None
