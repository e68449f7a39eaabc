"""The store knows itself, through the real daemon and broker: a lost database is not
taken for a new store, and a killed run of this store is not taken for a second daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from promptd.daemon.app import Daemon, DaemonRefusedError
from promptd.daemon.broker import EmbeddedBroker
from promptd.daemon.settings import Settings
from promptd.daemon.wiring import install_components
from tests.conftest import wait_for
from tests.integration.test_broker_resets import metric_values
from tests.integration.test_process import PROMPTD, _get, broker_env
from tests.kafka_helpers import produce

pytestmark = pytest.mark.integration


def _stored(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT count(*) FROM metric_events").fetchone()[0])


async def refusal(settings: Settings) -> str:
    """The one line a daemon on ``settings`` refuses to start with."""
    refused = Daemon(settings)
    install_components(refused)
    with pytest.raises(DaemonRefusedError) as error:
        await asyncio.wait_for(refused.run(asyncio.Event()), 30)
    message = str(error.value)
    assert "\n" not in message
    return message


def _lose(path: Path) -> None:
    """The database is lost: a zero-byte file, no WAL."""
    with path.open("wb"):
        pass
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def test_an_empty_database_while_the_group_has_consumed_is_refused(
    make_settings, start_daemon
) -> None:
    """A zero-byte database file under a consumer group with committed offsets is refused
    with one line saying what happened and what to do; started over deliberately
    (``accept_new_store``), the new store re-reads every event Kafka still holds."""
    settings = make_settings()
    kafka = settings.kafka
    first = await start_daemon(settings)
    await produce(kafka.bootstrap_servers, kafka.metrics_topic, metric_values(40, "a"))
    path = settings.storage.database_path
    await wait_for(lambda: _stored(path) == 40, timeout=30)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        store_id, group, topics = conn.execute(
            "SELECT store_id, group_id, topics FROM store_identity"
        ).fetchone()
    assert len(store_id) == 32
    assert (group, json.loads(topics)) == (kafka.group_id, list(kafka.event_topics))
    await first.stop()  # commits the group's offsets

    _lose(path)
    message = await refusal(settings)
    assert f"consumer group {kafka.group_id!r} has committed offsets" in message
    assert "is a new store" in message
    assert "promptd restore" in message
    assert "--new-store" in message
    assert _stored(path) == 0

    again = settings.model_copy(
        update={"storage": settings.storage.model_copy(update={"accept_new_store": True})}
    )
    await start_daemon(again)
    await wait_for(lambda: _stored(path) == 40, timeout=30)


async def test_a_new_shared_store_under_a_group_that_consumed_is_refused(
    make_settings, pg_cluster, pg_url, start_daemon
) -> None:
    """On PostgreSQL the same: a daemon pointed at another, empty store (a replaced
    database, the wrong URL) whose consumer group has committed offsets is refused with
    one line, by the daemon that would lead it, pointing to pg_restore."""
    settings = make_settings(storage={"url": pg_url})
    kafka = settings.kafka
    first = await start_daemon(settings)
    await produce(kafka.bootstrap_servers, kafka.metrics_topic, metric_values(40, "a"))
    await wait_for(lambda: _count_is(first.daemon, 40), timeout=30)
    await first.stop()  # commits the group's offsets

    other = pg_cluster.create_store()
    try:
        moved = settings.storage.model_copy(update={"url": other})
        message = await refusal(settings.model_copy(update={"storage": moved}))
    finally:
        pg_cluster.drop_store(other)
    assert f"consumer group {kafka.group_id!r} has committed offsets" in message
    assert "is a new store" in message
    assert "pg_restore" in message


async def _count_is(running: Daemon, n: int) -> bool:
    assert running.repo is not None
    return (await running.repo.count_events())[0] == n


def _ready_within(port_file: Path, proc: subprocess.Popen[str], seconds: float) -> float:
    """Seconds until the daemon whose runtime.json has ``proc``'s pid answers /readyz 200."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        if port_file.exists():
            runtime = json.loads(port_file.read_text())
            if runtime.get("pid") == proc.pid:
                try:
                    if _get(f"http://127.0.0.1:{runtime['http_port']}/readyz")[0] == 200:
                        return time.monotonic() - started
                except OSError:
                    pass
        time.sleep(0.05)
    raise AssertionError(f"not ready within {seconds} s")


async def _describe(bootstrap: str, env: dict[str, str]) -> object:
    """The consumer group as the broker describes it (for a failure's message)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await admin.describe_consumer_groups([env["PROMPTD_KAFKA__GROUP_ID"]])
    finally:
        await admin.close()


def test_a_restart_right_after_sigkill_is_not_refused_nor_kept_waiting(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    """SIGKILL, then an immediate restart on the same store (what a supervisor does): the
    killed run's lingering group membership is recognised as this store's own and
    removed, so the restart is ready before that member's session would have expired
    (without the removal the join waits for it, about twice the session timeout on the
    test broker, or the broker splits the partitions with it and the daemon refuses),
    and stores what is published next."""
    # The killed run's membership outlives it by its session timeout. A join on the test
    # broker takes about half the group's session timeout, so a start takes a few seconds
    # more than that: the dead run's session is long enough to tell the two apart.
    session_s = 20.0
    env = broker_env(
        tmp_path,
        broker.bootstrap_servers,
        "kill",
        PROMPTD_KAFKA__SESSION_TIMEOUT_MS=str(int(session_s * 1000)),
        PROMPTD_KAFKA__HEARTBEAT_INTERVAL_MS="500",
    )
    runtime = tmp_path / "data" / "runtime.json"
    run = [*PROMPTD, "run"]
    first = subprocess.Popen(run, env=env, stderr=subprocess.DEVNULL, text=True)
    try:
        _ready_within(runtime, first, 60)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        env["PROMPTD_KAFKA__SESSION_TIMEOUT_MS"] = "3000"
        second = subprocess.Popen(run, env=env, stderr=subprocess.PIPE, text=True)
        try:
            try:
                ready_s = _ready_within(runtime, second, session_s)
            except AssertionError:
                group = asyncio.run(_describe(broker.bootstrap_servers, env))
                second.kill()
                raise AssertionError(f"{group}\n{second.communicate()[1][-3000:]}") from None
            assert ready_s < session_s
            topic = env["PROMPTD_KAFKA__METRICS_TOPIC"]
            asyncio.run(produce(broker.bootstrap_servers, topic, metric_values(5, "k")))
            db = tmp_path / "data" / "promptd.db"
            deadline = time.monotonic() + 30
            while _stored(db) < 5 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _stored(db) == 5
        finally:
            second.send_signal(signal.SIGTERM)
            _, stderr = second.communicate(timeout=20)
        assert second.returncode == 0, stderr
        assert "consumer_group_stale_member_removed" in stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
