"""Turning buffered tuples into wire records, in the sender thread.

The hot path buffers plain tuples (cheaper than dicts or models); this module names their
positions, builds the pydantic :class:`~promptd.events.MetricEvent` /
:class:`~promptd.events.FeedbackEvent`, applies the capture cap and redaction hook, and
serializes. It also keeps the bounded LRU of ``request_id -> (prompt, variant, model)``
that lets ``feedback(request_id, score)`` find its call: metric and feedback tuples share
one FIFO buffer, so a call's metric is always encoded before feedback given after it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Final, cast

from promptd.sdk.config import SdkConfig

#: ``(topic, key, value)`` ready for the producer.
Record = tuple[str, bytes, bytes]

METRIC: Final = "m"
FEEDBACK: Final = "f"

# Positions in a metric tuple:
# (METRIC, ts, prompt, variant, model, request_id, unit_id, latency_ms, success, error,
#  tokens_in, tokens_out, cost_usd, input, output, attributes, episode_id, sizing, demos)
# where sizing is None or (count, args, kwargs): input_chars = count(*args, **kwargs), and
# ``demos`` is the call's DemoChoice (its ``ids``), or None.
# Positions in a feedback tuple:
# (FEEDBACK, ts, request_id, score, kind, comment, correction, prompt, variant, model,
#  episode_id)


class Encoder:
    """Builds, validates and serializes events; returns a drop reason instead of raising."""

    def __init__(self, config: SdkConfig) -> None:
        # Imported here, in the sender thread: pydantic stays off ``import promptd``.
        from pydantic import ValidationError

        from promptd._validation import validation_message
        from promptd.events import FeedbackEvent, MetricEvent, new_event_id

        self._metric = MetricEvent
        self._feedback = FeedbackEvent
        self._new_id = new_event_id
        self._invalid = ValidationError
        self._describe = validation_message
        self.config = config
        self.last_invalid: str | None = None
        self._calls: OrderedDict[str, tuple[str, str, str]] = OrderedDict()

    def encode(self, item: tuple[Any, ...]) -> Record | str:
        """A record, or the drop reason (``invalid``, ``unknown_request``); the reason an
        event is invalid is kept in :attr:`last_invalid`."""
        try:
            if item[0] == METRIC:
                return self._encode_metric(item)
            return self._encode_feedback(item)
        except self._invalid as exc:
            self.last_invalid = f"{_kind(item)}: {self._describe(exc)}"
            return "invalid"
        except (ValueError, TypeError) as exc:
            self.last_invalid = f"{_kind(item)}: {exc}"
            return "invalid"

    def _encode_metric(self, item: tuple[Any, ...]) -> Record:
        (_, ts, prompt, variant, model, request_id, unit_id, latency_ms, success, error) = item[:10]
        tokens_in, tokens_out, cost_usd, captured_in, captured_out, attributes, episode_id = item[
            10:17
        ]
        size = _input_chars(item[17] if len(item) > 17 else None)
        chosen = item[18] if len(item) > 18 else None
        event = self._metric(
            event_id=self._new_id(),
            ts=ts,
            prompt=prompt,
            variant=variant,
            model=model,
            request_id=request_id,
            unit_id=unit_id,
            episode_id=episode_id,
            latency_ms=latency_ms,
            success=success,
            error=error,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=cost_usd,
            input_chars=size,
            input=self._capture("input", captured_in),
            output=self._capture("output", captured_out),
            attributes=attributes,
            demo_ids=None if chosen is None else chosen.ids,
        )
        self._remember(request_id, (prompt, variant, model))
        return (self.config.metrics_topic, prompt.encode(), event.to_json())

    def _encode_feedback(self, item: tuple[Any, ...]) -> Record | str:
        (_, ts, request_id, score, kind, comment, correction, prompt, variant, model) = item[:10]
        episode_id = item[10]
        if request_id is None:
            # On a whole episode: prompt and variant are optional (only informative).
            if episode_id is None:
                self.last_invalid = "feedback names neither a request_id nor an episode_id"
                return "invalid"
        elif prompt is None or variant is None:
            known = self._calls.get(request_id)
            if known is None:
                return "unknown_request"
            prompt = prompt or known[0]
            variant = variant or known[1]
            model = model or known[2]
        if isinstance(score, bool):  # thumbs up / down
            score = 1.0 if score else 0.0
        event = self._feedback(
            event_id=self._new_id(),
            ts=ts,
            prompt=prompt,
            variant=variant,
            model=model,
            request_id=request_id,
            episode_id=episode_id,
            score=score,
            kind=kind,
            comment=comment,
            correction=self._capture("correction", correction),
        )
        # Keyed by prompt like every event; feedback on an episode without one by its id.
        key = prompt if prompt is not None else episode_id
        return (self.config.feedback_topic, key.encode(), event.to_json())

    def _remember(self, request_id: str, call: tuple[str, str, str]) -> None:
        calls = self._calls
        calls[request_id] = call
        if len(calls) > self.config.feedback_lru_size:
            calls.popitem(last=False)

    def _capture(self, field: str, value: Any) -> dict[str, Any] | str | None:
        """Redact, make JSON-safe and cap one captured payload."""
        if value is None:
            return None
        if self.config.redact is not None:
            value = self.config.redact(field, value)
            if value is None:
                return None
        if not isinstance(value, dict | str):
            value = _output_text(value)
        text = json.dumps(value, default=repr, ensure_ascii=False, separators=(",", ":"))
        cap = self.config.capture_max_bytes
        if len(text.encode()) <= cap:
            # Round-trip so the event holds only JSON types (repr for the rest).
            return cast(dict[str, Any], json.loads(text)) if isinstance(value, dict) else value
        # Too large: keep a prefix of the text form (cut on a character boundary).
        raw = value if isinstance(value, str) else text
        return raw.encode()[: cap - 64].decode(errors="ignore")


def _input_chars(sizing: tuple[Any, ...] | None) -> int | None:
    """The call's input size, or None (also when the app's counting function fails or
    returns something that is not a count: the call is still reported)."""
    if sizing is None:
        return None
    count, args, kwargs = sizing
    try:
        size = count(*args, **kwargs)
    except Exception:
        return None
    if type(size) is not int or not 0 <= size <= 10**9:
        return None
    return size


def _kind(item: tuple[Any, ...]) -> str:
    return "a metric event" if item[0] == METRIC else "a feedback event"


def _output_text(value: Any) -> str:
    """The message text of a chat completion (litellm/OpenAI), else ``repr``."""
    try:
        choices = value["choices"] if isinstance(value, dict) else value.choices
        first = choices[0]
        message = first["message"] if isinstance(first, dict) else first.message
        content = message["content"] if isinstance(message, dict) else message.content
        if isinstance(content, str):
            return content
    except (AttributeError, KeyError, IndexError, TypeError):
        pass
    return repr(value)
