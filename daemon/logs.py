"""structlog configuration: JSON lines when not on a terminal, a console view on one.

Event names are stable snake_case strings (``batch_stored``, ``consumer_stalled``…);
context goes in key-value pairs. Operators grep and alert on the names.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def configure_logging(
    level: str = "info", fmt: Literal["auto", "json", "console"] = "auto"
) -> None:
    """Configure structlog (and the stdlib loggers of aiokafka & co.) once per process."""
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
    # Third-party stdlib logging (aiokafka, aiohttp) goes to stderr at warning and above,
    # so their reconnect chatter does not drown our own lines.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, force=True)
