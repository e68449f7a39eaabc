"""Shared fixtures: a real Tansu broker per session, isolated topics and daemons per test."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry

import promptd
from promptd.daemon.app import Daemon
from promptd.daemon.broker import EmbeddedBroker
from promptd.daemon.settings import Settings
from tests.pg_cluster import PostgresCluster, find_binaries

#: Set to 1 by .ci/run: a missing Prometheus or Alertmanager binary then fails the live
#: tests instead of skipping them. (Not PROMPTD_-prefixed: the daemon refuses unknown
#: PROMPTD_ variables.)
REQUIRE_LIVE_TOOLS = "REQUIRE_LIVE_TOOLS"
#: The binaries of the live Prometheus/Alertmanager tests and their Debian packages.
LIVE_TOOLS = {
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "amtool": "prometheus-alertmanager",
    "prometheus-alertmanager": "prometheus-alertmanager",
}


def live_tool(name: str) -> str:
    """Path of a Prometheus/Alertmanager binary. Without it the test is skipped with the
    package to install, or fails when ``REQUIRE_LIVE_TOOLS=1`` (CI)."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} is not installed (Debian package {LIVE_TOOLS[name]})"
    if os.environ.get(REQUIRE_LIVE_TOOLS) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_LIVE_TOOLS}=1 requires it")
    pytest.skip(f"{reason}; .ci/run installs it")


def postgres_binaries() -> Path:
    """The PostgreSQL server binaries. Without them the test is skipped naming the package,
    or fails when ``REQUIRE_LIVE_TOOLS=1`` (CI)."""
    path = find_binaries()
    if path is not None:
        return path
    reason = (
        "PostgreSQL server binaries (initdb, pg_ctl) are not installed "
        "(Debian package postgresql-15)"
    )
    if os.environ.get(REQUIRE_LIVE_TOOLS) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_LIVE_TOOLS}=1 requires them")
    pytest.skip(f"{reason}; .ci/run installs them")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster for this test process (one per xdist worker)."""
    cluster = PostgresCluster(postgres_binaries()).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PostgresCluster) -> Iterator[str]:
    """The URL of a fresh, empty store on the session's cluster (dropped afterwards)."""
    url = pg_cluster.create_store()
    yield url
    pg_cluster.drop_store(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a test's store lives, once per backend: a SQLite file, a PostgreSQL URL."""
    if request.param == "sqlite":
        return tmp_path / "store.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """``storage`` settings of a daemon, once per backend: the SQLite file of
    ``make_settings``, then a fresh PostgreSQL store (the daemon leads it alone)."""
    if request.param == "sqlite":
        return {}
    return {"url": request.getfixturevalue("pg_url")}


@pytest.fixture(autouse=True)
def _quiet_structlog() -> Iterator[None]:
    """Keep test output readable: structlog at warning level, restored afterwards."""
    from promptd.daemon.logs import configure_logging

    configure_logging("warning", "json")
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """A real Kafka-protocol broker (Tansu, memory storage) on a free loopback port."""
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def make_settings(tmp_path: Path, broker: EmbeddedBroker) -> Callable[..., Settings]:
    """Settings on the session broker with topics and group unique to this test."""

    def factory(**overrides: Any) -> Settings:
        tag = uuid.uuid4().hex[:8]
        kafka: dict[str, Any] = {
            "bootstrap_servers": broker.bootstrap_servers,
            "group_id": f"promptd-{tag}",
            "metrics_topic": f"m-{tag}",
            "feedback_topic": f"f-{tag}",
            "dlq_topic": f"dlq-{tag}",
            "alerts_topic": f"alerts-{tag}",
            "routing_topic": f"routing-{tag}",
            "optimization_topic": f"opt-{tag}",
            "otlp_topic": f"otlp-{tag}",
            # A consumer-group join waits about half the session timeout on this broker.
            "session_timeout_ms": 1_000,
            "heartbeat_interval_ms": 300,
            "retry_backoff_initial_s": 0.2,
            "retry_backoff_max_s": 1.0,
            "fetch_max_wait_ms": 50,
        }
        kafka.update(overrides.pop("kafka", {}))
        storage = {"data_dir": tmp_path / f"data-{tag}"}
        storage.update(overrides.pop("storage", {}))
        http = {"port": 0}
        http.update(overrides.pop("http", {}))
        # On a shared store: a daemon takes over a lease a killed one left within 4 s
        # (a cancelled daemon releases it at once); a loaded machine may delay a renewal
        # by a second or two without costing the lead.
        ha = {"lease_duration_s": 4.0, "renew_deadline_s": 3.0, "retry_period_s": 0.2}
        ha.update(overrides.pop("ha", {}))
        return Settings(kafka=kafka, storage=storage, http=http, ha=ha, **overrides)

    return factory


class RunningDaemon:
    """A daemon running as a task in the test's event loop."""

    def __init__(self, daemon: Daemon, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        self.daemon = daemon
        self.task = task
        self.stop_event = stop

    @property
    def url(self) -> str:
        """Base URL of its HTTP API."""
        return f"http://127.0.0.1:{self.daemon.http_port}"

    async def stop(self) -> None:
        """Graceful stop, as on SIGTERM."""
        self.stop_event.set()
        await asyncio.wait_for(self.task, 15)

    async def kill(self) -> None:
        """Hard stop: cancel the task without its shutdown path."""
        self.task.cancel()
        try:
            async with asyncio.timeout(20):
                await self.task
        except asyncio.CancelledError:
            pass
        except TimeoutError:
            raise AssertionError("the daemon did not stop within 20 s of being cancelled") from None
        except Exception:  # a crash on the way down is what a hard stop may look like
            pass


@pytest.fixture
async def start_daemon() -> AsyncIterator[Callable[..., Any]]:
    """Factory: start a daemon on given settings, wait until ready; stopped at teardown."""
    running: list[RunningDaemon] = []

    async def factory(settings: Settings, ready: bool = True, **kwargs: Any) -> RunningDaemon:
        daemon = Daemon(settings, **kwargs)
        from promptd.daemon.wiring import install_components

        install_components(daemon)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        handle = RunningDaemon(daemon, task, stop)
        running.append(handle)
        await asyncio.wait_for(daemon.started.wait(), 15)
        if ready:
            await wait_for(
                lambda: (
                    daemon.readiness()[0]
                    and daemon.ingestor is not None
                    and bool(daemon.ingestor.state.assigned)
                ),
                timeout=20,
            )
        return handle

    yield factory
    for handle in running:
        if not handle.task.done():
            await handle.stop()


@pytest.fixture
def sdk_for() -> Iterator[Callable[[Settings], Any]]:
    """Factory: configure the default SDK client on a daemon's topics; shut down after."""

    def factory(settings: Settings) -> promptd.sdk.Client:
        kafka = settings.kafka
        return promptd.configure(
            bootstrap_servers=kafka.bootstrap_servers,
            metrics_topic=kafka.metrics_topic,
            feedback_topic=kafka.feedback_topic,
            registry=CollectorRegistry(),
            poll_interval_s=0.01,
        )

    yield factory
    promptd.shutdown(5.0)


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` (sync or async) until truthy; fail the test on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
