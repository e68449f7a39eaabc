"""SQLite cost per stored event: statement shapes and de-duplication index variants.

    python bench/sqlite_rows.py [--rows 200000] [--runs 3]

Writes the same prebuilt metric rows (as the ingest path hands them to the writer) into a
fresh WAL-mode file, in transactions of 5,000 rows with ``synchronous=NORMAL``, the way
the daemon's writer does, once per variant and run (variants interleaved), and prints
microseconds per row: the median over runs and its ratio to one-row statements.

Variants:

* **one-row statements**: ``executemany`` of ``INSERT ... ON CONFLICT (event_id) DO
  NOTHING`` of the 14 plain columns, unique index on the ``event_id`` text (what promptd
  ran before);
* **17 columns**: the same with the three capture columns bound as NULL (one statement
  for every row instead of two shapes);
* **multi-row VALUES**: 128 rows per statement (what promptd runs now);
* **OR IGNORE**: ``INSERT OR IGNORE`` (not an option: it also hides CHECK violations);
* **WITHOUT ROWID**: the table keyed by ``event_id`` itself (no second B-tree, but no
  integer id, which retention, time-range scans and snapshots rely on);
* **random ids**: the daemon's statement with UUIDv4 ids instead of time-ordered UUIDv7;
* **no index**: no de-duplication at all (the lower bound: what the index costs).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

from promptd.events import new_event_id
from promptd.storage.rows import METRIC_PLAIN_COLUMNS
from promptd.storage.schema import _V1_INGESTION

BATCH = 5_000
MULTI = 128

Row = tuple[Any, ...]


def make_rows(n: int, random_ids: bool = False) -> list[Row]:
    rng = random.Random(1)
    now = time.time()
    out = []
    for i in range(n):
        out.append(
            (
                str(uuid.uuid4()) if random_ids else new_event_id(),
                now - rng.random() * 60,
                f"prompt-{i % 50}",
                rng.choice(["v1", "v2"]),
                "gpt-4o-mini",
                os.urandom(16).hex(),
                f"user-{rng.randrange(10_000)}",
                rng.lognormvariate(6, 0.5),
                rng.random() > 0.02,
                None,
                rng.random(),
                rng.randrange(50, 2000),
                rng.randrange(10, 500),
                rng.random() / 100,
            )
        )
    return out


def _table_sql() -> str:
    return next(s for s in _V1_INGESTION.split(";") if "CREATE TABLE metric_events" in s)


def _insert(cols: Sequence[str], rows_per_statement: int = 1, verb: str = "INSERT") -> str:
    names = ", ".join((*cols, "ingested_at"))
    one = "(" + ", ".join("?" for _ in cols) + ", 0.0)"
    values = ", ".join([one] * rows_per_statement)
    tail = " ON CONFLICT (event_id) DO NOTHING" if verb == "INSERT" else ""
    return f"{verb} INTO metric_events ({names}) VALUES {values}{tail}"


Writer = Callable[[sqlite3.Connection, list[Row]], None]


def executemany(sql: str, widen: int = 0) -> Writer:
    pad = (None,) * widen

    def write(conn: sqlite3.Connection, rows: list[Row]) -> None:
        conn.executemany(sql, [r + pad for r in rows] if widen else rows)

    return write


def multi_row(cols: Sequence[str]) -> Writer:
    full, one = _insert(cols, MULTI), _insert(cols)

    def write(conn: sqlite3.Connection, rows: list[Row]) -> None:
        cut = len(rows) - len(rows) % MULTI
        params = [
            tuple(itertools.chain.from_iterable(rows[i : i + MULTI])) for i in range(0, cut, MULTI)
        ]
        conn.executemany(full, params)
        conn.executemany(one, rows[cut:])

    return write


def variants() -> dict[str, tuple[str, Writer, bool]]:
    """name -> (CREATE TABLE, writer, random ids)."""
    table = _table_sql()
    plain = METRIC_PLAIN_COLUMNS
    wide = (*plain, "input", "output", "attributes")
    without_rowid = (
        table.replace("id          INTEGER PRIMARY KEY,\n", "")
        .replace("event_id    TEXT    NOT NULL UNIQUE", "event_id TEXT PRIMARY KEY")
        .rstrip()
        + " WITHOUT ROWID"
    )
    return {
        "one-row statements (14 columns, before)": (table, executemany(_insert(plain)), False),
        "17 columns (captures bound as NULL)": (table, executemany(_insert(wide), 3), False),
        f"multi-row VALUES, {MULTI} rows (promptd)": (table, multi_row(plain), False),
        "INSERT OR IGNORE": (table, executemany(_insert(plain, verb="INSERT OR IGNORE")), False),
        "WITHOUT ROWID keyed by event_id": (without_rowid, executemany(_insert(plain)), False),
        "random UUIDv4 event ids": (table, executemany(_insert(plain)), True),
        "no unique index (lower bound)": (
            table.replace("NOT NULL UNIQUE", "NOT NULL"),
            executemany(
                _insert(plain, verb="INSERT")[: -len(" ON CONFLICT (event_id) DO NOTHING")]
            ),
            False,
        ),
    }


def run_once(table: str, write: Writer, rows: list[Row]) -> float:
    """Microseconds per row for writing ``rows`` into a fresh file."""
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "x.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint=100000")
        conn.execute(table)
        start = time.perf_counter()
        for i in range(0, len(rows), BATCH):
            conn.execute("BEGIN IMMEDIATE")
            write(conn, rows[i : i + BATCH])
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
        stored = conn.execute("SELECT count(*) FROM metric_events").fetchone()[0]
        conn.close()
    assert stored == len(rows), (stored, len(rows))
    return elapsed / len(rows) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    ordered, shuffled = make_rows(args.rows), make_rows(args.rows, random_ids=True)
    chosen = variants()
    times: dict[str, list[float]] = {name: [] for name in chosen}
    load = [os.getloadavg()[0]]
    for _ in range(args.runs):
        for name, (table, write, random_ids) in chosen.items():
            times[name].append(run_once(table, write, shuffled if random_ids else ordered))
        load.append(os.getloadavg()[0])
    base = statistics.median(next(iter(times.values())))
    print(f"{'variant':<44}{'us/row':>8}{'min':>7}{'max':>7}{'vs one-row':>11}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<44}{med:>8.2f}{min(values):>7.2f}{max(values):>7.2f}{med / base:>11.2f}")
    print(f"\n{args.rows:,} rows, {args.runs} runs; SQLite {sqlite3.sqlite_version}")
    print("1-minute load average before and after each run (2 cores):", load)


if __name__ == "__main__":
    main()
