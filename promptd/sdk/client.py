"""The SDK client (config, counters, buffer, routing) and the process-wide default one.

``promptd.configure(...)`` replaces the default client; without it the first instrumented
call builds one from the ``PROMPTD_`` environment. At interpreter exit the default client
flushes for at most ``exit_flush_timeout_s``. After ``os.fork()`` the child resets its
client (fresh buffer, counters, request-id prefix) and starts its own sender on first use;
the parent keeps delivering what it had buffered, so nothing is sent twice.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from promptd.sdk.config import SdkConfig
from promptd.sdk.encode import FEEDBACK
from promptd.sdk.notices import undelivered_summary, warn
from promptd.sdk.publisher import Publisher
from promptd.sdk.routing_client import PromptVariant, RoutingCache
from promptd.sdk.stats import Counters, SdkStats, StatsCollector

if TYPE_CHECKING:
    from promptd.sdk.sender import BackgroundTask, Sender


def _prefix() -> str:
    # Random per process (and re-drawn after fork), so request ids are unique across
    # processes and hosts while the per-call part stays a cheap counter.
    return os.urandom(8).hex() + "-"


class Client:
    """One SDK instance; apps normally use the default one through the module functions."""

    def __init__(self, config: SdkConfig) -> None:
        self.config = config
        self.counters = Counters()
        self.routing = RoutingCache(config, self.counters)
        self._collector: StatsCollector | None = None
        self._registry: Any = None
        background: list[BackgroundTask] = []
        if config.registry is not None and config.registry is not False:
            # The app passed a registry, so prometheus_client is loaded: register now.
            self._register(config.registry)
        elif config.registry is None:
            # The global registry: import prometheus_client later, in the sender thread.
            background.append(self._register_metrics)
        if config.daemon_url:
            background.append(self.routing.refresh_loop)
        if config.routing_from_kafka and config.bootstrap_servers:
            background.append(self.routing.kafka_loop)
        if self.routing.enabled:
            for prompt in (*config.prompts, *sorted(_declared)):
                self.routing.want(prompt)
        self.publisher = Publisher(config, self.counters, background)
        self._prefix = _prefix()
        self._ids = itertools.count(1)
        self._reported = False
        # Prompts whose first call has waited for their routing (see route_first_call).
        self._waited: set[str] = set()

    def next_request_id(self) -> str:
        """A fresh request id: ``<16 random hex>-<counter in hex>``."""
        return f"{self._prefix}{next(self._ids):x}"

    def start(self, timeout_s: float | None = None) -> bool:
        """Start the background thread now and warm the routing before the first call.

        Fetches the routing of every prompt in ``config.prompts`` and of every
        ``@instrument``-decorated function, waiting at most ``timeout_s`` (default
        ``routing_timeout_s``); returns True when all of them are known. Called inside a
        running event loop it does not block that loop: it starts the fetches and returns
        False at once (use ``await promptd.astart()`` there).
        """
        self.publisher.ensure_started()
        prompts = self.prompts()
        if _in_event_loop():
            return self.routing.attempted_all(prompts) and self._known(prompts)
        wait = self.config.routing_timeout_s if timeout_s is None else timeout_s
        return self.routing.warm(prompts, wait)

    async def astart(self, timeout_s: float | None = None) -> bool:
        """:meth:`start` for async code: waits for the routing without blocking the loop."""
        import asyncio

        self.publisher.ensure_started()
        wait = self.config.routing_timeout_s if timeout_s is None else timeout_s
        return await asyncio.to_thread(self.routing.warm, self.prompts(), wait)

    def route_first_call(self, prompt: str) -> None:
        """Wait (at most ``routing_timeout_s``) for the first routing of ``prompt``; once
        per prompt, never inside a running event loop (see ``config.route_first_call``)."""
        if not self._first_call_waits(prompt) or _in_event_loop():
            return
        self._waited.add(prompt)
        self.publisher.ensure_started()
        self.routing.warm([prompt], self.config.routing_timeout_s)

    async def aroute_first_call(self, prompt: str) -> None:
        """:meth:`route_first_call` for async calls: waits without blocking the loop."""
        if not self._first_call_waits(prompt):
            return
        import asyncio

        self._waited.add(prompt)
        self.publisher.ensure_started()
        await asyncio.to_thread(self.routing.warm, [prompt], self.config.routing_timeout_s)

    def _first_call_waits(self, prompt: str) -> bool:
        return (
            self.config.route_first_call
            and bool(self.config.daemon_url)
            and prompt not in self._waited
            and prompt not in self.routing.attempted
            and not self.publisher.closed
        )

    def prompts(self) -> list[str]:
        """The prompts this client warms: configured and decorated ones."""
        return list(dict.fromkeys((*self.config.prompts, *sorted(_declared))))

    def _known(self, prompts: list[str]) -> bool:
        return all(p in self.routing.entries for p in prompts)

    def stats(self) -> SdkStats:
        """A consistent snapshot of the counters (``emitted == delivered+dropped+buffered``)."""
        with self.counters.lock:
            return self.counters.snapshot(self.publisher.queued())

    def feedback(
        self,
        request_id: str | None,
        score: float | bool,
        kind: str = "quality",
        comment: str | None = None,
        correction: Any = None,
        *,
        prompt: str | None = None,
        variant: str | PromptVariant | None = None,
        model: str | None = None,
        episode_id: str | None = None,
    ) -> None:
        """Buffer one FeedbackEvent (see :func:`promptd.feedback`)."""
        try:
            if isinstance(variant, PromptVariant):
                prompt = prompt or variant.prompt
                variant = variant.version
            item = (FEEDBACK, time.time(), request_id, score, kind, comment, correction)
            self.publisher.put((*item, prompt, variant, model, episode_id))
        except Exception:
            self.counters.error("feedback")

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush within ``timeout_s``, stop the thread and unregister the metrics.

        Events that were not delivered are reported in one warning line (count, reasons,
        the last Kafka error): at interpreter exit for the default client.
        """
        try:
            self.publisher.close(timeout_s)
        except Exception:
            self.counters.error("close")
        self._report_undelivered()
        if self._collector is not None and self._registry is not None:
            try:
                self._registry.unregister(self._collector)
            except Exception:
                self.counters.error("metrics")
            self._collector = None

    def _report_undelivered(self) -> None:
        if self._reported:
            return
        self._reported = True
        try:
            with self.counters.lock:
                last_errors = dict(self.counters.last_errors)
            summary = undelivered_summary(self.stats(), self.config.bootstrap_servers, last_errors)
        except Exception:
            self.counters.error("close")
            return
        if summary is not None:
            warn(summary)

    def reset_after_fork(self) -> None:
        """Called in a forked child (see the module docstring)."""
        self.counters.reset_after_fork()
        self.publisher.reset_after_fork()
        self._prefix = _prefix()
        self._ids = itertools.count(1)
        self._reported = False

    async def _register_metrics(self, sender: Sender) -> None:
        # Runs once in the sender thread: prometheus_client costs ~0.1 s to import.
        if self._collector is None:
            from prometheus_client import REGISTRY

            self._register(REGISTRY)

    def _register(self, registry: Any) -> None:
        try:
            collector = StatsCollector(self.stats)
            registry.register(collector)
            self._collector, self._registry = collector, registry
        except Exception:
            self.counters.error("metrics")


_client: Client | None = None
_client_lock = threading.Lock()
# Prompts of every @instrument-decorated function (without an explicit client), so a
# client can fetch their routing at start, before their first call.
_declared: set[str] = set()


def declare(prompt: str, client: Client | None = None) -> None:
    """Called by ``@instrument`` at decoration: ``prompt`` will be used (cheap, no I/O)."""
    if client is None:
        _declared.add(prompt)
    target = client or _client
    if target is not None and target.routing.enabled:
        target.routing.want(prompt)


def _in_event_loop() -> bool:
    # Only asks asyncio when the app has imported it: importing promptd stays light.
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def get_client() -> Client:
    """The default client, built from the environment on first use."""
    client = _client
    if client is not None:
        return client
    with _client_lock:
        if _client is None:
            _set(Client(SdkConfig.from_env()))
        assert _client is not None
        return _client


def _set(client: Client | None) -> None:
    global _client
    _client = client


def configure(config: SdkConfig | None = None, **settings: Any) -> Client:
    """Replace the default client: ``configure(bootstrap_servers=..., daemon_url=...)``.

    Settings not given come from the ``PROMPTD_`` environment (see
    :mod:`promptd.sdk.config`). The previous default client is flushed (1 s at most) and
    closed. With ``prompts=[...]`` the new client starts at once and fetches their routing
    (and that of every decorated function) before returning, at most
    ``routing_timeout_s``, so the first calls already use the routed versions (see
    :meth:`Client.start`).
    """
    new = Client(config.replace(**settings) if config else SdkConfig.from_env(**settings))
    with _client_lock:
        old = _client
        _set(new)
    if old is not None:
        old.close(timeout_s=1.0)
    if new.config.prompts:
        new.start()
    return new


def start(timeout_s: float | None = None) -> bool:
    """Start the default client and warm its routing (see :meth:`Client.start`)."""
    return get_client().start(timeout_s)


async def astart(timeout_s: float | None = None) -> bool:
    """Start the default client and warm its routing without blocking the event loop."""
    return await get_client().astart(timeout_s)


def shutdown(timeout_s: float | None = None) -> None:
    """Flush and close the default client; the next call builds a new one."""
    with _client_lock:
        old = _client
        _set(None)
    if old is not None:
        old.close(old.config.exit_flush_timeout_s if timeout_s is None else timeout_s)


def flush(timeout_s: float = 5.0) -> bool:
    """Wait until every buffered event is delivered or dropped; False on timeout."""
    client = _client
    return True if client is None else client.publisher.flush(timeout_s)


async def aflush(timeout_s: float = 5.0) -> bool:
    """:func:`flush` for async code (does not block the event loop)."""
    client = _client
    return True if client is None else await client.publisher.aflush(timeout_s)


def sdk_stats() -> SdkStats:
    """Counters of the default client: emitted, delivered, dropped (by reason), buffered."""
    return get_client().stats()


def feedback(
    request_id: str | None = None,
    score: float | bool | None = None,
    kind: str = "quality",
    comment: str | None = None,
    correction: Any = None,
    *,
    episode_id: str | None = None,
    prompt: str | None = None,
    variant: str | PromptVariant | None = None,
    model: str | None = None,
) -> None:
    """Report feedback: ``score`` in 0..1 (``True`` = 1.0) on the call ``request_id``, or,
    with only ``episode_id``, on a whole episode (credited to every call in it).

    Never blocks. Raises only for a bad ``score``, as for a bad argument: ``TypeError``
    when it is missing or not a number, ``ValueError`` outside 0..1. For a call,
    ``prompt`` and ``variant`` may be omitted when this process made it (the SDK
    remembers the last ``feedback_lru_size`` calls); call feedback that cannot be joined
    is dropped as ``unknown_request``. Episode feedback needs neither. Feedback naming
    neither a request nor an episode is dropped as ``invalid``.
    """
    score = check_score(score)
    # Client.feedback counts its own errors; this guards building the client.
    with contextlib.suppress(Exception):
        get_client().feedback(
            request_id,
            score,
            kind,
            comment,
            correction,
            prompt=prompt,
            variant=variant,
            model=model,
            episode_id=episode_id,
        )


def check_score(score: object) -> float | bool:
    """``score`` when it is a number in 0..1 or a bool; else ``TypeError``/``ValueError``."""
    if score is None:
        raise TypeError("promptd.feedback() needs a score (0..1, or True/False)")
    if isinstance(score, bool):
        return score
    if not isinstance(score, int | float):
        raise TypeError(
            f"promptd.feedback(): score must be a number from 0 to 1 or True/False, "
            f"got {type(score).__name__} {score!r}"
        )
    if not 0.0 <= score <= 1.0:  # NaN fails this too
        raise ValueError(
            f"promptd.feedback(): score must be from 0 to 1 (0 = bad, 1 = good; "
            f"True/False for thumbs), got {score!r}; scale a rating first, "
            "e.g. stars / 5"
        )
    return score


async def afeedback(
    request_id: str | None = None,
    score: float | bool | None = None,
    kind: str = "quality",
    comment: str | None = None,
    correction: Any = None,
    *,
    episode_id: str | None = None,
    prompt: str | None = None,
    variant: str | PromptVariant | None = None,
    model: str | None = None,
) -> None:
    """Async twin of :func:`feedback` (equally non-blocking; for symmetry in async code)."""
    feedback(
        request_id,
        score,
        kind,
        comment,
        correction,
        episode_id=episode_id,
        prompt=prompt,
        variant=variant,
        model=model,
    )


def _after_fork_in_child() -> None:
    client = _client
    if client is not None:
        client.reset_after_fork()


atexit.register(shutdown)
os.register_at_fork(after_in_child=_after_fork_in_child)
