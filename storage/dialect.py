"""Every difference between the SQLite and PostgreSQL dialects, in one place.

The modules write one SQL text per query, in SQLite's dialect. :func:`to_postgresql`
translates a query once per text (cached) for asyncpg:

* parameters: ``?`` and ``?NNN`` become ``$n``; ``:name`` becomes ``$n`` (the same name,
  the same number), with :func:`bind` turning the caller's sequence or mapping into
  asyncpg's positional arguments;
* ``group_concat(x, sep)`` becomes ``string_agg(x, sep)``;
* ``CAST(x AS INTEGER)`` truncates in SQLite but rounds in PostgreSQL: it becomes
  ``CAST(trunc(x) AS BIGINT)``; ``CAST(text AS BLOB)`` (the text's UTF-8 bytes) becomes
  ``convert_to(text, 'UTF8')``;
* SQLite's scalar ``max(a, b)`` and ``min(a, b)`` (two or more arguments) become
  ``greatest(a, b)`` and ``least(a, b)`` (one argument: the aggregates, unchanged);
  they differ on NULL (SQLite answers NULL, PostgreSQL skips it): give them no NULLs;
* ``TOTAL(x)`` (a float sum, 0.0 over no rows) exists in PostgreSQL as an aggregate that
  :data:`POSTGRESQL_PRELUDE` creates with the schema.

:func:`ddl_to_postgresql` maps the schema's column types (``INTEGER PRIMARY KEY`` row ids
become identity columns, ``INTEGER`` ``BIGINT``, ``REAL`` ``DOUBLE PRECISION``, ``BLOB``
``BYTEA``), so that one list of migrations serves both backends; a migration SQLite can
only express its own way (a table rebuild) carries its PostgreSQL text beside it.

What is *not* translated, and therefore not written anywhere: ``INSERT OR IGNORE`` /
``OR REPLACE`` (use ``ON CONFLICT``), ``json_each``/``json_extract`` (decode in Python),
sums of comparisons (``SUM(a IS NOT NULL)``: use ``COUNT`` or ``CASE``), subqueries in
``FROM`` without an alias, and PRAGMAs outside :mod:`.sqlite`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

Dialect = Literal["sqlite", "postgresql"]

#: Objects PostgreSQL needs for the shared SQL text, created with the first migration.
POSTGRESQL_PRELUDE: Final = """
CREATE AGGREGATE total (double precision) (
    SFUNC = float8pl, STYPE = double precision, INITCOND = '0'
);
"""

_RENAMES: Final = {"group_concat": "string_agg"}
_CAST_INTEGER: Final = re.compile(r"^(?P<expr>.*)\s+AS\s+INTEGER\s*$", re.IGNORECASE | re.DOTALL)
_CAST_BLOB: Final = re.compile(r"^(?P<expr>.*)\s+AS\s+BLOB\s*$", re.IGNORECASE | re.DOTALL)
_WORD: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DIGITS: Final = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class Translated:
    """A query in PostgreSQL's dialect, and how to bind its parameters."""

    sql: str
    #: Parameter names in ``$n`` order (``:name`` style), or ``None`` (``?`` style).
    names: tuple[str, ...] | None
    #: True when the statement returns rows (a SELECT, or RETURNING).
    returns_rows: bool

    def bind(self, parameters: Sequence[Any] | Mapping[str, Any] | None) -> list[Any]:
        """asyncpg's positional arguments for ``parameters``."""
        if parameters is None:
            return []
        if self.names is None:
            if isinstance(parameters, Mapping):
                raise TypeError("this statement takes ? parameters, not a mapping")
            return list(parameters)
        if not isinstance(parameters, Mapping):
            raise TypeError("this statement takes :name parameters, not a sequence")
        return [parameters[name] for name in self.names]


@functools.lru_cache(maxsize=4096)
def to_postgresql(sql: str) -> Translated:
    """``sql`` (SQLite dialect) for PostgreSQL; see the module docstring."""
    scan = _Scan(sql)
    while scan.i < len(sql):
        scan.step()
    if scan.names and scan.positional:
        raise ValueError(f"a statement mixes ? and :name parameters: {sql[:80]!r}")
    text = "".join(scan.out)
    return Translated(text, tuple(scan.names) if scan.names else None, _returns_rows(text))


class _Scan:
    """One left-to-right pass over a statement, skipping literals and comments."""

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self.i = 0
        self.out: list[str] = []
        self.names: list[str] = []
        self.positional = 0
        # Per open parenthesis: what it opened (a CAST, max/min, or a plain one).
        self.parens: list[_Paren] = []

    def step(self) -> None:
        sql, i = self.sql, self.i
        c = sql[i]
        if c in "'\"":
            self.copy(_literal_end(sql, i))
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            self.i = len(sql) if end < 0 else end
        elif c == "?":
            self.question_mark()
        elif sql.startswith("::", i):
            self.copy(i + 2)
        elif c == ":" and (word := _WORD.match(sql, i + 1)):
            self.named(word.group())
            self.i = word.end()
        elif word := _WORD.match(sql, i):
            self.word(word.group())
        elif c in "()":
            self.parenthesis(c)
        else:
            if c == "," and self.parens:
                self.parens[-1].commas += 1
            self.copy(i + 1)

    def copy(self, end: int) -> None:
        self.out.append(self.sql[self.i : end])
        self.i = end

    def question_mark(self) -> None:
        digits = _DIGITS.match(self.sql, self.i + 1)
        if digits:
            self.out.append("$" + digits.group())
            self.i = digits.end()
            return
        self.positional += 1
        self.out.append(f"${self.positional}")
        self.i += 1

    def named(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)
        self.out.append(f"${self.names.index(name) + 1}")

    def word(self, text: str) -> None:
        self.i += len(text)
        kind = text.lower()
        if kind in ("cast", "max", "min") and self.sql[self.i : self.i + 1] == "(":
            self.out.append(text)
            self.parens.append(_Paren(kind, len(self.out) - 1, len(self.out) + 1))
            self.out.append("(")
            self.i += 1
            return
        self.out.append(_RENAMES.get(kind, text))

    def parenthesis(self, c: str) -> None:
        if c == "(":
            self.parens.append(_Paren("", len(self.out), len(self.out) + 1))
        elif self.parens:
            paren = self.parens.pop()
            if paren.kind == "cast":
                _cast(self.out, paren)
            elif paren.kind in _SCALAR and paren.commas:
                self.out[paren.name] = _SCALAR[paren.kind]
        self.out.append(c)
        self.i += 1


@dataclass(slots=True)
class _Paren:
    """An open parenthesis: ``kind`` (``cast``, ``max``, ``min`` or ''), where the
    function's name and the body start in the output, and its top-level commas."""

    kind: str
    name: int
    body: int
    commas: int = 0


_SCALAR: Final = {"max": "greatest", "min": "least"}


def _cast(out: list[str], paren: _Paren) -> None:
    """SQLite's ``CAST(x AS INTEGER)`` truncates: say so to PostgreSQL (which rounds).
    ``CAST(text AS BLOB)`` is the text's UTF-8 bytes: ``convert_to`` (PostgreSQL's cast
    to ``bytea`` would read backslashes in the text as escapes)."""
    body = "".join(out[paren.body :])
    if integer := _CAST_INTEGER.match(body):
        out[paren.body :] = ["trunc(", integer.group("expr"), ") AS BIGINT"]
    elif blob := _CAST_BLOB.match(body):
        out[paren.name] = "convert_to"
        out[paren.body :] = [blob.group("expr"), ", 'UTF8'"]


def _literal_end(sql: str, start: int) -> int:
    """Index just past the quoted literal or identifier starting at ``start``."""
    quote = sql[start]
    i = start + 1
    while True:
        j = sql.find(quote, i)
        if j < 0:
            return len(sql)
        if sql[j + 1 : j + 2] == quote:  # a doubled quote inside
            i = j + 2
            continue
        return j + 1


_ROWS: Final = re.compile(r"^\s*(SELECT|WITH|VALUES)\b|\bRETURNING\b", re.IGNORECASE)


def _returns_rows(sql: str) -> bool:
    # WITH … INSERT without RETURNING does not occur in promptd's SQL.
    return _ROWS.search(sql) is not None


_DDL_TYPES: Final = (
    (
        re.compile(r"\bINTEGER\s+PRIMARY\s+KEY\b", re.I),
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (re.compile(r"\bINTEGER\b", re.I), "BIGINT"),
    (re.compile(r"\bREAL\b", re.I), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b", re.I), "BYTEA"),
)
_COMMENT: Final = re.compile(r"--[^\n]*")


def ddl_to_postgresql(script: str) -> str:
    """A migration script (SQLite dialect, no string literal holding these type names)
    with PostgreSQL's column types."""
    text = _COMMENT.sub("", script)
    for pattern, replacement in _DDL_TYPES:
        text = pattern.sub(replacement, text)
    return text
