"""The sender thread's asyncio loop: encode batches, deliver them, run background tasks.

Runs only inside the SDK's daemon thread (see :mod:`promptd.sdk.publisher`). The idle
loop polls the buffer every ``poll_interval_s`` instead of being woken per event, because
a cross-thread wake-up (``call_soon_threadsafe``) would cost the hot path microseconds;
``flush`` and ``close`` do wake it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from promptd._aio import wait_event
from promptd.sdk.encode import Encoder, Record

if TYPE_CHECKING:
    from promptd.sdk.config import SdkConfig
    from promptd.sdk.kafka import KafkaSink
    from promptd.sdk.stats import Counters

#: A coroutine run in the sender loop beside the publisher (routing refresh, metrics).
BackgroundTask = Callable[["Sender"], Coroutine[Any, Any, None]]


class Outbox(Protocol):
    """What the sender needs from the buffer it drains (the publisher implements it)."""

    config: SdkConfig
    counters: Counters
    #: False without a bootstrap address: nothing is sent (background tasks still run).
    enabled: bool
    #: True once the buffer is closing; ``stop_deadline`` is when delivery gives up.
    stopping: bool
    stop_deadline: float

    def queued(self) -> int:
        """Events in the buffer (not in flight)."""
        ...

    def take(self, limit: int) -> list[tuple[Any, ...]]:
        """Move up to ``limit`` events from the buffer to in-flight."""
        ...

    def settle(
        self,
        taken: int,
        delivered: int,
        dropped: dict[str, int],
        details: dict[str, str] | None = None,
    ) -> None:
        """Account a finished batch: in-flight becomes delivered or dropped (``details``:
        what was wrong, per reason, when known)."""
        ...


class Sender:
    """Owns the thread's event loop, the Kafka sink and the background tasks."""

    def __init__(self, publisher: Outbox, background: list[BackgroundTask]) -> None:
        self.publisher = publisher
        self.config = publisher.config
        self.counters = publisher.counters
        self._background = background
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self.connected = False

    @property
    def stopping(self) -> bool:
        """True once the publisher is closing; background tasks end."""
        return self.publisher.stopping

    def run(self) -> None:
        """Run the loop until the publisher closes (blocks the calling thread)."""
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._loop_exception)
        try:
            loop.run_until_complete(self._main())
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            self._loop = None
            loop.close()

    def wake_threadsafe(self) -> None:
        """Wake the loop from another thread (flush, close)."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(wake.set)

    async def sleep(self, seconds: float) -> None:
        """Sleep, woken early by ``flush``/``close``."""
        wake = self._wake
        assert wake is not None
        await wait_event(wake, seconds)
        wake.clear()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Late failures of abandoned aiokafka futures land here; count them, stay quiet.
        self.counters.error("loop")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        tasks = [asyncio.create_task(factory(self)) for factory in self._background]
        try:
            if self.publisher.enabled:
                await self._publish_loop()
            else:
                while not self.stopping:
                    await self.sleep(3600)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _time_left(self) -> float:
        if not self.stopping:
            return 3600.0
        return max(0.0, self.publisher.stop_deadline - time.monotonic())

    async def _publish_loop(self) -> None:
        from promptd.sdk.kafka import KafkaSink

        encoder = Encoder(self.config)
        sink = KafkaSink(self.config)
        backoff = 0.05
        try:
            while True:
                if self.stopping and (not self.publisher.queued() or not self._time_left()):
                    break
                if not sink.connected:
                    timeout = min(self.config.send_timeout_s, max(0.1, self._time_left()))
                    if not await sink.connect(self.counters, timeout):
                        await self.sleep(min(backoff, self._time_left()))
                        backoff = min(backoff * 2, self.config.reconnect_backoff_max_s)
                        continue
                    backoff = 0.05
                batch = self.publisher.take(self.config.batch_size)
                if not batch:
                    await self.sleep(self.config.poll_interval_s)
                    continue
                await self._deliver(batch, encoder, sink)
        finally:
            # At exit the close gets a bounded moment; the broker may be gone.
            await sink.close(self.counters, min(self.config.send_timeout_s, 1.0))

    async def _deliver(
        self, batch: list[tuple[Any, ...]], encoder: Encoder, sink: KafkaSink
    ) -> None:
        records: list[Record] = []
        rejected: dict[str, int] = {}
        for index, item in enumerate(batch):
            if index % 16 == 15:
                # Encoding holds the GIL (~20 µs per event); hand it back now and then so
                # the app's threads wait microseconds, not a whole 5 ms switch interval.
                time.sleep(0)  # noqa: ASYNC251 - a GIL yield, not a blocking wait
            try:
                outcome = encoder.encode(item)
            except Exception:
                self.counters.error("encode")
                outcome = "invalid"
            if isinstance(outcome, str):
                rejected[outcome] = rejected.get(outcome, 0) + 1
            else:
                records.append(outcome)
        delivered = 0
        if records:
            if await sink.send(records, self.counters):
                delivered = len(records)
            else:
                rejected["send_failed"] = rejected.get("send_failed", 0) + len(records)
        details = {"invalid": encoder.last_invalid or ""}
        if "send_failed" in rejected:
            details["send_failed"] = self.counters.last_errors.get("send", "")
        self.publisher.settle(len(batch), delivered, rejected, details)
