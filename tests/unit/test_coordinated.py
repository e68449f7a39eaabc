"""A pipeline rollout's aggregates and exclusion rules (pure): arms of changed and
unchanged steps, the settle window, episode feedback counted once per episode, and which
rollouts may not run together."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from promptd.replacement.clustered import ClusteredSample
from promptd.replacement.coordinated import LiveRollout, PipelineAccumulator, exclusion
from promptd.replacement.machine import RolloutState
from promptd.replacement.observations import PENDING_WINDOW_S, RolloutAccumulator
from promptd.replacement.replay import replay
from promptd.routing import in_candidate
from promptd.storage.database import Database
from promptd.storage.repository import BatchOutcome, EventRepository
from promptd.storage.rows import FeedbackRow, MetricRow

SALT = "pipeline-salt"
WEIGHTS = (0.1, 0.5, 1.0)
MEMBERS = {"extract": ("e1", "e2"), "answer": ("a1", None)}


def accumulator(**over: Any) -> PipelineAccumulator:
    """extract changes e1 -> e2, answer keeps a1; steps at 10 %, 50 %, 100 %."""
    config: dict[str, Any] = {
        "baseline_version": "e1",
        "candidate_version": "e2",
        "primary_metric": "feedback_score",
        "step_starts": [0.0],
        "srm_settle_s": 10.0,
        "members": MEMBERS,
        "salt": SALT,
        "weights": WEIGHTS,
    }
    config.update(over)
    return PipelineAccumulator(**config)


def _state(step: int = 0) -> RolloutState:
    return RolloutState("r", "extract", "e1", "e2", SALT, "balanced", step_index=step)


def _requests(acc: RolloutAccumulator) -> tuple[int, int]:
    arms = acc.arm_summary()
    return int(arms["baseline"]["requests"] or 0), int(arms["candidate"]["requests"] or 0)


def _primary(acc: RolloutAccumulator) -> tuple[tuple[int, float], tuple[int, float]]:
    """(n, total) of the primary metric in the baseline and candidate arm, all steps."""
    sample = acc.observation(_state()).primary
    assert isinstance(sample, ClusteredSample)
    base = sum(b.n for b, _ in sample.moments), sum(b.total for b, _ in sample.moments)
    cand = sum(c.n for _, c in sample.moments), sum(c.total for _, c in sample.moments)
    return base, cand


def test_an_unchanged_step_is_in_the_arm_its_unit_is_routed_to() -> None:
    """Calls of the unchanged step serve the same version in both arms; each counts in
    the arm the routing rule puts its unit in at the step's weight."""
    acc = accumulator()
    units = [f"u{i}" for i in range(2000)]
    for i, unit in enumerate(units):
        acc.add_metric(20.0, "a1", unit, 5.0, True, None, None, f"r{i}", 20.0, None, "answer")
    expected = sum(in_candidate(SALT, u, WEIGHTS[0]) for u in units)
    assert 100 < expected < 300  # about 10 % of 2000
    assert _requests(acc) == (len(units) - expected, expected)


def _unit(arm: str, tag: str, weight: float = WEIGHTS[0]) -> str:
    """A unit the routing rule puts in ``arm`` at ``weight``."""
    units = (f"{tag}-{k}" for k in range(10_000))
    return next(u for u in units if in_candidate(SALT, u, weight) == (arm == "candidate"))


def test_a_changed_step_is_in_the_arm_of_its_variant_and_others_are_ignored() -> None:
    """extract's calls count in the arm of their version (which routing also chose);
    other versions, prompts and calls before the rollout are not the rollout's."""
    acc = accumulator()
    calls = [
        ("extract", "e2", 20.0, "candidate"),
        ("extract", "e1", 21.0, "baseline"),
        ("extract", "e1", 22.0, "baseline"),
        ("extract", "e9", 23.0, "baseline"),
        ("other", "e1", 24.0, "baseline"),
        ("answer", "a9", 25.0, "baseline"),
        ("extract", "e2", -5.0, "candidate"),
    ]
    for i, (prompt, variant, ts, arm) in enumerate(calls):
        unit = _unit(arm, f"u{i}")
        acc.add_metric(ts, variant, unit, 5.0, True, None, None, f"r{i}", ts, None, prompt)
    assert _requests(acc) == (2, 1)


def test_a_call_served_against_its_routing_leaves_its_episode_out() -> None:
    """An SDK still on stale routing serves a unit of the candidate arm the old version of
    one step: that call is left out, and its episode, which mixed both pipelines, is
    judged in neither arm; a consistent episode of the same unit counts."""
    acc = accumulator()
    unit = _unit("candidate", "stale")
    _episode(acc, "mixed", "e1", 20.0, unit)  # extract from stale routing, answer routed
    acc.add_feedback(None, 0.0, 30.0, "mixed")
    _episode(acc, "whole", "e2", 40.0, unit)
    acc.add_feedback(None, 1.0, 50.0, "whole")
    assert _primary(acc) == ((0, 0.0), (1, 1.0))
    assert _requests(acc) == (0, 3)  # the mixed episode's answer call still counts
    assert acc.state()["mixed"] == [[20.0, "mixed"]]
    later = accumulator()
    later.load_state(acc.state())
    assert later.state() == acc.state()
    # Kept while feedback could still join a call of the episode, then forgotten.
    acc.add_feedback(None, 0.5, 20.0 + acc.feedback_max_delay_s + PENDING_WINDOW_S + 1, "x")
    assert acc.state()["mixed"] == []


def test_a_stale_call_stored_after_its_episodes_feedback_takes_the_feedback_back() -> None:
    """The topics are read independently: an episode's feedback can be counted before
    the call that mixed the arms is stored. Once it is, the episode judges neither arm,
    as if the call had come first; a consistent episode's feedback stays."""
    acc = accumulator()
    unit = _unit("candidate", "late")
    acc.add_metric(20.0, "a1", unit, 5.0, True, None, None, "m-2", 20.0, "mixed", "answer")
    acc.add_feedback(None, 0.25, 21.0, "mixed")
    acc.add_feedback(None, 0.75, 22.0, "mixed")
    _episode(acc, "whole", "e2", 23.0, unit)
    acc.add_feedback(None, 1.0, 24.0, "whole")
    assert _primary(acc) == ((0, 0.0), (3, 2.0))
    acc.add_metric(20.0, "e1", unit, 5.0, True, None, None, "m-1", 25.0, "mixed", "extract")
    assert _primary(acc) == ((0, 0.0), (1, 1.0))
    acc.add_metric(20.0, "e1", unit, 5.0, True, None, None, "m-3", 26.0, "mixed", "extract")
    assert _primary(acc) == ((0, 0.0), (1, 1.0))  # taken back once
    first = accumulator()
    _episode(first, "mixed", "e1", 20.0, unit)
    first.add_feedback(None, 0.25, 21.0, "mixed")
    _episode(first, "whole", "e2", 23.0, unit)
    first.add_feedback(None, 1.0, 24.0, "whole")
    sample, same = acc.observation(_state()).primary, first.observation(_state()).primary
    assert isinstance(sample, ClusteredSample)
    assert isinstance(same, ClusteredSample)
    for name in ("yy", "ym", "mm"):
        assert getattr(sample, name) == pytest.approx(getattr(same, name))
    assert sample.clusters == same.clusters


def test_after_a_step_starts_units_between_the_two_thresholds_wait_for_it_to_settle() -> None:
    """Right after 10 % -> 50 %, a unit whose bucket lies between the thresholds may still
    be routed with either weight: its calls (of every step) are left out until the step
    has settled; units below 10 % are candidates and above 50 % baselines throughout."""
    acc = accumulator()
    acc.start_step(1, 100.0)
    units = [f"u{i}" for i in range(1000)]
    low = [u for u in units if in_candidate(SALT, u, WEIGHTS[0])]
    high = [u for u in units if not in_candidate(SALT, u, WEIGHTS[1])]
    for i, unit in enumerate(units):
        acc.add_metric(105.0, "a1", unit, 5.0, True, None, None, f"s{i}", 105.0, None, "answer")
    assert _requests(acc) == (len(high), len(low))
    for i, unit in enumerate(units):
        acc.add_metric(111.0, "a1", unit, 5.0, True, None, None, f"t{i}", 111.0, None, "answer")
    mid = sum(in_candidate(SALT, u, WEIGHTS[1]) for u in units)
    assert _requests(acc) == (len(high) + len(units) - mid, len(low) + mid)
    # A candidate-variant call of the changed step in the band is left out as well.
    band = next(u for u in units if u not in low and u not in high)
    acc.add_metric(106.0, "e2", band, 5.0, True, None, None, "band", 106.0, None, "extract")
    assert _requests(acc) == (len(high) + len(units) - mid, len(low) + mid)


def _episode(
    acc: RolloutAccumulator, episode: str, extract: str, at: float, unit: str | None = None
) -> None:
    """One run of the pipeline, routed by ``unit`` (else its episode): extract, answer."""
    key = unit or episode
    acc.add_metric(at, extract, key, 5.0, True, None, None, f"{episode}-1", at, episode, "extract")
    acc.add_metric(at, "a1", key, 5.0, True, None, None, f"{episode}-2", at, episode, "answer")


def test_episode_feedback_counts_once_per_episode_and_call_feedback_not_at_all() -> None:
    """A pipeline is judged by its episodes: feedback on an episode of two calls counts
    once, in the episode's arm; feedback on one call is not the pipeline's (a single
    prompt's rollout counts both on its call)."""
    pipeline = accumulator(weights=(1.0,))  # everyone in the candidate arm
    single = RolloutAccumulator("e1", "e2", "feedback_score", step_starts=[0.0])
    for acc in (pipeline, single):
        _episode(acc, "ep1", "e2", 20.0)
        acc.add_feedback(None, 0.75, 30.0, "ep1")
        acc.add_feedback("ep1-1", 0.1, 31.0)
    assert _primary(pipeline) == ((0, 0.0), (1, 0.75))
    assert pipeline.feedback.joined == 1
    assert _primary(single) == ((0, 0.0), (2, 0.85))  # the extract call: 0.75 and 0.1


def test_episode_feedback_before_its_calls_still_counts_once() -> None:
    """Episode feedback read before the episode's calls (topics out of order) joins the
    first call that comes, once."""
    acc = accumulator(weights=(0.0,))  # everyone in the baseline arm
    acc.add_feedback(None, 0.5, 10.0, "ep")
    _episode(acc, "ep", "e1", 20.0)
    assert _primary(acc) == ((1, 0.5), (0, 0.0))


def test_exclusion_refuses_overlapping_and_related_rollouts() -> None:
    """A prompt in a live rollout (its own or its pipeline's) blocks a new one; so does a
    live rollout of a prompt it depends on or that depends on it; unrelated ones run."""
    related = {"extract": {"answer"}, "answer": {"extract"}, "solo": set()}
    pipeline_live = {"extract": LiveRollout("ro-1", "geo"), "answer": LiveRollout("ro-1", "geo")}
    why = exclusion(["answer"], related, pipeline_live)
    assert why == "prompt 'answer' is in the live rollout ro-1 of pipeline 'geo'; finish it first"
    assert exclusion(["solo"], related, pipeline_live) is None
    single_live = {"extract": LiveRollout("ro-2")}
    why = exclusion(["answer"], related, single_live)
    assert why is not None
    assert why.startswith("prompt 'extract', which 'answer' depends on or which depends on it")
    assert "ro-2" in why
    assert exclusion(["extract", "answer"], related, single_live) == (
        "prompt 'extract' is in the live rollout ro-2; finish it first"
    )
    assert exclusion(["extract", "answer"], related, {}) is None
    assert exclusion(["answer"], {}, {"extract": LiveRollout("ro-3")}) is None


# -- replay ---------------------------------------------------------------------------

T0 = time.time() - 3600


def _stream(seed: int, n: int) -> list[tuple[list[MetricRow], list[FeedbackRow]]]:
    """Batches of pipeline episodes (some with a unit; a few served against their
    routing), stray calls of other versions and prompts, feedback on episodes and on
    calls."""
    rng = random.Random(seed)
    out = []
    for b in range(n):
        metrics: list[MetricRow] = []
        feedback: list[FeedbackRow] = []
        for i in range(20):
            episode = f"ep{b}-{i}"
            unit = f"u{rng.randrange(40)}" if i % 3 == 0 else None
            ts = T0 + b * 10 + i * 0.1
            # Routed at 50 %, but now and then from stale routing or another version.
            routed = "e2" if in_candidate(SALT, unit or episode, 0.5) else "e1"
            extract = rng.choice([routed] * 6 + ["e1", "e2", "e3"])
            for k, (prompt, variant) in enumerate(
                [("extract", extract), ("answer", rng.choice(["a1", "a1", "a2"])), ("x", "e1")]
            ):
                rid = f"{episode}-{k}"
                row: MetricRow = (f"m{rid}", ts, prompt, variant, "m", rid, unit, 5.0, True)
                row += (None, None, None, None, None, None, episode, None, None, None, None)
                metrics.append(row)
            if rng.random() < 0.6:
                fb: FeedbackRow = (f"f{episode}", ts, None, None, None, None)
                feedback.append((*fb, rng.random(), "q", None, None, episode, None))
            if rng.random() < 0.3:
                call: FeedbackRow = (f"c{episode}", ts, "extract", extract, None, f"{episode}-0")
                feedback.append((*call, rng.random(), "q", None, None, None, None))
        out.append((metrics, feedback))
    return out


def _feed(acc: RolloutAccumulator, outcome: BatchOutcome) -> None:
    """What the controller's batch listener does with one stored batch."""
    for m in outcome.metrics:
        unit = m.unit_id or m.episode_id or m.request_id
        args = (m.latency_ms, m.success, m.quality, m.cost_usd, m.request_id)
        acc.add_metric(m.ts, m.variant, unit, *args, outcome.ingested_at, m.episode_id, m.prompt)
    for f in outcome.feedback:
        acc.add_feedback(f.request_id, f.score, outcome.ingested_at, f.episode_id)


@pytest.fixture
async def db(store_target: Path | str) -> AsyncIterator[Database]:
    """A real SQLite file."""
    database = await Database.open(store_target)
    yield database
    await database.close()


async def test_a_replay_rebuilds_what_the_live_feed_built(db: Database) -> None:
    """After a restart the replay of the stored events (every member prompt, its served
    versions only) rebuilds exactly the live aggregates: cells, joins, episodes."""
    repo = EventRepository(db)
    live = accumulator(step_starts=[T0], srm_settle_s=5.0, weights=(0.5,))
    for metrics, feedback in _stream(3, 12):
        _feed(live, await repo.store_batch(metrics, feedback, {}))
    resumed = accumulator(step_starts=[T0], srm_settle_s=5.0, weights=(0.5,))
    calls, _ = await replay(db, resumed, resumed.served(), T0)
    assert calls == sum(1 for m, _ in _stream(3, 12) for row in m if (row[2], row[3]) in _SERVED)
    assert resumed.state() == live.state()
    base, cand = _primary(live)
    assert base[0] > 10
    assert cand[0] > 10
    assert live.state()["mixed"]


_SERVED = {("extract", "e1"), ("extract", "e2"), ("answer", "a1")}
