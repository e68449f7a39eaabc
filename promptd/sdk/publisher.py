"""The publisher: a bounded in-memory buffer and a background sender thread.

Hot path (``put``): one lock, three integer operations, one ``deque.append``. Nothing is
serialized or validated there; the sender thread builds and validates the events.

Drop policy: **drop-newest**. When the buffer holds ``queue_size`` events, a new event is
counted under ``dropped{reason="queue_full"}`` and discarded; the events already buffered
(the older ones) are kept, so a burst during a broker outage keeps its beginning.

The sender is a daemon thread running its own asyncio loop, so it serves sync and async
apps alike and never touches the app's loop. aiokafka is imported there, not at import of
``promptd``. Every Kafka operation is bounded by ``send_timeout_s``; a batch the broker
does not take after ``send_retries`` attempts is dropped as ``send_failed``. While the
broker is unreachable nothing is taken from the buffer, so events wait (up to
``queue_size``) and are delivered when it comes back.

Every error in the sender is caught and counted in ``errors``; none reaches the app.

The asyncio side lives in :mod:`promptd.sdk.sender`, imported by the thread, so importing
``promptd`` does not import asyncio either.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from promptd.sdk.config import SdkConfig
from promptd.sdk.notices import drop_notice
from promptd.sdk.stats import Counters

if TYPE_CHECKING:
    from promptd.sdk.sender import BackgroundTask, Sender


class Publisher:
    """Buffers events from any thread and delivers them to Kafka from one sender thread
    (the :class:`~promptd.sdk.sender.Outbox` its sender drains)."""

    def __init__(
        self,
        config: SdkConfig,
        counters: Counters,
        background: list[BackgroundTask] | None = None,
    ) -> None:
        self.config = config
        self.counters = counters
        self.enabled = bool(config.bootstrap_servers)
        self._background = background or []
        self._queue: deque[tuple[Any, ...]] = deque()
        self._maxsize = config.queue_size
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.sender: Sender | None = None
        self.stopping = False
        self.stop_deadline = 0.0
        self._closed = False

    # -- app side ---------------------------------------------------------------------

    def put(self, item: tuple[Any, ...]) -> None:
        """Buffer one event (never blocks, never raises)."""
        if self._thread is None:
            self.ensure_started()
        counters = self.counters
        with counters.lock:
            counters.emitted += 1
            if self.enabled and not self._closed and len(self._queue) < self._maxsize:
                self._queue.append(item)
                return
            if not self.enabled:
                reason = "no_bootstrap"
            elif self._closed:
                reason = "shutdown"
            else:
                reason = "queue_full"
            counters.dropped[reason] += 1
        drop_notice(reason)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called: nothing is sent any more."""
        return self._closed

    def buffered(self) -> int:
        """Events not yet delivered or dropped."""
        with self.counters.lock:
            return len(self._queue) + self.counters.in_flight

    def ensure_started(self) -> None:
        """Start the sender thread once (lazily, so importing promptd starts nothing)."""
        if self._thread is not None or self._closed:
            return
        if not self.enabled and not self._background:
            return
        with self._start_lock:
            if self._thread is None and not self._closed:
                thread = threading.Thread(target=self._thread_main, name="promptd-sdk", daemon=True)
                self._thread = thread
                thread.start()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything buffered is delivered or dropped; False on timeout."""
        deadline = time.monotonic() + timeout_s
        self._kick()
        while self.buffered():
            if time.monotonic() >= deadline or self._thread is None:
                return False
            time.sleep(0.005)
        return True

    async def aflush(self, timeout_s: float = 5.0) -> bool:
        """:meth:`flush` for async code: waits without blocking the app's loop."""
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._kick()
        while self.buffered():
            if loop.time() >= deadline or self._thread is None:
                return False
            await asyncio.sleep(0.005)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is buffered within ``timeout_s``, drop the rest, stop the thread."""
        with self._start_lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            self.drop_all("shutdown")
            return
        self.stop_deadline = time.monotonic() + timeout_s
        self.stopping = True
        self._kick()
        thread.join(timeout_s + 1.0)

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's thread, buffer and counters state."""
        self._queue.clear()
        self._thread = None
        self._start_lock = threading.Lock()
        self.sender = None
        self.stopping = False

    def _kick(self) -> None:
        sender = self.sender
        if sender is not None:
            sender.wake_threadsafe()

    def drop_all(self, reason: str, in_flight: bool = False) -> None:
        """Count everything still queued (and in flight) as dropped for ``reason``."""
        with self.counters.lock:
            self.counters.dropped[reason] += len(self._queue)
            self._queue.clear()
            if in_flight:  # only once the sender thread has ended: nothing will settle
                self.counters.dropped[reason] += self.counters.in_flight
                self.counters.in_flight = 0

    def _thread_main(self) -> None:
        try:
            from promptd.sdk.sender import Sender

            sender = Sender(self, self._background)
            self.sender = sender
            sender.run()
        except BaseException:
            self.counters.error("sender_crash")
        finally:
            self.sender = None
            self.drop_all("shutdown", in_flight=True)

    def take(self, limit: int) -> list[tuple[Any, ...]]:
        """Move up to ``limit`` events from the buffer to in-flight (sender thread)."""
        counters = self.counters
        with counters.lock:
            count = min(len(self._queue), limit)
            popleft = self._queue.popleft
            batch = [popleft() for _ in range(count)]
            counters.in_flight += count
        return batch

    def settle(
        self,
        taken: int,
        delivered: int,
        dropped: dict[str, int],
        details: dict[str, str] | None = None,
    ) -> None:
        """Account a finished batch: in-flight becomes delivered or dropped (and the first
        drop for each reason is warned about, with ``details`` when known)."""
        counters = self.counters
        with counters.lock:
            counters.in_flight -= taken
            counters.delivered += delivered
            for reason, count in dropped.items():
                counters.dropped[reason] = counters.dropped.get(reason, 0) + count
        for reason in dropped:
            drop_notice(reason, (details or {}).get(reason))

    def queued(self) -> int:
        """Events in the buffer (not in flight)."""
        return len(self._queue)
