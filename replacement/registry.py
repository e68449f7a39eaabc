"""The prompt registry: prompts, immutable versions, the active one, and its history.

Templates use Python ``str.format`` placeholders (``{document}``); the SDK's
``PromptVariant.format(**vars)`` fills them. A new version whose placeholder set differs
from the active version's would break the app's call site, so it is refused unless
forced. Versions never change after registration; only their status does:

* ``active`` — served to everyone not in a rollout's candidate arm (one per prompt);
* ``candidate`` — registered, waiting (e.g. from the optimizer);
* ``in_rollout`` — the candidate of a running or paused rollout;
* ``retired`` — formerly active: the backup ``promptd prompts restore`` brings back; or a
  candidate whose ``require_win`` rollout ended as ``no_improvement``;
* ``rolled_back`` — a candidate whose rollout was rolled back.

Prompt and version names follow :func:`name_problem` (1–200 characters, no control
characters), like the events that carry them.
"""

from __future__ import annotations

import json
import string
import time
import unicodedata
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, model_validator

from promptd.demos import DEFAULT_K, DEFAULT_MAX_CHARS, MAX_DEMOS_PER_CALL
from promptd.events import MAX_NAME_CHARS, MAX_PROMPT_CHARS
from promptd.prompt_config import PARAMS, describe
from promptd.storage.database import Database, is_unique_violation
from promptd.storage.pools import PoolStore

VersionStatus = Literal["active", "candidate", "in_rollout", "retired", "rolled_back"]
MAX_TEMPLATE_CHARS: Final = 100_000
# Control characters (NUL, newlines, …), lone surrogates and line/paragraph separators.
_REFUSED_CATEGORIES: Final = frozenset({"Cc", "Cs", "Zl", "Zp"})


class RegistryError(Exception):
    """A registry operation was refused; ``status`` is the HTTP status that fits."""

    status = 400


class NotFound(RegistryError):
    """The prompt or version does not exist."""

    status = 404


class Conflict(RegistryError):
    """The operation conflicts with the current state (a live rollout, a duplicate)."""

    status = 409


class Unprocessable(RegistryError):
    """A well-formed request the registry cannot carry out (a pool that does not exist)."""

    status = 422


class InvalidName(RegistryError):
    """A prompt or version name breaks the naming rules (see :func:`name_problem`)."""

    status = 422


def name_problem(value: str, limit: int) -> str | None:
    """Why ``value`` cannot be a prompt or version name, or None.

    The rules match the event contract's caps (a prompt name is at most 200 characters, a
    variant at most 200): names are 1..``limit`` characters, with no control characters
    (NUL, newline, tab, …), no lone surrogates or line separators, and no leading or
    trailing whitespace. Anything else — spaces inside, ``/``, any script — is allowed,
    since apps already send such names in their events.
    """
    if not value:
        return "must not be empty"
    if len(value) > limit:
        return f"is {len(value)} characters long, above the {limit}-character limit"
    if value != value.strip():
        return "must not start or end with whitespace"
    for ch in value:
        if unicodedata.category(ch) in _REFUSED_CATEGORIES:
            return f"must not contain the control character U+{ord(ch):04X}"
    return None


def check_name(kind: str, value: str, limit: int = MAX_NAME_CHARS) -> str:
    """``value`` when it is a valid ``kind`` name, else :class:`InvalidName` saying why."""
    problem = name_problem(value, limit)
    if problem is not None:
        raise InvalidName(f"{kind} name {value[:40]!r}{'…' if len(value) > 40 else ''} {problem}")
    return value


def _pydantic_name(limit: int) -> AfterValidator:
    def check(value: str) -> str:
        problem = name_problem(value, limit)
        if problem is not None:
            raise ValueError(f"name {problem}")
        return value

    return AfterValidator(check)


PromptName = Annotated[str, _pydantic_name(MAX_PROMPT_CHARS)]
"""A prompt name in a request body (the event contract's ``prompt``)."""
VersionName = Annotated[str, _pydantic_name(MAX_NAME_CHARS)]
"""A version name in a request body (the event contract's ``variant``)."""


class PlaceholderMismatch(RegistryError):
    """The new template's placeholders differ from the active version's."""

    status = 422

    def __init__(self, expected: Sequence[str], got: Sequence[str]) -> None:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        super().__init__(
            f"placeholders differ from the active version (missing: {missing}, added: "
            f"{extra}); register with force=true to accept"
        )
        self.missing = missing
        self.extra = extra


def placeholders(template: str) -> list[str]:
    """Names of the ``str.format`` fields of ``template``, sorted and unique.

    Raises :class:`RegistryError` for a template ``str.format`` cannot parse, or with
    positional fields (``{}``/``{0}``), which named variables cannot fill.
    """
    names: set[str] = set()
    try:
        for _literal, field, _spec, _conv in string.Formatter().parse(template):
            if field is None:
                continue
            root = field.split(".", 1)[0].split("[", 1)[0]
            if root == "" or root.isdigit():
                raise RegistryError(f"positional placeholder {{{field}}}: use named ones")
            names.add(root)
    except ValueError as exc:
        raise RegistryError(f"template is not a valid format string: {exc}") from None
    return sorted(names)


class PromptVersion(BaseModel):
    """One immutable version of a prompt's template."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    version: str
    seq: int
    template: str
    placeholders: list[str]
    parent_version: str | None = None
    origin: str = "human"
    run_id: str | None = None
    rationale: str | None = None
    status: VersionStatus
    created_at: float
    # A configuration version (messages, model, parameters); None for a plain template,
    # whose ``template`` is then the text the app formats. For a configuration,
    # ``template`` is its canonical text (see promptd.prompt_config.describe).
    config: dict[str, Any] | None = None


class Prompt(BaseModel):
    """A prompt family and its active version."""

    model_config = ConfigDict(frozen=True)

    name: str
    active_version: str | None
    profile: str
    created_at: float
    updated_at: float


class ChatMessage(BaseModel):
    """One message of a configuration; ``content`` is a ``str.format`` template."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEMPLATE_CHARS)


class Tunable(BaseModel):
    """What the optimizer may change besides the messages (empty: nothing)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=20
    )
    temperature: list[Annotated[float, Field(ge=0, le=2)]] = Field(
        default_factory=list, max_length=20
    )
    max_tokens: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list, max_length=20)


class DemosConfig(BaseModel):
    """Demonstrations taken per request from a pool snapshot (see :mod:`promptd.demos`).

    ``pool`` pins the snapshot; left out at registration, the prompt's newest snapshot
    is pinned (the registered version always names one).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["pool"] = "pool"
    pool: str | None = Field(default=None, min_length=1, max_length=64)
    k: int = Field(default=DEFAULT_K, ge=1, le=MAX_DEMOS_PER_CALL)
    # lexical distances are in [0, 1], cosine distances in [0, 2]; unset: no cut-off.
    max_distance: float | None = Field(default=None, ge=0, le=2)
    retriever: Literal["lexical", "embedding"] = "lexical"
    max_chars: int = Field(default=DEFAULT_MAX_CHARS, ge=50, le=MAX_TEMPLATE_CHARS)


class EnsembleConfig(BaseModel):
    """Self-consistency: ``n`` sampled answers, the most frequent kept (n x the calls)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(ge=2, le=20)
    temperature: float = Field(default=0.7, gt=0, le=2)
    # How answers are compared: as labels (case, quotes, final period ignored) or JSON.
    answer: Literal["label", "json"] = "label"


class PromptConfig(BaseModel):
    """A version as chat messages with (optionally) a model and its parameters.

    See :mod:`promptd.prompt_config` for the format. The last message is the user's turn;
    placeholders may appear in any message and are checked over all of them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: list[ChatMessage] = Field(min_length=1, max_length=200)
    model: str | None = Field(default=None, min_length=1, max_length=200)
    params: dict[str, float | int | str | list[str]] = Field(default_factory=dict)
    output_schema: dict[str, Any] | None = None
    tunable: Tunable | None = None
    demos: DemosConfig | None = None
    ensemble: EnsembleConfig | None = None

    @model_validator(mode="after")
    def _well_formed(self) -> PromptConfig:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's turn (role 'user')")
        unknown = sorted(set(self.params) - set(PARAMS))
        if unknown:
            raise ValueError(f"unknown params {unknown}; allowed: {list(PARAMS)}")
        if len(json.dumps(self.output_schema or {})) > MAX_TEMPLATE_CHARS:
            raise ValueError("output_schema is too large")
        if self.ensemble is not None and self.ensemble.answer == "json" and not self.output_schema:
            raise ValueError("an ensemble voting on JSON answers needs an output_schema")
        return self

    def placeholders(self) -> list[str]:
        """Placeholders over every message."""
        names: set[str] = set()
        for m in self.messages:
            names.update(placeholders(m.content))
        return sorted(names)

    def as_dict(self) -> dict[str, Any]:
        """JSON form without empty fields (the demos and ensemble blocks in full, so
        that what the optimizer proposes and what is stored compare equal)."""
        out = self.model_dump(
            mode="json", exclude_none=True, exclude_defaults=True, exclude={"demos", "ensemble"}
        ) | {"messages": [m.model_dump() for m in self.messages]}
        if self.demos is not None:
            out["demos"] = self.demos.model_dump(mode="json", exclude_none=True)
        if self.ensemble is not None:
            out["ensemble"] = self.ensemble.model_dump(mode="json")
        return out


class NewVersion(BaseModel):
    """Body of ``POST /v1/prompts/{name}/versions``: a ``template`` or a ``config``."""

    model_config = ConfigDict(extra="forbid")

    template: str | None = Field(default=None, min_length=1, max_length=MAX_TEMPLATE_CHARS)
    config: PromptConfig | None = None
    version: VersionName | None = None
    parent_version: VersionName | None = None
    origin: str = Field(default="human", max_length=200)
    run_id: str | None = Field(default=None, max_length=200)
    rationale: str | None = Field(default=None, max_length=10_000)
    # Strict: JSON true/false only ("yes" is not a boolean in a request body).
    activate: StrictBool = False
    force: StrictBool = False
    profile: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> NewVersion:
        if (self.template is None) == (self.config is None):
            raise ValueError("give either 'template' or 'config'")
        return self

    @property
    def text(self) -> str:
        """The template, or the configuration's canonical text."""
        if self.config is not None:
            return describe(self.config.as_dict())
        assert self.template is not None
        return self.template

    def names(self) -> list[str]:
        """Placeholders (over every message of a configuration)."""
        if self.config is not None:
            return self.config.placeholders()
        assert self.template is not None
        return placeholders(self.template)


_VERSION_COLS: Final = (
    "prompt, version, seq, template, placeholders, parent_version, origin, run_id, "
    "rationale, status, created_at, config"
)


def _version(row: Sequence[Any]) -> PromptVersion:
    fields = dict(zip([c.strip() for c in _VERSION_COLS.split(",")], row, strict=True))
    fields["placeholders"] = json.loads(fields["placeholders"])
    fields["config"] = json.loads(fields["config"]) if fields["config"] else None
    return PromptVersion.model_validate(fields)


class Registry:
    """Prompt registry on the SQLite database (all writes in one transaction each)."""

    def __init__(self, db: Database, default_profile: str = "balanced") -> None:
        self.db = db
        # The rollout profile of prompts registered without one (rollout.default_profile).
        self.default_profile = default_profile

    async def list_prompts(self) -> list[Prompt]:
        """Every prompt, by name."""
        async with self.db.reader.execute(
            "SELECT name, active_version, profile, created_at, updated_at FROM prompts "
            "ORDER BY name"
        ) as cur:
            rows = await cur.fetchall()
        return [_prompt(row) for row in rows]

    async def get_prompt(self, name: str) -> Prompt:
        """One prompt, or :class:`NotFound`."""
        async with self.db.reader.execute(
            "SELECT name, active_version, profile, created_at, updated_at FROM prompts "
            "WHERE name = ?",
            (name,),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"prompt {name!r} does not exist")
        return _prompt(row)

    async def versions(self, name: str) -> list[PromptVersion]:
        """The version history of ``name``, oldest first."""
        await self.get_prompt(name)
        async with self.db.reader.execute(
            f"SELECT {_VERSION_COLS} FROM prompt_versions WHERE prompt = ? ORDER BY seq",
            (name,),
        ) as cur:
            rows = await cur.fetchall()
        return [_version(row) for row in rows]

    async def get_version(self, name: str, version: str) -> PromptVersion:
        """One version, or :class:`NotFound`."""
        async with self.db.reader.execute(
            f"SELECT {_VERSION_COLS} FROM prompt_versions WHERE prompt = ? AND version = ?",
            (name, version),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"prompt {name!r} has no version {version!r}")
        return _version(row)

    async def active(self, name: str) -> PromptVersion | None:
        """The active version of ``name`` (``None`` before the first one)."""
        prompt = await self.get_prompt(name)
        if prompt.active_version is None:
            return None
        return await self.get_version(name, prompt.active_version)

    async def register(self, name: str, body: NewVersion) -> PromptVersion:
        """Register a new immutable version; the first version of a prompt becomes active."""
        check_name("prompt", name, MAX_PROMPT_CHARS)
        body = await self._pin_pool(name, body)
        names = body.names()
        text = body.text
        now = time.time()
        async with self.db.transaction() as conn:
            async with conn.execute(
                "SELECT active_version FROM prompts WHERE name = ?", (name,)
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                await conn.execute(
                    "INSERT INTO prompts (name, active_version, profile, created_at, updated_at)"
                    " VALUES (?, NULL, ?, ?, ?)",
                    (name, body.profile or self.default_profile, now, now),
                )
                active_version = None
            else:
                active_version = row[0]
                if body.profile:
                    await conn.execute(
                        "UPDATE prompts SET profile = ?, updated_at = ? WHERE name = ?",
                        (body.profile, now, name),
                    )
            async with conn.execute(
                "SELECT coalesce(max(seq), 0), "
                "(SELECT placeholders FROM prompt_versions WHERE prompt = ? AND version = ?), "
                "(SELECT count(*) FROM prompt_versions WHERE prompt = ? AND template = ?) "
                "FROM prompt_versions WHERE prompt = ?",
                (name, active_version, name, text, name),
            ) as cur:
                stats = await cur.fetchone()
            assert stats is not None
            seq = int(stats[0]) + 1
            if stats[1] is not None and json.loads(stats[1]) != names and not body.force:
                raise PlaceholderMismatch(json.loads(stats[1]), names)
            if int(stats[2]) > 0 and not body.force:
                raise Conflict(f"prompt {name!r} already has a version with this template")
            version = body.version or f"v{seq}"
            activate = active_version is None or body.activate
            status: VersionStatus = "active" if activate else "candidate"
            try:
                await conn.execute(
                    f"INSERT INTO prompt_versions ({_VERSION_COLS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        version,
                        seq,
                        text,
                        json.dumps(names),
                        body.parent_version or active_version,
                        body.origin,
                        body.run_id,
                        body.rationale,
                        status,
                        now,
                        json.dumps(body.config.as_dict()) if body.config else None,
                    ),
                )
            except Exception as exc:
                if is_unique_violation(exc):
                    raise Conflict(f"prompt {name!r} already has version {version!r}") from None
                raise
            if activate:
                await _make_active(conn, name, version, active_version, now)
        return await self.get_version(name, version)

    async def _pin_pool(self, name: str, body: NewVersion) -> NewVersion:
        """``body`` with its demos' pool snapshot checked, or pinned to the newest one
        when it names none (:class:`RegistryError` when there is none to pin)."""
        config = body.config
        if config is None or config.demos is None:
            return body
        demos = config.demos
        pools = PoolStore(self.db)
        if demos.pool is None:
            info = await pools.latest(name)
            if info is None:
                raise Unprocessable(
                    f"prompt {name!r} has no demonstration pool yet: build one with "
                    f"POST /v1/prompts/{name}/pools (or let a knn run make one)"
                )
        else:
            info = await pools.info(name, demos.pool)
            if info is None:
                raise Unprocessable(f"prompt {name!r} has no demonstration pool {demos.pool!r}")
        if demos.retriever == "embedding" and info.embedding_model is None:
            raise Unprocessable(
                f"pool {info.pool_id!r} has no embeddings: the embedding retriever needs a "
                "pool built with an embedding model"
            )
        pinned = config.model_copy(
            update={"demos": demos.model_copy(update={"pool": info.pool_id})}
        )
        return body.model_copy(update={"config": pinned})

    async def restore(self, name: str, version: str) -> PromptVersion:
        """Make an earlier version active again (the backup); refused during a rollout."""
        check_name("prompt", name, MAX_PROMPT_CHARS)
        check_name("version", version)
        target = await self.get_version(name, version)
        now = time.time()
        async with self.db.transaction() as conn:
            # The prompt's own rollout, or a pipeline rollout it is a member of (the
            # members are JSON, decoded here: no JSON functions in the shared SQL).
            async with conn.execute(
                "SELECT prompt, members FROM rollouts "
                "WHERE status IN ('running', 'paused', 'pending')"
            ) as cur:
                live = await cur.fetchall()
            if any(_routes(name, prompt, members) for prompt, members in live):
                raise Conflict(
                    f"prompt {name!r} has a live rollout: roll it back or promote it first"
                )
            prompt = await self.get_prompt(name)
            if prompt.active_version == version:
                return target
            await _make_active(conn, name, version, prompt.active_version, now)
        return await self.get_version(name, version)

    async def set_status(self, name: str, version: str, status: VersionStatus) -> None:
        """Change a version's status (used by the rollout controller)."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE prompt_versions SET status = ? WHERE prompt = ? AND version = ?",
                (status, name, version),
            )


async def _make_active(
    conn: Any, name: str, version: str, previous: str | None, now: float
) -> None:
    """Within a transaction: ``version`` becomes active, ``previous`` the retired backup."""
    if previous is not None and previous != version:
        await conn.execute(
            "UPDATE prompt_versions SET status = 'retired' WHERE prompt = ? AND version = ?",
            (name, previous),
        )
    await conn.execute(
        "UPDATE prompt_versions SET status = 'active' WHERE prompt = ? AND version = ?",
        (name, version),
    )
    await conn.execute(
        "UPDATE prompts SET active_version = ?, updated_at = ? WHERE name = ?",
        (version, now, name),
    )


def _routes(name: str, prompt: str, members: str | None) -> bool:
    """True when a rollout of ``prompt`` (with pipeline ``members``, JSON) routes ``name``."""
    return prompt == name or any(m.get("prompt") == name for m in json.loads(members or "[]"))


def _prompt(row: Sequence[Any]) -> Prompt:
    return Prompt(
        name=row[0], active_version=row[1], profile=row[2], created_at=row[3], updated_at=row[4]
    )
