"""A judge scored by token probabilities (``scoring = "logprobs"``, G-Eval's weighting):
the expected score under the probabilities the server returns, read through litellm
from a local OpenAI-compatible server (issue 20)."""

from __future__ import annotations

import math

import pytest

from promptd.evaluation.calls import Call
from promptd.evaluation.config import JudgeEvaluator
from promptd.evaluation.judge import expected_score, messages, verdict_of
from promptd.optimization.llm import LiteLLMClient
from tests.optimize_fake_llm import serving

LN = math.log


def _judge(**values: object) -> JudgeEvaluator:
    return JudgeEvaluator.model_validate(
        {"name": "j", "type": "judge", "rubric": "r", "model": "openai/j", **values}
    )


def test_the_expected_score_weights_the_scale_values_by_their_probability() -> None:
    """At the first position holding a scale value, the values' mean weighted by their
    probabilities (renormalised over the scale values), as 0..1; words and tokens
    outside the scale are left out; yes/no count as the ends of the scale."""
    positions = [
        [("Score", LN(0.9)), ("The", LN(0.1))],  # no scale value: the next position
        [(" 5", LN(0.3)), ("4", LN(0.3)), ("1", LN(0.2)), ("9", LN(0.1)), ("x", LN(0.1))],
    ]
    score, detail = expected_score(positions, (1.0, 5.0))
    mean = (5 * 0.3 + 4 * 0.3 + 1 * 0.2) / 0.8
    assert score == pytest.approx((mean - 1) / 4)
    assert "position 1, mass 0.80" in detail
    yes_no = [[("Yes", LN(0.6)), (" no", LN(0.2)), ("maybe", LN(0.2))]]
    assert expected_score(yes_no, (0.0, 1.0))[0] == pytest.approx(0.75)
    assert expected_score([[("hello", 0.0)]], (1.0, 5.0)) == (
        None,
        "no scale value among the most likely tokens",
    )


def test_without_probabilities_the_text_is_read() -> None:
    """A server that returns no probabilities: the answer's text is the score."""
    judge = _judge(scoring="logprobs")
    score, detail = verdict_of(judge, "4", [])
    assert score == 0.75
    assert detail.endswith("from the text: 4 on 1..5")
    assert verdict_of(_judge(), "4", [[("1", 0.0)]])[0] == 0.75  # scoring "text"


async def test_the_judge_asks_for_and_reads_the_probabilities_over_http() -> None:
    """Through litellm to a local OpenAI-compatible server: the request asks for
    ``logprobs`` and ``top_logprobs``, the answer's probabilities come back on the
    completion and make the score."""
    logprobs = {
        "content": [
            {
                "token": "4",
                "logprob": LN(0.5),
                "top_logprobs": [
                    {"token": "4", "logprob": LN(0.5)},
                    {"token": "2", "logprob": LN(0.5)},
                ],
            }
        ]
    }
    async with serving(lambda body: {"content": "4", "logprobs": logprobs}) as fake:
        judge = _judge(scoring="logprobs", top_logprobs=5, api_base=fake.api_base)
        call = Call("r1", "p", "v1", "m", 0.0, {"text": "hi"}, "hello")
        client = LiteLLMClient(max_retries=0, backoff_s=0.1)
        done = await client.complete(judge.llm(), messages(judge, call, None), "test")
    assert (fake.requests[0]["logprobs"], fake.requests[0]["top_logprobs"]) == (True, 5)
    assert done.top_logprobs == ((("4", pytest.approx(LN(0.5))), ("2", pytest.approx(LN(0.5)))),)
    assert verdict_of(judge, done.text, done.top_logprobs)[0] == pytest.approx(0.5)
