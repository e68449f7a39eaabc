"""litellm's serializer warnings (two per call, from its own logging payload) are silenced,
and only those."""

from __future__ import annotations

import warnings
from typing import Any

from promptd.optimization.llm import load_litellm, quiet_litellm_warnings

#: A chat completion as an OpenAI-compatible server answers it (tests/optimize_fake_llm.py).
ANSWER: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "test-model",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Lyon"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
}


def _serializer_warnings(quiet: bool) -> list[str]:
    """Dump a litellm response as litellm's success logging does; return the warnings."""
    litellm = load_litellm()
    response = litellm.ModelResponse(**ANSWER)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if quiet:
            quiet_litellm_warnings()
        response.model_dump()
    return [
        str(w.message) for w in caught if "PydanticSerializationUnexpectedValue" in str(w.message)
    ]


def test_litellm_response_serializer_warnings_are_silenced() -> None:
    """Without the filter, dumping a litellm response warns (the pinned litellm's bug);
    with it, nothing."""
    assert _serializer_warnings(quiet=False), "the pinned litellm no longer warns: drop the filter"
    assert _serializer_warnings(quiet=True) == []


def test_other_serializer_warnings_still_show() -> None:
    """The filter is targeted: pydantic's warning about one of our own models is kept."""
    from pydantic import BaseModel

    class Ours(BaseModel):
        count: int

    value = Ours(count=1)
    value.count = "one"  # type: ignore[assignment]  # bypasses validation, as litellm does
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_litellm_warnings()
        value.model_dump()
    assert any("PydanticSerializationUnexpectedValue" in str(w.message) for w in caught)
