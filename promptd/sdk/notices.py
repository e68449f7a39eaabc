"""What the SDK tells the app's operator: one warning per cause, and a summary at exit.

The SDK never raises into the app for a delivery problem, so it must not hide one either.
A cause (no Kafka address, a misspelled ``PROMPTD_`` variable, the first event dropped for
a reason) is logged once per process on the ``promptd.sdk`` logger; a client that ends
with undelivered events says so in one line when it closes (at interpreter exit for the
default client). Without logging configured, Python prints warnings to stderr.

``logging`` is imported on the first notice, so ``import promptd`` stays light.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from promptd.sdk.stats import SdkStats

LOGGER = "promptd.sdk"

#: Why events of each drop reason were not delivered, and what to do about it.
DROP_EXPLANATIONS: Mapping[str, str] = {
    "no_bootstrap": "no Kafka address: set PROMPTD_KAFKA_BOOTSTRAP_SERVERS or "
    "promptd.configure(bootstrap_servers=...), `promptd run` without Kafka listens on "
    "localhost:9092",
    "queue_full": "the in-memory buffer of queue_size events was full",
    "invalid": "invalid events",
    "send_failed": "the broker did not accept them after send_retries attempts",
    "unknown_request": "feedback on a request id this process does not remember: pass "
    "prompt= and variant=",
    "shutdown": "still buffered when the client closed, after at most exit_flush_timeout_s",
}

_warned: set[str] = set()
_lock = threading.Lock()


def warn(message: str) -> None:
    """Log ``message`` as a warning of the SDK (never raises)."""
    # A notice must never break the app, not even with a broken logging setup.
    with contextlib.suppress(Exception):
        import logging

        logging.getLogger(LOGGER).warning("promptd SDK: %s", message)


def warn_once(cause: str, message: str) -> None:
    """:func:`warn` the first time ``cause`` is seen in this process."""
    if cause in _warned:  # the common case, on the hot path of dropping: no lock
        return
    with _lock:
        if cause in _warned:
            return
        _warned.add(cause)
    warn(message)


def drop_notice(reason: str, detail: str | None = None) -> None:
    """Warn once per reason the first time an event is dropped for it."""
    if f"drop:{reason}" in _warned:
        return
    explanation = DROP_EXPLANATIONS.get(reason, reason)
    if detail:
        explanation = f"{explanation}: {detail}"
    warn_once(
        f"drop:{reason}",
        f"an event was dropped ({reason}): {explanation}; promptd.sdk_stats() counts them",
    )


def undelivered_summary(
    stats: SdkStats, bootstrap_servers: str | None, last_errors: Mapping[str, Any]
) -> str | None:
    """One line on what was not delivered, or None when everything was.

    Names the count, each reason with its count and explanation, and the last Kafka
    error the sender saw (a broker that never answered shows here).
    """
    lost = stats.dropped + stats.buffered
    if not lost:
        return None
    reasons = [
        f"{count} {reason} ({DROP_EXPLANATIONS.get(reason, reason)})"
        for reason, count in sorted(stats.dropped_by_reason.items())
        if count
    ]
    if stats.buffered:
        reasons.append(f"{stats.buffered} still buffered")
    line = f"{lost} of {stats.emitted} events were not delivered: {'; '.join(reasons)}"
    error = last_errors.get("connect") or last_errors.get("send")
    if error and bootstrap_servers:
        line += f"; last Kafka error at {bootstrap_servers}: {error}"
    return line
