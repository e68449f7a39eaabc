"""Pipelines: prompts that run in a chain, registered with their wiring.

A pipeline is an ordered chain of **steps**. Each step is a registered prompt, and each
of its placeholders is **bound** to a source: an input of the episode
(``input.question``) or the output of an earlier step (``extract.output``). The last
step's output is the pipeline's answer, which episode feedback judges.

Rules checked at registration (each refusal names what is wrong): at least two steps; a
step reads only inputs and earlier steps; a prompt appears once in a pipeline and in at
most one pipeline (its episodes, rollouts and optimization belong to that pipeline);
every step's prompt exists with an active version, and its bindings name exactly that
version's placeholders.

Pipelines are what the optimizer's leader/follower search works on and what a
coordinated rollout moves as one variant; a rollout of one of its prompts is refused
while a rollout of a prompt it depends on, or that depends on it, is live.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from promptd.replacement.registry import (
    Conflict,
    NotFound,
    Registry,
    RegistryError,
)
from promptd.storage.database import Database

_SOURCE_RE: Final = re.compile(r"^(input|[^.\s]+)\.(output|[A-Za-z_][A-Za-z0-9_]*)$")
MAX_STEPS: Final = 20


class PipelineError(ValueError):
    """A pipeline definition that cannot work (unknown source, cycle, missing binding)."""


@dataclass(frozen=True, slots=True)
class Step:
    """One prompt of a pipeline and where each of its placeholders comes from."""

    prompt: str
    bindings: Mapping[str, str]  # placeholder -> "input.<name>" | "<step prompt>.output"


@dataclass(frozen=True, slots=True)
class Pipeline:
    """An ordered chain of steps (each reads inputs and earlier outputs only)."""

    name: str
    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for step in self.steps:
            if step.prompt in seen:
                raise PipelineError(f"prompt {step.prompt!r} appears twice in {self.name!r}")
            for placeholder, source in step.bindings.items():
                kind, name = parse_source(source)
                if kind == "step" and name not in seen:
                    raise PipelineError(
                        f"step {step.prompt!r}: {placeholder!r} reads {source!r}, "
                        "which is not an earlier step"
                    )
            seen.add(step.prompt)
        if len(self.steps) < 2:
            raise PipelineError(f"pipeline {self.name!r} needs at least two steps")

    @property
    def prompts(self) -> tuple[str, ...]:
        """The steps' prompts, in order."""
        return tuple(s.prompt for s in self.steps)

    def inputs(self) -> set[str]:
        """Names of the episode inputs the pipeline reads."""
        out = set()
        for step in self.steps:
            for source in step.bindings.values():
                kind, name = parse_source(source)
                if kind == "input":
                    out.add(name)
        return out

    def depends(self, prompt: str) -> set[str]:
        """Prompts whose output ``prompt`` reads, directly or not."""
        by_prompt = {s.prompt: s for s in self.steps}
        out: set[str] = set()
        todo = [prompt]
        while todo:
            for source in by_prompt[todo.pop()].bindings.values():
                kind, name = parse_source(source)
                if kind == "step" and name not in out:
                    out.add(name)
                    todo.append(name)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "name": self.name,
            "steps": [{"prompt": s.prompt, "bindings": dict(s.bindings)} for s in self.steps],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Pipeline:
        """Inverse of :meth:`to_dict` (``PipelineError`` on a bad definition)."""
        try:
            steps = tuple(
                Step(str(s["prompt"]), {str(k): str(v) for k, v in dict(s["bindings"]).items()})
                for s in data["steps"]
            )
        except (KeyError, TypeError) as exc:
            raise PipelineError(f"malformed pipeline: {exc}") from None
        return cls(str(data["name"]), steps)


def parse_source(source: str) -> tuple[str, str]:
    """``("input", name)`` or ``("step", prompt)`` for a binding source."""
    found = _SOURCE_RE.match(source)
    if found is None:
        raise PipelineError(f"source {source!r}: use 'input.<name>' or '<prompt>.output'")
    head, tail = found.groups()
    if head == "input":
        return "input", tail
    if tail != "output":
        raise PipelineError(f"source {source!r}: a step is read as '<prompt>.output'")
    return "step", head


class InvalidPipeline(RegistryError):
    """A pipeline that does not fit the registry (missing prompt, wrong bindings)."""

    status = 422


class PipelineRegistry:
    """Pipelines in SQLite, checked against the prompt registry."""

    def __init__(self, db: Database, registry: Registry) -> None:
        self.db = db
        self.registry = registry

    async def register(self, data: Mapping[str, Any]) -> Pipeline:
        """Register (or redefine) a pipeline; :class:`InvalidPipeline` says why not, and
        :class:`Conflict` refuses a redefinition while its coordinated rollout is live."""
        try:
            pipeline = Pipeline.from_dict(data)
        except PipelineError as exc:
            raise InvalidPipeline(str(exc)) from None
        if len(pipeline.steps) > MAX_STEPS:
            raise InvalidPipeline(f"a pipeline has at most {MAX_STEPS} steps")
        for step in pipeline.steps:
            try:
                active = await self.registry.active(step.prompt)
            except NotFound:
                raise InvalidPipeline(f"step {step.prompt!r}: no such prompt") from None
            if active is None:
                raise InvalidPipeline(f"step {step.prompt!r} has no active version")
            wanted = set(active.placeholders)  # a configuration's: its messages' only
            bound = set(step.bindings)
            if wanted != bound:
                raise InvalidPipeline(
                    f"step {step.prompt!r}: bindings {sorted(bound)} must name exactly the "
                    f"placeholders of its active version {sorted(wanted)}"
                )
        now = time.time()
        async with self.db.transaction() as conn:
            # Its candidates were chosen and are being tested as this pipeline: a new
            # wiring would make promotion install a combination never tested (as restore).
            async with conn.execute(
                "SELECT id FROM rollouts WHERE pipeline = ? "
                "AND status IN ('running', 'paused', 'pending')",
                (pipeline.name,),
            ) as cur:
                live = await cur.fetchone()
            if live is not None:
                raise Conflict(
                    f"pipeline {pipeline.name!r} has a live coordinated rollout ({live[0]}): "
                    "promote it or roll it back before redefining the pipeline"
                )
            async with conn.execute("SELECT name, definition FROM pipelines") as cur:
                rows = await cur.fetchall()
            for name, definition in rows:
                if name == pipeline.name:
                    continue
                taken = set(pipeline.prompts) & set(
                    Pipeline.from_dict(json.loads(definition)).prompts
                )
                if taken:
                    raise Conflict(
                        f"prompt {sorted(taken)[0]!r} already belongs to pipeline {name!r}"
                    )
            await conn.execute(
                "INSERT INTO pipelines (name, definition, created_at, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "definition = excluded.definition, updated_at = excluded.updated_at",
                (pipeline.name, json.dumps(pipeline.to_dict()), now, now),
            )
        return pipeline

    async def get(self, name: str) -> Pipeline:
        """One pipeline, or :class:`NotFound`."""
        async with self.db.reader.execute(
            "SELECT definition FROM pipelines WHERE name = ?", (name,)
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"pipeline {name!r} does not exist")
        return Pipeline.from_dict(json.loads(row[0]))

    async def list(self) -> list[Pipeline]:
        """Every pipeline, by name."""
        async with self.db.reader.execute("SELECT definition FROM pipelines ORDER BY name") as cur:
            rows = await cur.fetchall()
        return [Pipeline.from_dict(json.loads(r[0])) for r in rows]

    async def of_prompt(self, prompt: str) -> Pipeline | None:
        """The pipeline ``prompt`` belongs to, if any."""
        for pipeline in await self.list():
            if prompt in pipeline.prompts:
                return pipeline
        return None

    async def related(self, prompt: str) -> set[str]:
        """Prompts ``prompt`` depends on or that depend on it (its pipeline's chain)."""
        pipeline = await self.of_prompt(prompt)
        if pipeline is None:
            return set()
        out = pipeline.depends(prompt)
        out |= {p for p in pipeline.prompts if prompt in pipeline.depends(p)}
        return out
