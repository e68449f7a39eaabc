"""A daemon on a shared PostgreSQL store: stand by, lead when elected, stand by again.

Every daemon pointed at the store runs the election (:mod:`.leadership`) and serves its
HTTP port from the start, as a standby: reads from the database, the rest handed to the
leader (:mod:`.forward`). When it wins the lease it starts a *term*: the components are
built exactly as at a restart (the startup hooks resume rollouts, runs and windows from
their snapshots and the stored tail), then ingestion, the monitor, the rollout
controller and the optimizer run, and the leader's full API replaces the standby's on
the same port. Only the leader consumes the event topics.

A term ends in one of two ways. On ``stop`` (SIGTERM) it shuts down cleanly as a single
daemon does, then the lease is released so that a standby takes over at once. When the
leadership is lost (a renewal refused or too late, a write fenced) the term's tasks are
cancelled at once: nothing they still try is written (the store refuses it), its
in-memory state is dropped, ``leadership_lost`` is logged, ``/readyz`` shows the step
down, and the daemon stands by again and may lead later with state rebuilt from storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from aiohttp import web
from prometheus_client import Counter, Gauge

from promptd import __version__
from promptd.daemon import forward
from promptd.daemon.http import RouteExtension, Served, build_app
from promptd.daemon.leadership import Leadership, Timing, default_identity
from promptd.storage.database import FencedError
from promptd.storage.leases import LeaseStore
from promptd.storage.postgres import PostgresDatabase

if TYPE_CHECKING:
    from promptd.daemon.ingest import BatchListener, Ingestor
    from promptd.daemon.kafka import Producer
    from promptd.daemon.settings import Settings
    from promptd.storage.database import Database

TaskFactory = Callable[[asyncio.Event], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]


class Host(Served, Protocol):
    """What a daemon offers its shared-store life (``app.Daemon`` is the one host)."""

    db: Database | None
    leadership: Leadership | None
    bootstrap: str | None
    http_port: int | None
    started: asyncio.Event
    ingestor: Ingestor | None
    components: dict[str, Any]
    batch_listeners: list[BatchListener]
    task_factories: list[tuple[str, TaskFactory]]
    startup_hooks: list[Hook]
    standby_hooks: list[Hook]

    async def serve(self, app: web.Application) -> web.AppRunner:
        """Serve ``app`` on the daemon's port (see ``Daemon.serve``)."""
        ...

    def write_runtime(self) -> None:
        """Write ``runtime.json``."""
        ...

    async def start_term(self) -> Producer:
        """The producer and ingestor of a term; returns the producer to stop."""
        ...

    async def run_tasks(self, stop: asyncio.Event) -> None:
        """Run the term's tasks until ``stop``."""
        ...


log = structlog.get_logger("promptd.daemon")


def advertise_url(settings: Settings, port: int) -> str:
    """Where standbys reach this daemon's API: ``ha.advertise_url``, else its bind
    address (or, bound to every interface, this host's name) and port."""
    if settings.ha.advertise_url:
        return settings.ha.advertise_url
    host = settings.http.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


class _Swap:
    """The HTTP app being served, replaced when the role changes."""

    def __init__(self, daemon: Host) -> None:
        self.daemon = daemon
        self.runner: web.AppRunner | None = None

    async def to(self, app: web.Application) -> None:
        old, self.runner = self.runner, await self.daemon.serve(app)
        if old is not None:
            await old.cleanup()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _standby_app(
    daemon: Host, leadership: Leadership, routes: list[RouteExtension]
) -> web.Application:
    """A new standby app: ``routes`` (the standby hooks' read-only routes over the
    database), never the routes of a leader term, whose components are gone."""
    daemon.route_extensions[:] = routes
    middleware = forward.forwarding_middleware(leadership, daemon.settings.ha.forward_timeout_s)
    app = build_app(daemon, [middleware])
    forward.install(app)
    return app


async def run_shared(daemon: Host, stack: contextlib.AsyncExitStack, stop: asyncio.Event) -> None:
    """Run ``daemon`` on its shared store until ``stop`` (see the module docstring)."""
    settings = daemon.settings
    assert daemon.db is not None
    assert settings.storage.url is not None
    ha = settings.ha
    leadership = Leadership(
        LeaseStore(settings.storage.url),
        ha.identity or default_identity(),
        None,
        Timing(ha.lease_duration_s, ha.renew_deadline_s, ha.retry_period_s),
    )
    daemon.leadership = leadership
    if isinstance(daemon.db, PostgresDatabase):
        daemon.db.fence = leadership
    metrics = _Metrics(daemon)
    # What install_components put in place before any hook ran: each term starts from it.
    installed = _Installed(daemon)
    for hook in daemon.standby_hooks:
        await hook()
    standby_routes = list(daemon.route_extensions)
    standby = _standby_app(daemon, leadership, standby_routes)
    swap = _Swap(daemon)
    stack.push_async_callback(swap.close)
    await swap.to(standby)
    assert daemon.http_port is not None
    leadership.address = advertise_url(settings, daemon.http_port)
    daemon.write_runtime()
    daemon.started.set()
    log.info(
        "daemon_started",
        version=__version__,
        role="standby",
        identity=leadership.identity,
        address=leadership.address,
        http_port=daemon.http_port,
        database=daemon.db.location,
        kafka=daemon.bootstrap,
    )
    elector_stop = asyncio.Event()
    elector = asyncio.create_task(leadership.run(elector_stop), name="promptd:leadership")
    try:
        while await _elected_before(leadership, stop):
            metrics.changed(True)
            await _lead(daemon, leadership, stop, swap, installed)
            metrics.changed(False)
            if stop.is_set():
                break
            await swap.to(_standby_app(daemon, leadership, standby_routes))
            leadership.allow_acquire()
    finally:
        # The elector first (one statement at a time on the lease's connection), then
        # the lease is released, after the term's last write.
        elector_stop.set()
        await elector
        await leadership.release()
        await leadership.store.close()


async def _elected_before(leadership: Leadership, stop: asyncio.Event) -> bool:
    """Wait until this daemon leads (True) or ``stop`` is set (False)."""
    waits = {asyncio.create_task(leadership.elected.wait()), asyncio.create_task(stop.wait())}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    return not stop.is_set() and leadership.elected.is_set()


async def _lead(
    daemon: Host,
    leadership: Leadership,
    stop: asyncio.Event,
    swap: _Swap,
    installed: _Installed,
) -> None:
    """One term: build the components from storage, serve the leader's API, run."""
    log.info("leader_term_started", identity=leadership.identity, generation=leadership.generation)
    installed.restore(daemon)
    lost = leadership.lost
    producer = None
    work: asyncio.Task[None] | None = None
    try:
        if isinstance(daemon.db, PostgresDatabase):
            await daemon.db.check_schema()
        for hook in daemon.startup_hooks:
            await hook()
        producer = await daemon.start_term()
        await swap.to(build_app(daemon))
        work = asyncio.create_task(daemon.run_tasks(stop), name="promptd:term")
        ended = asyncio.create_task(lost.wait())
        try:
            await asyncio.wait({work, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if work.done():
            await work  # a clean stop, or a task's failure to raise
    except FencedError as exc:
        log.warning("leader_term_fenced", reason=str(exc))
    finally:
        if work is not None and not work.done():
            # Lost (or this daemon is being cancelled): stop at once, not gracefully; a
            # clean stop would still try to write.
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
        daemon.ingestor = None
        if producer is not None:
            await producer.stop()
    log.info("leader_term_ended", identity=leadership.identity, stopped=stop.is_set())


class _Installed:
    """The daemon's parts as ``install_components`` left them, before any startup hook:
    every term rebuilds the rest from storage (a component of an ended term, with its
    in-memory state, is never reused)."""

    def __init__(self, daemon: Host) -> None:
        self.components = dict(daemon.components)
        self.routes = list(daemon.route_extensions)
        self.listeners = list(daemon.batch_listeners)
        self.tasks = list(daemon.task_factories)

    def restore(self, daemon: Host) -> None:
        daemon.components.clear()
        daemon.components.update(self.components)
        daemon.route_extensions[:] = self.routes
        daemon.batch_listeners[:] = self.listeners
        daemon.task_factories[:] = self.tasks


class _Metrics:
    """``promptd_leader`` (1 while leading) and ``promptd_leadership_changes_total``."""

    def __init__(self, daemon: Host) -> None:
        self.leader = Gauge(
            "promptd_leader",
            "1 while this daemon leads its shared store, 0 while it stands by",
            registry=daemon.registry,
        )
        self.changes = Counter(
            "promptd_leadership_changes_total",
            "Leaderships this daemon started (acquired) and ended (ended)",
            ["change"],
            registry=daemon.registry,
        )
        for change in ("acquired", "ended"):
            self.changes.labels(change=change)

    def changed(self, leading: bool) -> None:
        self.leader.set(1 if leading else 0)
        self.changes.labels(change="acquired" if leading else "ended").inc()
