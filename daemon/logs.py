"""structlog configuration: JSON lines when not on a terminal, a console view on one.

Event names are stable snake_case strings (``batch_stored``, ``consumer_stalled``…);
context goes in key-value pairs. Operators grep and alert on the names.

Third-party libraries (aiokafka, aiohttp, asyncio) log through the standard library; their
records go through structlog's ``ProcessorFormatter`` and come out in the same format, with
``logger`` naming their source, so a JSON log stays JSON.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def configure_logging(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    *,
    third_party_level: str | None = None,
    capture_warnings: bool = False,
) -> None:
    """Configure structlog and the standard library's root logger once per process.

    Third-party loggers log at ``third_party_level``; by default at warning and above
    (their reconnect chatter would drown our lines), or at debug when ``level`` is debug.
    ``capture_warnings`` routes Python warnings into the log too (the CLI does; tests
    keep pytest's own warning handling).
    """
    numeric = _LEVELS.get(level, logging.ERROR)
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = _Handler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    # Replace our earlier handler only: others (pytest's capture) stay.
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    if third_party_level is not None:
        root.setLevel(_LEVELS.get(third_party_level, logging.CRITICAL))
    else:
        root.setLevel(logging.DEBUG if numeric == logging.DEBUG else max(numeric, logging.WARNING))
    logging.captureWarnings(capture_warnings)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs (recognised when reconfiguring)."""
