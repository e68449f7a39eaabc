"""Aggregates of a coordinated (pipeline) rollout: one A/B test over several prompts.

A pipeline rollout has two arms: the **pipeline variant** (every changed step's candidate)
and the **active pipeline**. Every member prompt's routing carries the rollout's salt and
weight, so a unit (or, without one, an episode) is in the candidate arm for all prompts
together. What is counted, pure and incremental like :mod:`.observations`:

* **Arms.** A unit is in the arm the routing rule puts it in, ``bucket(salt, unit) <
  weight × 10000`` at the weight of the call's step. A call of an unchanged step (the
  same version in both arms) counts in that arm. A call of a changed step counts when its
  version is the one of that arm; a call served the other version (an SDK still on stale
  routing, a pinned version) is left out, and so is the feedback on its episode, which
  mixed both pipelines (remembered for the join window; feedback already counted when
  the call is stored later is taken back). Right after a step starts
  (``srm_settle_s``, while SDKs may still route some prompts with the previous weight), a
  unit whose bucket lies between the previous and the new threshold could be in either
  arm: its calls, of every step, are left out until then.
* **Guardrails** (latency, errors, cost) count every member call with an arm.
* **The primary metric**, for ``feedback_score``, is the feedback on whole episodes (see
  ``promptd.episode()``), counted **once per episode**: in the step and arm of the
  episode's first call with an arm, under the usual join window. Feedback on single calls
  is not the pipeline's and is not counted. ``success_rate`` and ``quality`` count per
  call, as in a single prompt's rollout.
* Units, clusters and the sample-ratio check are those of :mod:`.observations`; the unit
  of a call without a unit id is its episode, so an episode is one cluster.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from promptd.replacement.observations import (
    PENDING_WINDOW_S,
    Arm,
    RolloutAccumulator,
    _Call,
    _EpisodeFeedback,
)
from promptd.replacement.pipelines import Pipeline
from promptd.replacement.registry import Conflict, Registry, RegistryError
from promptd.routing import bucket, threshold
from promptd.storage.rollouts import Member


@dataclass(slots=True)
class PipelineAccumulator(RolloutAccumulator):
    """A :class:`RolloutAccumulator` over the calls of several prompts (see module doc).

    ``baseline_version`` and ``candidate_version`` are the first changed step's (they name
    the rollout); ``members`` maps every member prompt to its ``(active, candidate)``
    versions, the candidate ``None`` for an unchanged step; ``weights`` are the candidate
    shares of the profile's steps.
    """

    members: Mapping[str, tuple[str, str | None]] = field(default_factory=dict)
    salt: str = ""
    weights: Sequence[float] = ()
    # Episodes with a call served against its routing, by when that call was stored.
    _mixed: dict[str, float] = field(default_factory=dict)
    _mixed_order: deque[tuple[float, str]] = field(default_factory=deque)

    def served(self) -> dict[str, tuple[str, ...]]:
        """The versions each member prompt serves in the rollout (what a replay reads)."""
        return {
            prompt: (base,) if cand is None else (base, cand)
            for prompt, (base, cand) in self.members.items()
        }

    def _arm(
        self,
        variant: str,
        prompt: str | None,
        unit: str,
        ts: float,
        step: int,
        episode: str | None,
        stored: float,
    ) -> Arm | None:
        member = self.members.get(prompt or "")
        if member is None:
            return None
        baseline, candidate = member
        if variant not in (baseline, candidate):
            return None
        routed = self.routed(unit, ts, step)
        if routed is None:
            return None  # settling: the unit may be in either arm (see module doc)
        if candidate is None:
            return routed  # the same version in both arms
        served: Arm = "candidate" if variant == candidate else "baseline"
        if served != routed:
            # Served from stale routing (or a pinned version): the call is not in the
            # experiment, and its episode mixes the arms.
            if episode is not None:
                if episode not in self._mixed:
                    self._retract(episode)
                self._mixed[episode] = stored
                self._mixed_order.append((stored, episode))
            return None
        return served

    def _serves(self, variant: str, prompt: str | None) -> bool:
        member = self.members.get(prompt or "")
        return member is not None and variant in member

    def routed(self, unit: str, ts: float, step: int) -> Arm | None:
        """The arm routing puts ``unit`` in at ``ts`` in ``step``; None while the step
        settles and the unit's bucket lies between the previous and the new threshold."""
        if not self.weights:
            return None
        last = len(self.weights) - 1
        position = bucket(self.salt, unit)
        now = threshold(self.weights[min(step, last)])
        if ts >= self.step_starts[step] + self.srm_settle_s:
            return "candidate" if position < now else "baseline"
        before = threshold(self.weights[min(step - 1, last)]) if step > 0 else 0
        low, high = min(before, now), max(before, now)
        if position < low:
            return "candidate"
        return "baseline" if position >= high else None

    def _joins_episode(self, episode: str) -> bool:
        # The episode's first call with an arm stands for the episode.
        return episode not in self._episodes

    def _retract(self, episode: str) -> None:
        """Take back the feedback already counted for ``episode``: a call that mixed the
        arms can be stored after its episode's feedback (the two topics are read
        independently), and the episode then judges neither arm after all."""
        for request_id in self._episodes.get(episode, ()):
            call = self._calls[request_id]
            for entry in self._episode_fb.get(episode, ()):
                if self._joinable(call, entry.at):  # as _join_episode counted it
                    self._remove_feedback_score(call, entry.score)

    def _join_episode(self, call: _Call, entry: _EpisodeFeedback) -> None:
        if entry.episode in self._mixed:
            return  # an episode that mixed the arms judges neither
        RolloutAccumulator._join_episode(self, call, entry)

    def _evict(self, now: float) -> None:
        RolloutAccumulator._evict(self, now)
        # Kept while feedback may still join a call of the episode.
        horizon = now - self.feedback_max_delay_s - PENDING_WINDOW_S
        order = self._mixed_order
        while order and order[0][0] < horizon:
            at, episode = order.popleft()
            if self._mixed.get(episode) == at:
                del self._mixed[episode]

    def add_feedback(
        self,
        request_id: str | None,
        score: float,
        ingested_at: float,
        episode_id: str | None = None,
        ts: float | None = None,
        source: str | None = None,
    ) -> None:
        """Feedback on a whole episode counts (once, see module doc); on a call, not."""
        RolloutAccumulator.add_feedback(
            self, None, score, ingested_at, episode_id if request_id is None else None, ts, source
        )

    def state(self) -> dict[str, Any]:
        """The single rollout's state plus the episodes that mixed the arms."""
        return RolloutAccumulator.state(self) | {"mixed": [list(e) for e in self._mixed_order]}

    def _load_state(self, state: dict[str, Any]) -> None:
        RolloutAccumulator._load_state(self, state)
        self._mixed_order = deque((at, episode) for at, episode in state.get("mixed", ()))
        self._mixed = {episode: at for at, episode in self._mixed_order}

    def config(self) -> dict[str, Any]:
        """The single rollout's configuration plus the members, salt and step weights."""
        return RolloutAccumulator.config(self) | {
            "members": {p: list(v) for p, v in sorted(self.members.items())},
            "salt": self.salt,
            "weights": list(self.weights),
        }


@dataclass(frozen=True, slots=True)
class LiveRollout:
    """A live rollout as the exclusion rules see it: its id and pipeline (None: one
    prompt's)."""

    id: str
    pipeline: str | None = None

    def __str__(self) -> str:
        of = f" of pipeline {self.pipeline!r}" if self.pipeline else ""
        return f"{self.id}{of}"


def exclusion(
    prompts: Sequence[str],
    related: Mapping[str, Set[str]],
    live: Mapping[str, LiveRollout],
) -> str | None:
    """Why a rollout of ``prompts`` may not start now, or None when it may.

    ``related`` maps each prompt to the prompts it depends on or that depend on it
    (:meth:`.pipelines.PipelineRegistry.related`); ``live`` maps every prompt whose
    routing a live rollout sets to that rollout. Refused: a prompt that is already in a
    live rollout (a single prompt's, or its pipeline's); and a prompt whose upstream or
    downstream prompt is, since the two effects would confound each other in both
    tests (the downstream prompt's inputs change with the upstream one's variant).
    """
    for prompt in prompts:
        other = live.get(prompt)
        if other is not None:
            return f"prompt {prompt!r} is in the live rollout {other}; finish it first"
    for prompt in prompts:
        for near in sorted(related.get(prompt, ())):
            other = live.get(near)
            if other is not None and near not in prompts:
                return (
                    f"prompt {near!r}, which {prompt!r} depends on or which depends on it, "
                    f"is in the live rollout {other}: their effects would confound each "
                    "other; finish it first"
                )
    return None


class InvalidCandidates(RegistryError):
    """A pipeline rollout's candidates do not fit the pipeline."""

    status = 422


async def plan_members(
    registry: Registry, pipeline: Pipeline, candidates: Mapping[str, str]
) -> tuple[Member, ...]:
    """Every step of ``pipeline`` as a rollout member: its active version and its candidate
    from ``candidates`` (prompt -> version; the steps that change).

    Refused: no candidate, a prompt that is not a step (422); an unknown version (404); a
    step without an active version, or a candidate that is already the active one (409).
    """
    if not candidates:
        raise InvalidCandidates(f"name at least one step of {pipeline.name!r} and its candidate")
    unknown = sorted(set(candidates) - set(pipeline.prompts))
    if unknown:
        raise InvalidCandidates(
            f"{unknown[0]!r} is not a step of pipeline {pipeline.name!r} "
            f"(steps: {', '.join(pipeline.prompts)})"
        )
    members = []
    for prompt in pipeline.prompts:
        info = await registry.get_prompt(prompt)
        if info.active_version is None:
            raise Conflict(f"step {prompt!r} has no active version to compare against")
        candidate = candidates.get(prompt)
        if candidate is not None:
            version = await registry.get_version(prompt, candidate)
            if version.version == info.active_version:
                raise Conflict(f"{candidate!r} is already the active version of {prompt!r}")
        members.append(Member(prompt=prompt, baseline=info.active_version, candidate=candidate))
    return tuple(members)
