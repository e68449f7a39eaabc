"""Damaged stores through the real daemon and broker: a snapshot that does not decode is a
cache miss, a damaged page is found at start."""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any

import aiohttp
import pytest
import structlog

from tests.conftest import wait_for
from tests.integration.test_event_time import feedback, metric, send
from tests.integration.test_restart import _hour, _monitor, live_rollout
from tests.integration.test_rollouts import TOKEN, _call
from tests.integration.test_store_identity import refusal
from tests.sqlite_damage import damage_first_leaf

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _info_logs() -> None:
    """The snapshot events are warnings and infos: let them through to capture_logs."""
    from promptd.daemon.logs import configure_logging

    configure_logging("info", "json")


def _execute(path: Any, sql: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(sql)
        conn.commit()


async def test_snapshots_that_do_not_decode_mean_a_full_replay_and_a_warning(
    make_settings, start_daemon
) -> None:
    """Snapshot rows that do not decode (garbage msgpack, truncated data, text that is not
    UTF-8) do not stop the start: each is ignored with a warning, the windows and the live
    rollout (with its pre-period history) are rebuilt from the events, exactly as they
    were."""
    settings = make_settings(http={"admin_token": TOKEN}, rollout={"tick_interval_s": 0.1})
    first = await start_daemon(settings)
    async with aiohttp.ClientSession() as http:
        rid = await live_rollout(http, first.url, settings, 300, seed=2)

        async def fed() -> Any:
            _, view = await _call(http, "GET", f"{first.url}/v1/rollouts/{rid}", auth=False)
            return view if view["feedback"]["joined"] == 300 else None

        before = await wait_for(fed, timeout=30)
    windows = _hour(_monitor(first))
    await first.stop()
    path = settings.storage.database_path
    _execute(path, "UPDATE snapshots SET data = X'c1c1c1' WHERE name = 'monitor.windows'")
    _execute(path, "UPDATE snapshots SET config = CAST(X'fffe41' AS TEXT) WHERE name LIKE 'r%'")

    with structlog.testing.capture_logs() as logs:
        second = await start_daemon(settings)
    events = {e["event"]: e for e in logs}
    assert "does not decode" in events["windows_snapshot_ignored"]["reason"]
    assert events["snapshot_unreadable"]["snapshot"] == f"rollout:{rid}"
    assert _hour(_monitor(second)) == windows
    async with aiohttp.ClientSession() as http:
        _, after = await _call(http, "GET", f"{second.url}/v1/rollouts/{rid}", auth=False)
    assert after["arms"] == before["arms"]
    assert after["feedback"] == before["feedback"]
    # The rollout's saved history was damaged too: computed again from the same events.
    assert after["adjustment"]["history"] == before["adjustment"]["history"] is not None
    await second.stop()

    # Truncated rollout data: the accumulator it was half loaded into is replaced.
    _execute(path, f"UPDATE snapshots SET data = substr(data, 1, 40) WHERE name = 'rollout:{rid}'")
    with structlog.testing.capture_logs() as logs:
        third = await start_daemon(settings)
    ignored = [e for e in logs if e["event"] == "rollout_snapshot_ignored"]
    assert ["does not decode" in e["reason"] for e in ignored] == [True]
    async with aiohttp.ClientSession() as http:
        _, again = await _call(http, "GET", f"{third.url}/v1/rollouts/{rid}", auth=False)
    assert (again["arms"], again["feedback"]) == (before["arms"], before["feedback"])
    # The replacing accumulator has the rollout's history (its covariates) too.
    assert again["adjustment"]["history"] == before["adjustment"]["history"]


async def test_a_damaged_page_is_found_at_start_even_with_a_snapshot(
    make_settings, start_daemon
) -> None:
    """A damaged page among the oldest feedback rows (which a start from a snapshot never
    reads) is found by the check at start: the daemon refuses with one line naming the
    damage and what to do, instead of coming up ready."""
    settings = make_settings()
    kafka = settings.kafka
    first = await start_daemon(settings)
    rows = [feedback(1_700_000_000.0 + i) for i in range(3000)]
    await send(kafka.bootstrap_servers, kafka.feedback_topic, 0, rows)
    await send(kafka.bootstrap_servers, kafka.metrics_topic, 0, [metric(1_700_000_000.0)])

    def stored() -> int:
        with contextlib.closing(sqlite3.connect(settings.storage.database_path)) as conn:
            return int(conn.execute("SELECT count(*) FROM feedback_events").fetchone()[0])

    await wait_for(lambda: stored() == 3000, timeout=30)
    await first.stop()  # leaves a snapshot: the next start reads no old feedback row
    damage_first_leaf(settings.storage.database_path, "feedback_events")

    message = await refusal(settings)
    assert "is damaged (PRAGMA quick_check" in message
    assert "promptd restore" in message
