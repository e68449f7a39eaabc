"""Prompt registry: versions, placeholders, activation, restore (real SQLite file)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from promptd.replacement.registry import (
    Conflict,
    InvalidName,
    NewVersion,
    NotFound,
    PlaceholderMismatch,
    Registry,
    RegistryError,
    name_problem,
    placeholders,
)
from promptd.storage.database import Database


@pytest.fixture
async def registry(store_target: Path | str) -> AsyncIterator[Registry]:
    """A registry on a fresh database (a SQLite file, then PostgreSQL)."""
    db = await Database.open(store_target)
    yield Registry(db)
    await db.close()


@pytest.fixture
async def file_registry(tmp_path: Path) -> AsyncIterator[Registry]:
    """A registry on a fresh database file (name checks happen before any SQL)."""
    db = await Database.open(tmp_path / "r.db")
    yield Registry(db)
    await db.close()


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("Summarize {document} in {n} words.", ["document", "n"]),
        ("{a}{a} {b.attr} {c[0]} {{literal}}", ["a", "b", "c"]),
        ("no fields", []),
    ],
)
def test_placeholders_are_the_named_format_fields(template: str, expected: list[str]) -> None:
    """Placeholders are the root names of str.format fields; escaped braces are not fields."""
    assert placeholders(template) == expected


@pytest.mark.parametrize("template", ["{}", "{0}", "unclosed {x", "stray } brace"])
def test_bad_templates_are_refused(template: str) -> None:
    """Positional or malformed format strings are refused with a clear error."""
    with pytest.raises(RegistryError):
        placeholders(template)


async def test_first_version_is_active_and_later_ones_are_candidates(registry: Registry) -> None:
    """The first version activates; the next is a candidate whose parent is the active one."""
    v1 = await registry.register("s", NewVersion(template="Summarize {doc}."))
    v2 = await registry.register("s", NewVersion(template="Briefly summarize {doc}."))
    assert (v1.version, v1.status) == ("v1", "active")
    assert (v2.version, v2.status, v2.parent_version) == ("v2", "candidate", "v1")
    assert (await registry.get_prompt("s")).active_version == "v1"
    assert [v.version for v in await registry.versions("s")] == ["v1", "v2"]


async def test_placeholder_change_is_refused_unless_forced(registry: Registry) -> None:
    """A version that drops or adds a placeholder is refused; force accepts it."""
    await registry.register("s", NewVersion(template="Summarize {doc}."))
    with pytest.raises(PlaceholderMismatch, match=r"missing: \['doc'\]"):
        await registry.register("s", NewVersion(template="Summarize {text}."))
    forced = await registry.register("s", NewVersion(template="Summarize {text}.", force=True))
    assert forced.placeholders == ["text"]


async def test_duplicate_template_or_version_name_conflicts(registry: Registry) -> None:
    """Registering the same template twice, or reusing a version name, is a conflict."""
    await registry.register("s", NewVersion(template="A {x}", version="gold"))
    with pytest.raises(Conflict):
        await registry.register("s", NewVersion(template="A {x}"))
    with pytest.raises(Conflict):
        await registry.register("s", NewVersion(template="B {x}", version="gold"))


async def test_restore_makes_a_backup_active_again(registry: Registry) -> None:
    """Activating v2 retires v1; restoring v1 makes it active and retires v2."""
    await registry.register("s", NewVersion(template="A {x}"))
    await registry.register("s", NewVersion(template="B {x}", activate=True))
    assert (await registry.get_version("s", "v1")).status == "retired"
    restored = await registry.restore("s", "v1")
    assert restored.status == "active"
    assert (await registry.get_version("s", "v2")).status == "retired"
    assert (await registry.active("s")).version == "v1"  # type: ignore[union-attr]


async def test_unknown_prompt_or_version_is_not_found(registry: Registry) -> None:
    """Unknown names raise NotFound (HTTP 404)."""
    with pytest.raises(NotFound):
        await registry.get_prompt("nope")
    await registry.register("s", NewVersion(template="A"))
    with pytest.raises(NotFound):
        await registry.restore("s", "v9")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "must not be empty"),
        ("a\x00b", "U+0000"),
        ("line\nbreak", "U+000A"),
        ("tab\there", "U+0009"),
        ("sep\u2028x", "U+2028"),
        (" padded", "whitespace"),
        ("x" * 201, "above the 200-character limit"),
    ],
)
async def test_bad_names_are_refused_with_the_reason(
    file_registry: Registry, name: str, problem: str
) -> None:
    """Names the event contract could not carry sensibly (empty, NUL and other control
    characters, edge whitespace, over 200 characters) are refused (422) saying why, in the
    prompt name, in a version name and in a restore; nothing is stored."""
    assert name_problem(name, 200) is not None
    with pytest.raises(InvalidName, match=re.escape(problem)) as info:
        await file_registry.register(name, NewVersion(template="x"))
    assert info.value.status == 422
    with pytest.raises(ValidationError, match="name "):
        NewVersion(template="x", version=name)
    with pytest.raises(InvalidName):
        await file_registry.restore("p", name)
    assert await file_registry.list_prompts() == []


@pytest.mark.parametrize("name", ["summarize", "support/summarize v2", "résumé·日本語", "x" * 200])
async def test_good_names_are_kept_verbatim(file_registry: Registry, name: str) -> None:
    """Spaces, slashes and any script inside a name are fine, up to 200 characters."""
    version = await file_registry.register(name, NewVersion(template="x", version=name))
    assert (version.prompt, version.version) == (name, name)
