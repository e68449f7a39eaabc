"""The daemon's lifecycle: storage, broker, Kafka clients, HTTP server, background tasks.

:meth:`Daemon.run` runs everything under one ``TaskGroup`` until ``stop`` is set (the CLI
sets it from SIGTERM/SIGINT), then stops consuming, lets the batch in hand finish and
commit, and closes every resource, all within ``shutdown_timeout_s``. Every background
task is owned by the group; an exception in one is logged with its name and brings the
daemon down cleanly rather than leaving it half alive.

One daemon per store: the daemon holds the data directory's lock (:mod:`.lock`) for its
whole life, writes ``runtime.json`` there once started and removes it at exit; it refuses
to start on a locked directory, or to consume a group another member shares
(:class:`DaemonRefusedError`, one line for the CLI). It watches its database file and
stops ingesting if the file is deleted or replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from promptd import __version__
from promptd._aio import wait_event
from promptd.daemon.broker import EmbeddedBroker
from promptd.daemon.broker import check_port as check_broker_port
from promptd.daemon.http import (
    RouteExtension,
    build_app,
    check_http_port,
    is_loopback,
    start_site,
)
from promptd.daemon.ingest import BatchListener, IngestAlert, Ingestor, IngestRefusedError
from promptd.daemon.kafka import Producer, ensure_topics
from promptd.daemon.leadership import Leadership
from promptd.daemon.lock import DataDirLock, DataDirLockedError
from promptd.daemon.settings import Settings
from promptd.daemon.store_guard import StoreGuard
from promptd.monitoring.metrics import IngestMetrics
from promptd.monitoring.rules import Notification
from promptd.monitoring.sinks import log_notification
from promptd.storage.database import Database, FencedError
from promptd.storage.identity import StoreIdentity, load_identity, record_kafka
from promptd.storage.repository import (
    DUPLICATES,
    OTLP_COUNTERS,
    STORED_EVALUATIONS,
    STORED_FEEDBACK,
    STORED_METRICS,
    EventRepository,
)
from promptd.storage.sqlite import SqliteDatabase

if TYPE_CHECKING:
    from promptd.daemon.otlp.decoder import OtlpDecoder

log = structlog.get_logger("promptd.daemon")

TaskFactory = Callable[[asyncio.Event], Awaitable[None]]


RUNTIME_FILE = "runtime.json"
#: The embedded development broker listens on loopback only.
EMBEDDED_HOST = "127.0.0.1"


class ConfigurationError(RuntimeError):
    """The settings cannot work together (e.g. admin routes exposed without a token)."""


class DaemonRefusedError(ConfigurationError):
    """Another daemon owns this data directory or consumer group (one daemon per store)."""


class Daemon:
    """One promptd process. Construct with settings, then ``await run(stop)``."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        if settings.http.admin_token is None and not is_loopback(settings.http.host):
            raise ConfigurationError(
                f"http.host is {settings.http.host!r} but no admin token is set: mutating "
                "endpoints would be open to the network. Set PROMPTD_ADMIN_TOKEN "
                "(16+ characters) or bind to 127.0.0.1"
            )
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.ingest_metrics = IngestMetrics(self.registry)
        self.route_extensions: list[RouteExtension] = []
        self.batch_listeners: list[BatchListener] = []
        self.task_factories: list[tuple[str, TaskFactory]] = []
        # Run once storage is open, before ingestion and the HTTP server start: components
        # build themselves here (and e.g. replay stored events) without racing ingestion.
        self.startup_hooks: list[Callable[[], Awaitable[None]]] = []
        # On a shared store, what a standby serves: hooks that mount read-only routes
        # over the database (and nothing that acts). Run once, before any leadership.
        self.standby_hooks: list[Callable[[], Awaitable[None]]] = []
        # The election on a shared PostgreSQL store (None: a single SQLite daemon).
        self.leadership: Leadership | None = None
        self.components: dict[str, Any] = {}
        # Parts that can be degraded without making the daemon unready (an evaluator
        # down): each returns lines that /readyz shows as "degraded".
        self.readiness_details: list[Callable[[], list[str]]] = []
        self.db: Database | None = None
        self.identity: StoreIdentity | None = None
        self.repo: EventRepository | None = None
        self.producer: Producer | None = None
        self.ingestor: Ingestor | None = None
        self.broker: EmbeddedBroker | None = None
        self.bootstrap: str | None = settings.kafka.bootstrap_servers
        self.http_port: int | None = None
        self.started = asyncio.Event()
        self._kafka_ready = False
        self.lock = DataDirLock(settings.storage.data_dir, owned_files=(RUNTIME_FILE,))
        # A fatal storage condition seen before ingestion runs (database file replaced).
        self._storage_problem: str | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; return after a clean, bounded shutdown.

        Raises :class:`DaemonRefusedError` when another daemon holds the data directory
        or shares the consumer group.
        """
        try:
            self.lock.acquire()
        except DataDirLockedError as exc:
            raise DaemonRefusedError(str(exc)) from None
        try:
            await self._run_locked(stop)
        except* IngestRefusedError as refused:
            raise DaemonRefusedError(str(refused.exceptions[0])) from None
        finally:
            self.lock.release()
        log.info("daemon_stopped")

    async def _run_locked(self, stop: asyncio.Event) -> None:
        self._check_ports()
        async with contextlib.AsyncExitStack() as stack:
            storage = self.settings.storage
            if storage.shared and self.settings.kafka.embedded:
                raise ConfigurationError(
                    "storage.url is a shared PostgreSQL store, but no Kafka is configured: "
                    "daemons sharing a store must share a Kafka cluster too (set "
                    "PROMPTD_KAFKA_BOOTSTRAP_SERVERS); the embedded broker is for one daemon"
                )
            self.db = await Database.open(
                storage.target,
                storage.busy_timeout_ms,
                pool_size=storage.pool_size,
                idle_in_transaction_timeout_s=storage.idle_in_transaction_timeout_s,
            )
            stack.push_async_callback(self.db.close)
            await self._check_database()
            self.repo = EventRepository(self.db)
            # Every daemon on the store names it in its status from the start (a standby
            # too); the Kafka side is recorded when a term of work begins.
            self.identity = await load_identity(self.db)
            if storage.shared:
                from promptd.daemon.shared import run_shared

                await run_shared(self, stack, stop)
                return
            for hook in self.startup_hooks:
                await hook()
            if self.settings.kafka.embedded:
                await self._start_embedded_broker(stack)
            stack.push_async_callback((await self.start_term()).stop)
            runner = await self.serve(build_app(self))
            stack.push_async_callback(runner.cleanup)
            log.info(
                "daemon_started",
                version=__version__,
                http_port=self.http_port,
                database=self.db.location,
                kafka=self.bootstrap,
            )
            await self.run_tasks(stop)

    async def start_term(self) -> Producer:
        """The producer and the ingestor of a term of work (the whole life of a single
        daemon; each leadership on a shared store). Returns the producer to stop."""
        assert self.bootstrap is not None
        assert self.db is not None
        assert self.repo is not None
        guard = await self._store_guard(self.bootstrap)
        self.producer = Producer(self.settings.kafka, self.bootstrap)
        self._kafka_ready = False
        self.ingestor = Ingestor(
            self.settings.kafka,
            self.bootstrap,
            self.repo,
            self.producer,
            self.ingest_metrics,
            self.batch_listeners,
            alert=self._ingest_alert,
            storage_check=self.db.file_problem,
            guard=guard,
            fence=self.leadership,
            otlp=self._otlp_decoder(),
        )
        return self.producer

    def _check_ports(self) -> None:
        """A port in use stops the start at once, before migrations and the broker."""
        check_http_port(self.settings.http.host, self.settings.http.port)
        if self.settings.kafka.embedded:
            check_broker_port(EMBEDDED_HOST, self.settings.kafka.embedded_port)

    def _otlp_decoder(self) -> OtlpDecoder | None:
        if self.settings.kafka.otlp_topic is None:
            return None
        # protobuf is loaded only by a daemon that reads OpenTelemetry spans.
        from promptd.daemon.otlp.decoder import decoder_for

        return decoder_for(self.settings, self.db)

    async def _start_embedded_broker(self, stack: contextlib.AsyncExitStack) -> None:
        assert self.repo is not None
        self.broker = EmbeddedBroker(EMBEDDED_HOST, self.settings.kafka.embedded_port or None)
        await self.broker.start_async()
        stack.callback(self.broker.stop)
        self.bootstrap = self.broker.bootstrap_servers
        log.warning(
            "embedded_broker_started",
            bootstrap_servers=self.bootstrap,
            note="memory-only development broker: events are lost when it stops; "
            "set PROMPTD_KAFKA_BOOTSTRAP_SERVERS for production",
        )
        # A new embedded broker is an empty log: offsets stored against the previous
        # one would skip the first records of the new one, so they are forgotten.
        forgotten = await self.repo.forget_offsets(self.settings.kafka.event_topics)
        if forgotten:
            log.warning("stored_offsets_forgotten", partitions=forgotten, reason="embedded_broker")

    async def _check_database(self) -> None:
        """A bounded ``PRAGMA quick_check`` of a SQLite file before anything reads the
        store: a damaged database is refused with one line, not discovered by a query
        later (or never). A PostgreSQL server checks its own pages (data checksums) and
        is watched by its operators' tools."""
        budget = self.settings.storage.integrity_check_s
        if budget <= 0 or not isinstance(self.db, SqliteDatabase):
            return
        check = await self.db.quick_check(budget)
        if check.problems:
            raise DaemonRefusedError(
                f"the database {self.db.location!r} is damaged (PRAGMA quick_check: "
                f"{'; '.join(check.problems[:3])}). Restore a backup (promptd restore "
                f"BACKUP), or recover what is readable with sqlite3's .recover into a new "
                "file and start on that; storage.integrity_check_s = 0 skips this check"
            )
        if check.complete:
            log.info("database_checked", duration_s=round(check.duration_s, 3))
        else:
            log.warning(
                "database_check_incomplete",
                checked_s=round(check.duration_s, 3),
                reason=check.stopped,
                note="quick_check stopped (storage.integrity_check_s); no damage seen so far",
            )

    async def _store_guard(self, bootstrap: str) -> StoreGuard:
        """The store's identity (the Kafka side recorded on first use) for ingestion.

        On a shared store every daemon is a member of the one store the database's
        identity names (the standbys read it at start); the leader of the moment records
        the Kafka side, and its own group membership when it joins."""
        assert self.db is not None
        kafka = self.settings.kafka
        identity = await record_kafka(self.db, bootstrap, kafka.group_id, kafka.event_topics)
        self.identity = identity
        if (identity.group_id, identity.topics) != (kafka.group_id, kafka.event_topics):
            log.warning(
                "store_consumes_other_kafka",
                store_id=identity.store_id,
                recorded_group=identity.group_id,
                recorded_topics=list(identity.topics),
                group=kafka.group_id,
                topics=list(kafka.event_topics),
            )
        return StoreGuard(
            self.db,
            kafka,
            bootstrap,
            identity,
            accept_new_store=self.settings.storage.accept_new_store,
        )

    def write_runtime(self) -> None:
        """``runtime.json``: how CLI commands find this daemon (removed with the lock)."""
        record = {
            "pid": os.getpid(),
            "http_port": self.http_port,
            "bootstrap_servers": self.bootstrap,
        }
        path = self.settings.storage.data_dir / RUNTIME_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)

    async def run_tasks(self, stop: asyncio.Event) -> None:
        inner_stop = asyncio.Event()
        try:
            # The deadline is open-ended while running and set once stop arrives, so a
            # task that ignores inner_stop is cancelled in time.
            async with asyncio.timeout(None) as deadline, asyncio.TaskGroup() as group:
                group.create_task(self._guard("kafka", self._kafka_main, inner_stop))
                group.create_task(self._guard("retention", self._retention, inner_stop))
                group.create_task(self._guard("checkpoint", self._checkpoint, inner_stop))
                group.create_task(self._guard("storage-watch", self._watch_storage, inner_stop))
                for name, factory in self.task_factories:
                    group.create_task(self._guard(name, factory, inner_stop))
                self.write_runtime()
                self.started.set()
                await stop.wait()
                log.info("shutdown_started")
                inner_stop.set()
                budget = max(self.settings.shutdown_timeout_s - 1.0, 0.5)
                deadline.reschedule(asyncio.get_running_loop().time() + budget)
        except TimeoutError:
            log.error("shutdown_timed_out", timeout_s=self.settings.shutdown_timeout_s)

    async def _guard(self, name: str, factory: TaskFactory, stop: asyncio.Event) -> None:
        task = asyncio.current_task()
        if task is not None:
            task.set_name(f"promptd:{name}")
        try:
            await factory(stop)
        except asyncio.CancelledError:
            raise
        except IngestRefusedError as exc:
            log.error("daemon_refused", reason=str(exc))
            raise
        except FencedError as exc:
            # The leadership ended under this task: the daemon stops the term's work.
            log.warning("task_fenced", task=name, reason=str(exc))
        except Exception:
            log.exception("task_failed", task=name)
            raise

    async def _kafka_main(self, stop: asyncio.Event) -> None:
        """Bring up topics and the producer (with backoff), then consume until stop."""
        assert self.producer is not None
        assert self.ingestor is not None
        assert self.bootstrap is not None
        kafka = self.settings.kafka
        backoff = kafka.retry_backoff_initial_s
        while not stop.is_set():
            try:
                if kafka.create_topics:
                    await ensure_topics(kafka, self.bootstrap)
                await self.producer.start()
                break
            except Exception as exc:
                log.warning("kafka_unavailable", error=repr(exc), retry_in_s=round(backoff, 2))
                await wait_event(stop, backoff)
                backoff = min(backoff * 2, kafka.retry_backoff_max_s)
        if stop.is_set():
            return
        self._kafka_ready = True
        await self.ingestor.run(stop)

    async def _watch_storage(self, stop: asyncio.Event) -> None:
        """Stop ingesting once the database file is deleted or replaced."""
        while not stop.is_set():
            assert self.db is not None
            problem = self.db.file_problem()
            if problem is not None and self._storage_problem is None:
                self._storage_problem = problem
                if self.ingestor is not None:
                    self.ingestor.halt("database file changed", problem, "database_file_changed")
            await wait_event(stop, self.settings.storage.file_check_interval_s)

    def _ingest_alert(self, alert: IngestAlert) -> None:
        """Raise an ingestion alert through the monitor's path: the log sink, then every
        configured sink (Kafka alerts topic, webhook, Alertmanager)."""
        labels = {"alertname": alert.rule, "group": self.settings.kafka.group_id, **alert.labels}
        key = json.dumps(labels, sort_keys=True).encode()
        note = Notification(
            rule=alert.rule,
            fingerprint=hashlib.sha256(key).hexdigest()[:16],
            labels=labels,
            state="firing",
            reason=alert.reason,
            metric=alert.metric,
            value=alert.value,
            threshold=alert.threshold,
            baseline=None,
            severity=alert.severity,
            started_at=time.time(),
            resolved_at=None,
            degradation=False,
            window_seconds=0.0,
        )
        log_notification(note)
        monitor = self.components.get("monitor")
        for sink in getattr(monitor, "sinks", ()):
            sink.submit(note)

    async def _checkpoint(self, stop: asyncio.Event) -> None:
        """Passive WAL checkpoints every second, off the writer's thread."""
        while not stop.is_set():
            assert self.db is not None
            try:
                await self.db.checkpoint()
            except Exception:
                log.exception("checkpoint_failed")
            await wait_event(stop, 1.0)

    async def _retention(self, stop: asyncio.Event) -> None:
        storage = self.settings.storage
        while not stop.is_set():
            assert self.repo is not None
            cutoff = time.time() - storage.retention_days * 86_400
            try:
                deleted = await self.repo.purge_older_than(cutoff)
            except Exception:
                log.exception("retention_failed")
            else:
                if deleted:
                    self.ingest_metrics.retention_deleted.inc(deleted)
                    log.info("retention_purged", deleted=deleted, cutoff_ts=round(cutoff))
            await wait_event(stop, storage.retention_interval_s)

    async def serve(self, app: web.Application) -> web.AppRunner:
        """Serve ``app`` on the HTTP port; returns its runner (clean it up to stop).

        On a shared store the daemon serves its standby app or its leader app, and swaps
        them when its role changes: the new app starts listening on the same port
        (``SO_REUSEPORT``) before the old one stops, so no request is refused meanwhile.
        """
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        port = self.http_port if self.http_port is not None else self.settings.http.port
        site = await start_site(
            runner, self.settings.http.host, port, reuse_port=self.settings.storage.shared
        )
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.http_port = int(sockets[0].getsockname()[1]) if sockets else port
        return runner

    # -- views ---------------------------------------------------------------------

    @property
    def kafka_ready(self) -> bool:
        """True once topics exist and the producer is connected."""
        return self._kafka_ready

    def health(self) -> tuple[bool, str]:
        """Liveness for ``/healthz`` (see :mod:`promptd.daemon.health`)."""
        if self._storage_problem is not None:
            return False, f"ingestion halted: {self._storage_problem}"
        if self.ingestor is None:
            return True, "starting"
        return self.ingestor.health()

    def readiness(self) -> tuple[bool, str]:
        """Readiness for ``/readyz``: events flow from Kafka into storage right now (a
        leader); the shared store answers (a standby, which serves reads and routing)."""
        if self.db is None:
            return False, "storage not open"
        if self.leadership is not None and not self.leadership.leading:
            return self._standby_readiness(self.leadership)
        healthy, reason = self.health()
        if not healthy:
            return False, reason
        if self.ingestor is None or not self._kafka_ready:
            return False, "kafka not reachable yet"
        return self.ingestor.readiness()

    def _standby_readiness(self, leadership: Leadership) -> tuple[bool, str]:
        contact = leadership.last_contact
        if contact is None or time.monotonic() - contact > leadership.timing.lease_duration_s:
            return False, f"standby: the database does not answer ({leadership.last_error})"
        lease = leadership.lease
        if lease is None or lease.expires_in_s <= 0 or lease.holder == leadership.identity:
            return True, "standby: no leader right now (the lease is free)"
        return True, f"standby: {lease.holder} leads (generation {lease.generation})"

    def role(self) -> dict[str, Any]:
        """Who leads: this daemon's role (``leader`` or ``standby``; a single SQLite
        daemon is the ``leader`` of its store), and on a shared store the election."""
        if self.leadership is None:
            return {"role": "leader", "shared": False}
        return {**self.leadership.view(), "shared": True}

    def degraded(self) -> list[str]:
        """What works only in part right now (never a reason to be unready)."""
        out: list[str] = []
        for detail in self.readiness_details:
            try:
                out.extend(detail())
            except Exception:
                log.exception("readiness_detail_failed")
        return out

    async def status(self) -> dict[str, Any]:
        """The body of ``/v1/status``."""
        assert self.repo is not None
        counters = await self.repo.counters()
        state = self.ingestor.state if self.ingestor is not None else None
        dead = {
            k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("dead_lettered.")
        }
        healthy, health_reason = self.health()
        ready, _ = self.readiness()
        identity = self.identity
        return {
            "version": __version__,
            "store": {"id": identity.store_id, "created_at": identity.created_at}
            if identity is not None
            else None,
            "healthy": healthy,
            "health_reason": health_reason,
            "ready": ready,
            "leadership": self.role(),
            "storage": {
                "backend": self.db.dialect if self.db else None,
                "location": self.db.location if self.db else None,
            },
            "events": {
                "stored": counters.get(STORED_METRICS, 0) + counters.get(STORED_FEEDBACK, 0),
                "stored_metrics": counters.get(STORED_METRICS, 0),
                "stored_feedback": counters.get(STORED_FEEDBACK, 0),
                # Of the stored feedback, evaluators' results (published by this daemon).
                "stored_evaluations": counters.get(STORED_EVALUATIONS, 0),
                "duplicates": counters.get(DUPLICATES, 0),
                "dead_lettered": sum(dead.values()),
                "dead_lettered_by_reason": dead,
            },
            "otlp": {
                "topic": self.settings.kafka.otlp_topic,
                "encoding": self.settings.kafka.otlp_encoding,
                **{
                    k.removeprefix(OTLP_COUNTERS + "."): v
                    for k, v in sorted(counters.items())
                    if k.startswith(OTLP_COUNTERS + ".")
                },
            },
            "kafka": {
                "bootstrap_servers": self.bootstrap,
                "embedded": self.settings.kafka.embedded,
                "connected": bool(state and state.connected),
                "lag": state.total_lag if state else None,
                "lag_by_partition": {f"{t}:{p}": n for (t, p), n in sorted(state.lag.items())}
                if state
                else {},
                "assigned_partitions": len(state.assigned) if state else 0,
                "stalled": bool(state and state.stalled),
                "last_error": state.last_error if state else None,
                "offset_resets": state.offset_resets if state else 0,
                "group_conflict": state.group_conflict if state else None,
                "halted": state.halted if state else self._storage_problem,
            },
        }
