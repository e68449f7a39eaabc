"""Episodes as the optimizer reads them: the calls of one pipeline run with its feedback.

An episode is the set of calls that share an ``episode_id`` (see ``promptd.episode()``).
:class:`EpisodeStore` is the daemon's
:class:`~promptd.optimization.targets.EpisodeSource`: it turns the event tables into
:class:`~promptd.optimization.pipeline.Episode` examples for a pipeline, within a run's
:class:`~promptd.optimization.examples.Snapshot`, so a resumed run reads exactly the
same episodes.

An episode counts for a pipeline when it has feedback on the whole episode (an
``episode_id`` without a ``request_id``) and a captured call (``capture=True``) of every
step's prompt. Then:

* ``score`` is the mean of the episode's feedback, ``comments`` its comments, and
  ``correction`` the latest correction given on the episode (the expected final answer);
* ``calls`` holds each step's latest captured call as an
  :class:`~promptd.optimization.examples.Example` carrying the episode's score (its own
  call feedback is not mixed in: the pipeline is judged by its final answer);
* ``inputs`` are the values of the bindings that read ``input.<name>``, taken from the
  captured input of the step that binds them (the first step that does, in order): the
  placeholder's value in that call's arguments;
* ``final_output`` is the last step's captured output.

Like the example store, nothing is copied: retention of raw events is also the store's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from promptd.demos import as_text
from promptd.optimization.examples import (
    EventReader,
    Example,
    Snapshot,
    load_payload,
)
from promptd.optimization.pipeline import Episode
from promptd.replacement.pipelines import Pipeline, parse_source
from promptd.storage.repository import EventRepository

# Episodes with feedback on the whole episode and a captured call of every step, newest
# feedback first. The step count keeps episodes that lack a step out before the limit.
_EPISODES: Final = """
SELECT agg.episode_id, agg.score, agg.n, agg.comments,
       (SELECT f2.correction FROM feedback_events f2
         WHERE f2.episode_id = agg.episode_id AND f2.request_id IS NULL
           AND f2.correction IS NOT NULL AND f2.id <= :max_f AND f2.source IS NULL
         ORDER BY f2.ts DESC, f2.id DESC LIMIT 1)
  FROM (SELECT f.episode_id, avg(f.score) AS score, count(f.id) AS n,
               group_concat(f.comment, ' | ') AS comments, max(f.ts) AS last_ts
          FROM feedback_events f
         WHERE f.id >= :floor AND f.id <= :max_f AND f.ts >= :since
           AND f.request_id IS NULL AND f.episode_id IS NOT NULL AND f.source IS NULL
         GROUP BY f.episode_id) agg
 WHERE (SELECT count(DISTINCT m.prompt) FROM metric_events m
         WHERE m.episode_id = agg.episode_id AND m.input IS NOT NULL AND m.id <= :max_m
           AND m.prompt IN ({prompts})) = :steps
 ORDER BY agg.last_ts DESC, agg.episode_id
 LIMIT :limit
"""

_CALLS: Final = """
SELECT episode_id, prompt, request_id, variant, ts, input, output FROM metric_events
 WHERE episode_id IN ({episodes}) AND prompt IN ({prompts}) AND input IS NOT NULL
   AND id <= ?
 ORDER BY id
"""

#: Episodes per calls query (well below SQLite's variable limit).
_CHUNK: Final = 400


def episode_inputs(pipeline: Pipeline, calls: Mapping[str, Example]) -> dict[str, Any]:
    """The episode's inputs: each ``input.<name>`` binding's value in the captured
    arguments of the first step (in order) that binds it and captured it."""
    out: dict[str, Any] = {}
    for step in pipeline.steps:
        call = calls.get(step.prompt)
        if call is None or not isinstance(call.input, dict):
            continue
        for placeholder, source in step.bindings.items():
            kind, name = parse_source(source)
            if kind == "input" and name not in out and placeholder in call.input:
                out[name] = call.input[placeholder]
    return out


class EpisodeStore(EventReader):
    """A pipeline's episodes: its steps' calls with the episode's feedback."""

    async def episodes(self, pipeline: Pipeline, snapshot: Snapshot) -> list[Episode]:
        """The pipeline's episodes within ``snapshot``, newest feedback first, capped."""
        since = snapshot.now - self.max_age_s
        floor = await EventRepository(self.db).first_id_since("feedback_events", since)
        prompts = list(pipeline.prompts)
        names = {f"p{i}": p for i, p in enumerate(prompts)}
        sql = _EPISODES.format(prompts=", ".join(f":{k}" for k in names))
        params = {
            "floor": floor,
            "max_f": snapshot.max_feedback_id,
            "max_m": snapshot.max_metric_id,
            "since": since,
            "steps": len(prompts),
            "limit": self.limit,
            **names,
        }
        async with self.db.reader.execute(sql, params) as cur:
            heads = list(await cur.fetchall())
        calls = await self._calls([str(h[0]) for h in heads], prompts, snapshot, heads)
        out = []
        for episode_id, score, _, comments, correction in heads:
            steps = calls.get(str(episode_id), {})
            if len(steps) != len(prompts):
                continue  # cannot happen within one snapshot; guards a racing purge
            last = steps[prompts[-1]]
            loaded = load_payload(correction)
            out.append(
                Episode(
                    episode_id=str(episode_id),
                    inputs=episode_inputs(pipeline, steps),
                    calls=steps,
                    score=float(score),
                    correction=None if loaded is None else as_text(loaded),
                    final_output=None if last.output is None else as_text(last.output),
                    comments=comments,
                )
            )
        return out

    async def _calls(
        self,
        episode_ids: Sequence[str],
        prompts: Sequence[str],
        snapshot: Snapshot,
        heads: Sequence[Sequence[Any]],
    ) -> dict[str, dict[str, Example]]:
        """Each episode's latest captured call per step, carrying the episode's feedback."""
        feedback = {str(h[0]): (float(h[1]), int(h[2])) for h in heads}
        out: dict[str, dict[str, Example]] = {}
        marks = ", ".join("?" * len(prompts))
        for start in range(0, len(episode_ids), _CHUNK):
            part = episode_ids[start : start + _CHUNK]
            sql = _CALLS.format(episodes=", ".join("?" * len(part)), prompts=marks)
            async with self.db.reader.execute(
                sql, (*part, *prompts, snapshot.max_metric_id)
            ) as cur:
                rows = await cur.fetchall()
            for episode_id, prompt, request_id, variant, ts, value_in, value_out in rows:
                score, n = feedback[str(episode_id)]
                # Rows come in id order: a later call of the same step replaces an earlier.
                out.setdefault(str(episode_id), {})[str(prompt)] = Example(
                    request_id=str(request_id),
                    variant=str(variant),
                    ts=float(ts),
                    input=load_payload(value_in),
                    output=load_payload(value_out),
                    score=score,
                    n_feedback=n,
                    comments=None,
                    correction=None,
                )
        return out
