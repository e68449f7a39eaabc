"""``promptd storage migrate``'s copy (storage/copy.py) from a real SQLite file into a
real PostgreSQL store: the moved store keeps its identity, a used target is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptd.events import MetricEvent
from promptd.storage.copy import copy_store
from promptd.storage.database import StorageError
from promptd.storage.identity import load_identity, record_kafka
from promptd.storage.postgres import PostgresDatabase
from promptd.storage.repository import EventRepository
from promptd.storage.sqlite import SqliteDatabase
from tests.integration.test_ingest import _metric


async def test_the_moved_store_keeps_its_identity_and_a_used_target_is_refused(
    tmp_path: Path, pg_cluster
) -> None:
    """The target's own identity row (made by its migration) is replaced by the source's,
    with the Kafka side the source recorded; a target a daemon already ran on (its
    identity recorded a Kafka side) counts as not empty and is refused, unchanged."""
    source = await SqliteDatabase.connect(tmp_path / "s.db")
    fresh, used = pg_cluster.create_store(), pg_cluster.create_store()
    try:
        await record_kafka(source, "k:9092", "promptd", ["m", "f"])
        events = [MetricEvent.model_validate(_metric(i)) for i in range(3)]
        await EventRepository(source).store_batch(events, [], {("m", 0): 3})
        moved = await PostgresDatabase.connect(fresh)
        try:
            copied = {c.table: c.rows for c in await copy_store(source, moved)}
            assert (copied["store_identity"], copied["metric_events"]) == (1, 3)
            assert await load_identity(moved) == await load_identity(source)
        finally:
            await moved.close()
        target = await PostgresDatabase.connect(used)
        try:
            before = await record_kafka(target, "other:9092", "other", ["x"])
            with pytest.raises(StorageError, match="store_identity has 1 rows"):
                await copy_store(source, target)
            assert await load_identity(target) == before
        finally:
            await target.close()
    finally:
        await source.close()
        pg_cluster.drop_store(fresh)
        pg_cluster.drop_store(used)
