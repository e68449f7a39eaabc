"""The errors of the storage layer, the same on both backends."""

from __future__ import annotations

import sqlite3


class StorageError(RuntimeError):
    """The database cannot be used (newer schema, unwritable file, unreachable server…)."""


class FencedError(StorageError):
    """A write was refused because this daemon no longer holds the leadership (its
    fencing token is not the current one, or its lease ran out)."""


class UniqueViolation(StorageError):
    """An insert or update broke a UNIQUE constraint (both backends raise this)."""


def is_unique_violation(exc: BaseException) -> bool:
    """True when ``exc`` says a UNIQUE constraint refused a write, on either backend."""
    if isinstance(exc, UniqueViolation):
        return True
    return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc)
