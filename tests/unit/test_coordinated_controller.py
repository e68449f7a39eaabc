"""The rollout controller with a pipeline rollout, on a real SQLite file (no broker):
routing of every step, refusals, and promotion or rollback of all steps at once — also
after a crash in the middle of the transition."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from promptd.replacement import machine
from promptd.replacement.controller import RolloutController
from promptd.replacement.coordinated import InvalidCandidates
from promptd.replacement.metrics import RolloutMetrics
from promptd.replacement.pipelines import PipelineRegistry
from promptd.replacement.profiles import get_profile
from promptd.replacement.registry import Conflict, NewVersion, NotFound, Registry
from promptd.storage import rollouts as rollout_storage
from promptd.storage.database import Database

GEO = {
    "name": "geo",
    "steps": [
        {"prompt": "extract", "bindings": {"text": "input.text"}},
        {"prompt": "answer", "bindings": {"notes": "extract.output"}},
        {"prompt": "polish", "bindings": {"draft": "answer.output"}},
    ],
}


@pytest.fixture
async def parts(
    store_target: Path | str,
) -> AsyncIterator[tuple[Database, Registry, PipelineRegistry]]:
    """A SQLite file with three prompts in a pipeline, each with v1 active and a v2."""
    db = await Database.open(store_target)
    registry = Registry(db)
    for prompt, placeholder in (("extract", "text"), ("answer", "notes"), ("polish", "draft")):
        await registry.register(prompt, NewVersion(template=f"{prompt} v1 {{{placeholder}}}"))
        await registry.register(prompt, NewVersion(template=f"{prompt} v2 {{{placeholder}}}"))
    await registry.register("solo", NewVersion(template="solo v1"))
    await registry.register("solo", NewVersion(template="solo v2"))
    pipelines = PipelineRegistry(db, registry)
    await pipelines.register(GEO)
    yield db, registry, pipelines
    await db.close()


def _controller(db: Database, registry: Registry, pipelines: PipelineRegistry) -> Any:
    return RolloutController(
        db, registry, get_profile, RolloutMetrics(CollectorRegistry()), pipelines=pipelines
    )


async def _active(registry: Registry) -> dict[str, str | None]:
    return {
        p: (await registry.get_prompt(p)).active_version for p in ("extract", "answer", "polish")
    }


async def test_every_step_routes_with_the_rollouts_salt_and_weight(parts: Any) -> None:
    """Changed steps carry their candidate, the unchanged one none, all with the same
    salt, weight and rollout id; the view lists the pipeline and its members; no step's
    active version can be restored meanwhile."""
    db, registry, pipelines = parts
    controller = _controller(db, registry, pipelines)
    active = await _active(registry)
    row = await controller.start_pipeline_rollout(
        "geo", {"extract": "v2", "polish": "v2"}, profile="aggressive"
    )
    routings = {p: await controller.routing(p) for p in ("extract", "answer", "polish")}
    assert {r.salt for r in routings.values()} == {row.state["salt"]}
    assert {r.weight for r in routings.values()} == {get_profile("aggressive").steps[0].weight}
    assert {r.rollout_id for r in routings.values()} == {row.id}
    assert [routings[p].candidate_version for p in ("extract", "answer", "polish")] == [
        "v2",
        None,
        "v2",
    ]
    view = await controller.describe(row.id)
    assert view["pipeline"] == "geo"
    assert view["members"] == [
        {"prompt": "extract", "baseline": active["extract"], "candidate": "v2"},
        {"prompt": "answer", "baseline": active["answer"], "candidate": None},
        {"prompt": "polish", "baseline": active["polish"], "candidate": "v2"},
    ]
    assert (view["prompt"], view["candidate_version"]) == ("extract", "v2")
    assert controller.live_prompts() == {"extract", "answer", "polish"}
    with pytest.raises(Conflict, match="'answer' has a live rollout"):
        await registry.restore("answer", "v2")  # a member, though not the rollout's prompt


async def test_refusals_name_what_is_wrong(parts: Any) -> None:
    """Unknown pipeline or version: NotFound; a prompt that is not a step or no candidate:
    InvalidCandidates; an active candidate or a live rollout: Conflict."""
    db, registry, pipelines = parts
    controller = _controller(db, registry, pipelines)
    active = await _active(registry)
    with pytest.raises(NotFound, match="pipeline 'nope'"):
        await controller.start_pipeline_rollout("nope", {"extract": "v2"})
    with pytest.raises(NotFound):
        await controller.start_pipeline_rollout("geo", {"extract": "v9"})
    with pytest.raises(InvalidCandidates, match="'solo' is not a step of pipeline 'geo'"):
        await controller.start_pipeline_rollout("geo", {"solo": "v2"})
    with pytest.raises(InvalidCandidates, match="name at least one step"):
        await controller.start_pipeline_rollout("geo", {})
    with pytest.raises(Conflict, match="already the active version"):
        await controller.start_pipeline_rollout("geo", {"extract": active["extract"]})
    single = await controller.start_rollout("answer", "v2")
    with pytest.raises(Conflict, match=f"'answer' is in the live rollout {single.id}"):
        await controller.start_pipeline_rollout("geo", {"extract": "v2"})
    with pytest.raises(Conflict, match="which 'extract' depends on or which depends on it"):
        await controller.start_rollout("extract", "v2")
    await controller.start_rollout("solo", "v2")  # unrelated: runs alongside


@pytest.mark.parametrize(
    ("event", "outcome"),
    [(machine.Promote(), "promoted"), (machine.Rollback(), "rolled_back")],
)
async def test_promotion_and_rollback_change_every_changed_step_at_once(
    parts: Any, event: machine.Event, outcome: str
) -> None:
    """Promote makes every candidate active (the unchanged step keeps its version);
    rollback leaves every step on its old version and marks each candidate."""
    db, registry, pipelines = parts
    controller = _controller(db, registry, pipelines)
    before = await _active(registry)
    row = await controller.start_pipeline_rollout("geo", {"extract": "v2", "polish": "v2"})
    ended = await controller.command(row.id, event)
    assert ended.status == outcome
    after = await _active(registry)
    if outcome == "promoted":
        assert after == {**before, "extract": "v2", "polish": "v2"}
    else:
        assert after == before
        for prompt in ("extract", "polish"):
            assert (await registry.get_version(prompt, "v2")).status == "rolled_back"
    assert controller.live_prompts() == set()
    routing = await controller.routing("answer")
    assert (routing.weight, routing.rollout_id, routing.candidate_version) == (0.0, None, None)


async def test_a_crash_inside_the_promotion_leaves_all_or_nothing(
    parts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The promotion of two steps fails on the second one: neither step changed, the
    rollout is still live, and after a restart the promotion moves both."""
    db, registry, pipelines = parts
    controller = _controller(db, registry, pipelines)
    before = await _active(registry)
    row = await controller.start_pipeline_rollout("geo", {"extract": "v2", "polish": "v2"})
    real = rollout_storage._apply_outcome
    seen: list[str] = []

    async def crash_on_second(conn: Any, outcome: str, change: Any, now: float) -> None:
        seen.append(change.prompt)
        if len(seen) == 2:
            raise RuntimeError("power cut")
        await real(conn, outcome, change, now)

    monkeypatch.setattr(rollout_storage, "_apply_outcome", crash_on_second)
    with pytest.raises(RuntimeError, match="power cut"):
        await controller.command(row.id, machine.Promote())
    assert seen == ["extract", "polish"]
    assert await _active(registry) == before
    stored = await controller.store.get(row.id)
    assert stored is not None
    assert stored.status == "running"
    monkeypatch.setattr(rollout_storage, "_apply_outcome", real)

    restarted = _controller(db, registry, pipelines)
    await restarted.resume()
    assert restarted.live_prompts() == {"extract", "answer", "polish"}
    await restarted.command(row.id, machine.Promote())
    assert await _active(registry) == {**before, "extract": "v2", "polish": "v2"}
