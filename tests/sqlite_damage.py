"""Damaging a SQLite file the way a bad disk does: one page of one table."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path


def damage_first_leaf(path: Path, table: str) -> int:
    """Overwrite the cell pointers of the first (oldest rows) leaf page of ``table``'s
    b-tree with garbage; returns the page number. Lookups of the newest rows (the
    rightmost path) still work; ``PRAGMA quick_check`` reports the page."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        root = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()[0]
    data = path.read_bytes()
    size = int.from_bytes(data[16:18], "big")
    size = 65536 if size == 1 else size
    page = int(root)
    while True:
        start = (page - 1) * size + (100 if page == 1 else 0)
        kind = data[start]
        if kind == 0x0D:  # a table leaf
            break
        assert kind == 0x05, f"page {page} of {table} is not a table b-tree page"
        first_cell = int.from_bytes(data[start + 12 : start + 14], "big")
        cell = (page - 1) * size + first_cell
        page = int.from_bytes(data[cell : cell + 4], "big")
    cells = int.from_bytes(data[start + 3 : start + 5], "big")
    with path.open("r+b") as f:
        f.seek(start + 8)
        f.write(b"\xff\xf0" * max(cells, 4))
    return page
