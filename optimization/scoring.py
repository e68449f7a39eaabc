"""Metrics: how one answer is scored against the example's reference, in [0, 1].

Reference metrics compare the model's answer with the example's trusted answer (its
correction, else its own well-rated output): ``exact_match``, ``token_f1`` (SQuAD-style
bag of words) and ``rouge_l`` (longest common token subsequence). A user metric
``package.module:function`` gets ``(prediction, reference, example)``. ``llm_judge`` is
not here: it needs a model call, so the evaluator runs it (see
:mod:`promptd.optimization.evaluator`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Final

from promptd.optimization.examples import Example

# (prediction, reference, example); the example is None when scoring a pipeline end to end.
MetricFn = Callable[[str, str, Example | None], float]


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
    [0, 1] (clipped); ``reference`` is ``""`` when the example has none.
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
    return lambda prediction, reference, example: min(
        max(float(fn_user(prediction, reference, example)), 0.0), 1.0
    )


JUDGE_PROMPT: Final = """You grade an AI assistant's answer.
Task given to the assistant:
{task}

Reference answer (may be empty):
{reference}

Assistant's answer:
{answer}

Score 0 (wrong or unhelpful) to 10 (correct, complete, follows the task). Reply with \
exactly one line: SCORE: <n>"""

_SCORE_RE: Final = re.compile(r"SCORE:\s*(\d+(?:\.\d+)?)")


def parse_judge(verdict: str) -> float:
    """The judge's ``SCORE: n`` as n / 10 (0 when it did not answer in that form)."""
    found = _SCORE_RE.search(verdict)
    return min(float(found.group(1)), 10.0) / 10.0 if found else 0.0
