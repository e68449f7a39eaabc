"""Small asyncio helpers shared by the daemon and the SDK (standard library only)."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set or ``seconds`` pass; True when it is set.

    Built on ``asyncio.timeout`` rather than ``asyncio.wait_for``: on Python 3.11,
    ``wait_for`` can lose a cancellation that races with its own timeout, which left a
    cancelled background loop waiting forever (seen in the hard-stop tests).
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(max(seconds, 0.0)):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def wait_any(first: asyncio.Event, second: asyncio.Event, seconds: float) -> None:
    """Wait until ``first`` or ``second`` is set, at most ``seconds``."""
    waiters = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
