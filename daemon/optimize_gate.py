"""The validation gate: score candidates against the active version on held-out examples.

Each held-out example's input fills the template (``str.format``), the evaluation model
answers, and a metric compares the answer with the example's reference: its correction
when someone gave one, else its own production output when it was rated at least
``reference_min_score``. ``llm_judge`` needs no reference. The per-example scores of a
candidate and of the active version are paired; :func:`paired_bootstrap` resamples the
examples and returns the share of resamples in which the candidate's mean is strictly
higher — the candidate's confidence. Ties count against the candidate, so an equal
candidate gets 0 and never passes.

Judge rubric (``llm_judge``): the judge sees the task input, the reference when there is
one, and the answer, and replies ``SCORE: n`` with n from 0 (wrong, unhelpful) to 10
(correct, complete, follows the instructions); the score is n / 10.
"""

from __future__ import annotations

import asyncio
import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from promptd.daemon.optimize_config import EvaluationSettings, LLMSettings
from promptd.daemon.optimize_llm import LLMClient
from promptd.storage.examples import Example, as_text

MetricFn = Callable[[str, str, Example], float]


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when equal after trimming and case folding."""
    return float(prediction.strip().casefold() == reference.strip().casefold())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 (bag of lower-cased word tokens)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum(min(pred.count(t), ref.count(t)) for t in set(pred) & set(ref))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common token subsequence."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    prev = [0] * (len(ref) + 1)
    for p in pred:
        row = [0]
        for j, r in enumerate(ref):
            row.append(prev[j] + 1 if p == r else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


REFERENCE_METRICS: Final[dict[str, Callable[[str, str], float]]] = {
    "exact_match": exact_match,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
}


def load_metric(name: str) -> MetricFn:
    """A built-in reference metric, or a user callable ``package.module:function``.

    A user callable gets ``(prediction, reference, example)`` and returns a float in
    [0, 1]; ``reference`` is ``""`` when the example has none.
    """
    if name in REFERENCE_METRICS:
        fn = REFERENCE_METRICS[name]
        return lambda prediction, reference, _example: fn(prediction, reference)
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"metric {name!r} is not built in nor 'package.module:function'")
    module = importlib.import_module(module_name)
    fn_user = getattr(module, attr, None)
    if not callable(fn_user):
        raise ValueError(f"metric {name!r}: {attr!r} is not a callable in {module_name!r}")
    return lambda prediction, reference, example: float(fn_user(prediction, reference, example))


def paired_bootstrap(
    candidate: Sequence[float], baseline: Sequence[float], samples: int, seed: int
) -> float:
    """Share of bootstrap resamples where the candidate's mean beats the baseline's."""
    if len(candidate) != len(baseline):
        raise ValueError("paired scores must have the same length")
    if not candidate:
        return 0.0
    diffs = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diffs), size=(samples, len(diffs)))
    means = diffs[idx].mean(axis=1)
    return float((means > 1e-12).mean())


def reference_for(example: Example, min_score: float) -> str | None:
    """The answer to compare with, or ``None`` when the example has no trusted answer."""
    if example.correction is not None:
        return as_text(example.correction)
    if example.output is not None and example.score >= min_score:
        return as_text(example.output)
    return None


def render(template: str, example: Example) -> str | None:
    """The template filled with the example's input, or ``None`` when it does not fit."""
    values = example.input if isinstance(example.input, dict) else {"input": example.input}
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError, AttributeError):
        return None


JUDGE_PROMPT: Final = """You grade an AI assistant's answer.
Task given to the assistant:
{task}

Reference answer (may be empty):
{reference}

Assistant's answer:
{answer}

Score 0 (wrong or unhelpful) to 10 (correct, complete, follows the task). Reply with \
exactly one line: SCORE: <n>"""


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Gate result of one candidate."""

    confidence: float
    candidate_mean: float
    baseline_mean: float
    n_examples: int


class Gate:
    """Runs templates on held-out examples and compares them with the active one."""

    def __init__(self, settings: EvaluationSettings, llm: LLMClient, seed: int) -> None:
        assert settings.model is not None
        self.settings = settings
        self.model: LLMSettings = settings.model
        self.judge: LLMSettings = settings.judge or settings.model
        self.llm = llm
        self.seed = seed
        self.metric = None if settings.metric == "llm_judge" else load_metric(settings.metric)

    def usable(self, held_out: Sequence[Example], templates: Sequence[str]) -> list[Example]:
        """Examples every template can render and (for reference metrics) that have one."""
        out = []
        for e in held_out:
            if (
                self.metric is not None
                and reference_for(e, self.settings.reference_min_score) is None
            ):
                continue
            if all(render(t, e) is not None for t in templates):
                out.append(e)
        return out

    async def scores(self, template: str, examples: Sequence[Example]) -> list[float]:
        """Per-example scores of ``template`` (in the order of ``examples``)."""
        return list(await asyncio.gather(*(self._score(template, e) for e in examples)))

    async def _score(self, template: str, example: Example) -> float:
        prompt = render(template, example)
        assert prompt is not None
        answer = await self.llm.complete(
            self.model, [{"role": "user", "content": prompt}], "evaluation"
        )
        reference = reference_for(example, self.settings.reference_min_score) or ""
        if self.metric is not None:
            return self.metric(answer, reference, example)
        verdict = await self.llm.complete(
            self.judge,
            [
                {
                    "role": "user",
                    "content": JUDGE_PROMPT.format(task=prompt, reference=reference, answer=answer),
                }
            ],
            "judge",
        )
        found = re.search(r"SCORE:\s*(\d+(?:\.\d+)?)", verdict)
        return min(float(found.group(1)), 10.0) / 10.0 if found else 0.0

    def compare(self, candidate: Sequence[float], baseline: Sequence[float]) -> Evaluation:
        """The candidate's confidence from paired scores."""
        confidence = paired_bootstrap(
            candidate, baseline, self.settings.bootstrap_samples, self.seed
        )
        n = len(candidate)
        return Evaluation(
            confidence=confidence,
            candidate_mean=float(np.mean(candidate)) if n else 0.0,
            baseline_mean=float(np.mean(baseline)) if n else 0.0,
            n_examples=n,
        )


def seed_for(run_id: str) -> int:
    """A stable bootstrap seed from the run id (same run, same confidence)."""
    return int.from_bytes(run_id.encode()[-8:].rjust(8, b"\0"), "big") % (2**32)
