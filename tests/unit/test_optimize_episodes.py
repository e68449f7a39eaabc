"""Episodes for the optimizer: the example store credits episode feedback to each call,
and the EpisodeStore builds a pipeline's episodes (on a real SQLite file)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from promptd.events import FeedbackEvent, MetricEvent
from promptd.optimization.episodes import EpisodeStore
from promptd.optimization.examples import ExampleStore
from promptd.replacement.pipelines import Pipeline, Step
from promptd.storage.database import Database
from promptd.storage.repository import EventRepository

PIPELINE = Pipeline(
    "qa",
    (
        Step("extract", {"text": "input.document"}),
        Step("answer", {"facts": "extract.output", "question": "input.question"}),
    ),
)


@pytest.fixture
async def db(store_target: Path | str) -> AsyncIterator[Database]:
    """A migrated database on a real file, closed afterwards."""
    database = await Database.open(store_target)
    yield database
    await database.close()


class Events:
    """Builds and stores events with fresh ids and times just before now."""

    def __init__(self, db: Database) -> None:
        self.repo = EventRepository(db)
        self.n = 0
        self.t = time.time() - 600

    def _next(self) -> tuple[str, float]:
        self.n += 1
        self.t += 1.0
        return f"e{self.n}", self.t

    def call(self, prompt: str, rid: str, episode: str | None, args: Any, out: Any) -> MetricEvent:
        eid, ts = self._next()
        body = {"event_id": eid, "ts": ts, "prompt": prompt, "variant": "v1", "model": "m"}
        body |= {"request_id": rid, "latency_ms": 5.0, "success": True, "input": args}
        body |= {"output": out, "episode_id": episode}
        return MetricEvent.model_validate(body)

    def score(self, score: float, **target: Any) -> FeedbackEvent:
        eid, ts = self._next()
        return FeedbackEvent.model_validate({"event_id": eid, "ts": ts, "score": score, **target})

    async def store(self, *events: MetricEvent | FeedbackEvent) -> None:
        metrics = [e for e in events if isinstance(e, MetricEvent)]
        feedback = [e for e in events if isinstance(e, FeedbackEvent)]
        await self.repo.store_batch(metrics, feedback, {})


async def test_an_examples_feedback_is_its_own_plus_its_episodes(db: Database) -> None:
    """A captured call gets its own feedback and its episode's (score, count, comments);
    the correction stays its own; a retried call does not count episode feedback twice;
    a call of another prompt in the episode gets nothing in this prompt's examples."""
    ev = Events(db)
    await ev.store(
        ev.call("extract", "r1", "ep1", {"text": "doc"}, "facts"),
        ev.call("extract", "r1", "ep1", {"text": "doc"}, "facts again"),  # a retry
        ev.call("answer", "r2", "ep1", {"facts": "f", "question": "q"}, "42"),
        ev.call("extract", "r3", None, {"text": "other"}, "x"),
    )
    await ev.store(
        ev.score(1.0, request_id="r1", prompt="extract", variant="v1", correction="fixed"),
        ev.score(0.0, episode_id="ep1", comment="wrong answer", correction="43"),
        ev.score(0.5, request_id="r3", prompt="extract", variant="v1"),
    )
    store = ExampleStore(db, max_age_s=86_400, limit=100)
    snap = await store.snapshot(time.time())
    examples = {e.request_id: e for e in await store.examples("extract", snap)}
    assert set(examples) == {"r1", "r3"}
    r1 = examples["r1"]
    assert (r1.score, r1.n_feedback, r1.comments, r1.correction) == (
        0.5,
        2,
        "wrong answer",
        "fixed",
    )
    assert r1.output == "facts again"  # the latest captured call
    assert (examples["r3"].score, examples["r3"].n_feedback) == (0.5, 1)
    (answer,) = await store.examples("answer", snap)
    assert (answer.request_id, answer.score, answer.n_feedback) == ("r2", 0.0, 1)
    assert answer.correction is None  # the episode's correction is of its final answer


async def test_episodes_of_a_pipeline(db: Database) -> None:
    """An episode with feedback and a captured call of every step becomes an Episode:
    inputs from the bindings' placeholders, each step's latest call, the mean feedback,
    the latest correction, the last step's output; others are left out."""
    ev = Events(db)
    await ev.store(
        ev.call("extract", "a1", "ok", {"text": "the doc"}, "facts-a"),
        ev.call("answer", "a2", "ok", {"facts": "facts-a", "question": "why?"}, "draft"),
        ev.call("answer", "a3", "ok", {"facts": "facts-a", "question": "why?"}, "because"),
        ev.call("extract", "b1", "no-answer", {"text": "t"}, "f"),
        ev.call("extract", "c1", "no-feedback", {"text": "t"}, "f"),
        ev.call("answer", "c2", "no-feedback", {"facts": "f", "question": "q"}, "a"),
    )
    await ev.store(
        ev.score(1.0, episode_id="ok", comment="good", correction="old"),
        ev.score(0.5, episode_id="ok", correction={"answer": "because!"}),
        ev.score(1.0, episode_id="no-answer"),
        ev.score(0.0, request_id="c2", prompt="answer", variant="v1"),
    )
    store = EpisodeStore(db, max_age_s=86_400, limit=100)
    (episode,) = await store.episodes(PIPELINE, await store.snapshot(time.time()))
    assert episode.episode_id == "ok"
    assert episode.inputs == {"document": "the doc", "question": "why?"}
    assert set(episode.calls) == {"extract", "answer"}
    assert episode.calls["answer"].request_id == "a3"
    assert episode.calls["extract"].output == "facts-a"
    assert (episode.score, episode.comments) == (0.75, "good")
    assert episode.correction == '{"answer": "because!"}'
    assert episode.final_output == "because"
    assert episode.reference(0.9) == episode.correction
    example = episode.as_example("extract")
    assert (example.score, example.comments, example.request_id) == (0.75, "good", "a1")


async def test_episodes_read_within_their_snapshot(db: Database) -> None:
    """Feedback and calls stored after the snapshot do not change what a run reads, and
    the newest episodes come first up to the limit."""
    ev = Events(db)
    for i in range(5):
        await ev.store(
            ev.call("extract", f"x{i}", f"ep{i}", {"text": str(i)}, f"f{i}"),
            ev.call("answer", f"y{i}", f"ep{i}", {"facts": "f", "question": str(i)}, f"a{i}"),
            ev.score(i / 10, episode_id=f"ep{i}"),
        )
    store = EpisodeStore(db, max_age_s=86_400, limit=3)
    snap = await store.snapshot(time.time())
    first = await store.episodes(PIPELINE, snap)
    await ev.store(
        ev.score(1.0, episode_id="ep4"),
        ev.call("answer", "late", "ep3", {"facts": "f", "question": "3"}, "late"),
        ev.call("extract", "x9", "ep9", {"text": "9"}, "f"),
        ev.call("answer", "y9", "ep9", {"facts": "f", "question": "9"}, "a"),
        ev.score(1.0, episode_id="ep9"),
    )
    again = await store.episodes(PIPELINE, snap)
    assert [e.episode_id for e in first] == ["ep4", "ep3", "ep2"]
    assert again == first
    assert first[0].score == pytest.approx(0.4)
    newer = await store.episodes(PIPELINE, await store.snapshot(time.time()))
    assert [e.episode_id for e in newer] == ["ep9", "ep4", "ep3"]
    assert newer[1].score == pytest.approx(0.7)
    assert newer[2].calls["answer"].request_id == "late"
