"""Episodes end to end: an app instrumented with the SDK calls two prompts inside
``promptd.episode()`` and gives feedback on the episode; through the real broker the daemon
stores the episode ids, the monitor credits both prompts and the example store gives both
calls the episode's score."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

import promptd
from promptd.daemon.settings import Settings
from promptd.optimization.examples import ExampleStore
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


async def test_episode_feedback_reaches_every_call_of_the_episode(
    make_settings: Callable[..., Settings],
    start_daemon: Callable[..., Any],
    sdk_for: Callable[[Settings], promptd.sdk.Client],
) -> None:
    """Two prompts called in one episode, feedback on the episode: both calls are stored
    with the episode id, the monitor counts the score for both prompts, and each prompt's
    examples carry the episode's score."""
    settings = make_settings()
    daemon = await start_daemon(settings)
    sdk_for(settings)

    @promptd.instrument(prompt="extract", model="m", version="e1", capture=True)
    async def extract(document: str) -> str:
        return f"facts of {document}"

    @promptd.instrument(prompt="answer", model="m", version="a1", capture=True)
    async def answer(facts: str, question: str) -> str:
        return f"{question} -> {facts}"

    scores = {}
    for i in range(6):
        async with promptd.episode() as ep:
            facts = await extract(f"doc {i}")
            await answer(facts, f"q{i}")
        scores[ep.id] = i / 5
        await promptd.afeedback(episode_id=ep.id, score=i / 5, comment=f"c{i}")
    assert await promptd.aflush(10)
    repo = daemon.daemon.repo

    async def stored() -> bool:
        return bool(await repo.count_events() == (12, 6))

    await wait_for(stored, timeout=20)
    async with repo.db.reader.execute(
        "SELECT prompt, variant, episode_id FROM metric_events ORDER BY id"
    ) as cur:
        calls = [tuple(r) for r in await cur.fetchall()]
    episodes = list(scores)
    assert sorted(calls) == sorted(
        [("extract", "e1", e) for e in episodes] + [("answer", "a1", e) for e in episodes]
    )
    async with repo.db.reader.execute(
        "SELECT request_id, prompt, episode_id, score FROM feedback_events ORDER BY id"
    ) as cur:
        feedback = [tuple(r) for r in await cur.fetchall()]
    assert sorted(feedback) == sorted((None, None, e, s) for e, s in scores.items())

    monitor = daemon.daemon.components["monitor"]
    mean = sum(scores.values()) / len(scores)

    def credited() -> bool:
        stats = [monitor.prompt_stats(p, 3600.0)["variants"] for p in ("extract", "answer")]
        return all(
            v.get(version, {}).get("feedback_count") == 6
            for v, version in zip(stats, ("e1", "a1"), strict=True)
        )

    await wait_for(credited, timeout=10)
    for prompt, version in (("extract", "e1"), ("answer", "a1")):
        fb_mean = monitor.prompt_stats(prompt, 3600.0)["variants"][version]["feedback_mean"]
        assert fb_mean == pytest.approx(mean)

    store = ExampleStore(daemon.daemon.db, max_age_s=3600, limit=100)
    snap = await store.snapshot(time.time())
    for prompt in ("extract", "answer"):
        examples = await store.examples(prompt, snap)
        assert len(examples) == 6
        async with repo.db.reader.execute(
            "SELECT request_id, episode_id FROM metric_events WHERE prompt = ?", (prompt,)
        ) as cur:
            episode_of = {str(r): str(e) for r, e in await cur.fetchall()}
        for example in examples:
            episode = episode_of[example.request_id]
            assert example.score == pytest.approx(scores[episode])
            assert example.comments == f"c{episodes.index(episode)}"
