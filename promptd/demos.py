"""Dynamic demonstrations and the ensemble vote: what the app and the optimizer share.

A configuration version may take its demonstrations per request from a **pool**: a
versioned snapshot of trusted production examples of its prompt (see
``docs/optimization.md``). It declares::

    "demos": {"source": "pool", "pool": "pool-3f9a…", "k": 4, "max_distance": 0.8,
              "retriever": "lexical", "max_chars": 1000}

For each call, the ``k`` demonstrations nearest to the call's input (at most
``max_distance`` away; see :mod:`promptd.retrieval` for the distances) become user and
assistant turns before the final user message. The SDK does this in the app
(``PromptVariant.messages``), the optimizer does it when it scores the version, with the
same functions of this module, so what was gated is what is served.

A configuration may also ask for a **self-consistency vote**: ``"ensemble": {"n": 5,
"temperature": 0.7, "answer": "label"}``: the app samples ``n`` answers and keeps the
most frequent (:func:`vote`), at ``n`` times the model calls. Meant for a label or JSON
output, where answers can be compared; off unless a version says so.

This module is part of ``import promptd`` and imports nothing heavy.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

RETRIEVERS: Final = ("lexical", "embedding")
ANSWER_KINDS: Final = ("label", "json")
#: Defaults of a ``demos`` declaration.
DEFAULT_K: Final = 4
DEFAULT_MAX_CHARS: Final = 1_000
#: Longest demo id (the ids are the request ids of the production calls they came from).
MAX_DEMO_ID_CHARS: Final = 128
#: Most demo ids one call's event carries.
MAX_DEMOS_PER_CALL: Final = 50


@dataclass(frozen=True, slots=True)
class Demo:
    """One demonstration of a pool: the production call's input and its trusted answer;
    ``id`` is that call's request id."""

    id: str
    input: Mapping[str, Any] | str
    answer: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the pool's wire and storage form)."""
        return {"id": self.id, "input": self.input, "answer": self.answer}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Demo:
        """Inverse of :meth:`to_dict` (``ValueError`` for a malformed entry)."""
        demo_id, value, answer = data.get("id"), data.get("input"), data.get("answer")
        if not isinstance(demo_id, str) or not isinstance(answer, str):
            raise ValueError(f"a demo needs a string id and answer, got {dict(data)!r:.120}")
        if not isinstance(value, dict | str):
            raise ValueError(f"demo {demo_id!r}: input must be an object or a string")
        return cls(demo_id, value, answer)


@dataclass(frozen=True, slots=True)
class DemoSpec:
    """A version's ``demos`` declaration (validated by the registry when registered)."""

    pool: str
    k: int = DEFAULT_K
    max_distance: float | None = None
    retriever: str = "lexical"
    max_chars: int = DEFAULT_MAX_CHARS

    @classmethod
    def of(cls, config: Mapping[str, Any] | None) -> DemoSpec | None:
        """The declaration of a configuration, or ``None`` when it has fixed demos."""
        raw = None if config is None else config.get("demos")
        if not raw or raw.get("source") != "pool" or not raw.get("pool"):
            return None
        distance = raw.get("max_distance")
        return cls(
            pool=str(raw["pool"]),
            k=int(raw.get("k", DEFAULT_K)),
            max_distance=None if distance is None else float(distance),
            retriever=str(raw.get("retriever", "lexical")),
            max_chars=int(raw.get("max_chars", DEFAULT_MAX_CHARS)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The declaration as a configuration holds it."""
        out: dict[str, Any] = {"source": "pool", "pool": self.pool, "k": self.k}
        if self.max_distance is not None:
            out["max_distance"] = float(self.max_distance)
        out["retriever"] = self.retriever
        out["max_chars"] = self.max_chars
        return out


@dataclass(frozen=True, slots=True)
class EnsembleSpec:
    """A version's ``ensemble`` declaration: ``n`` samples at ``temperature``, voted."""

    n: int
    temperature: float = 0.7
    answer: str = "label"

    @classmethod
    def of(cls, config: Mapping[str, Any] | None) -> EnsembleSpec | None:
        """The declaration of a configuration (``None``: one answer per request)."""
        raw = None if config is None else config.get("ensemble")
        if not raw or int(raw.get("n", 1)) <= 1:
            return None
        return cls(
            int(raw["n"]), float(raw.get("temperature", 0.7)), str(raw.get("answer", "label"))
        )

    def to_dict(self) -> dict[str, Any]:
        """The declaration as a configuration holds it."""
        return {"n": self.n, "temperature": float(self.temperature), "answer": self.answer}


def as_text(value: Any) -> str:
    """A payload as text: strings unchanged, anything else as sorted compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (with an ellipsis when cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fields_of(template: str) -> tuple[str, ...]:
    """The placeholders of ``template`` in order of appearance (no duplicates)."""
    seen: dict[str, None] = {}
    try:
        for _literal, field, _spec, _conv in string.Formatter().parse(template):
            if field:
                seen.setdefault(field.split(".", 1)[0].split("[", 1)[0], None)
    except ValueError:
        return ()
    return tuple(seen)


def input_text(value: Mapping[str, Any] | str, fields: Sequence[str]) -> str:
    """What retrieval compares: the values of the template's ``fields`` (one a line), or
    every value when none of them is there; a string input as it is."""
    if isinstance(value, str):
        return value
    chosen = [value[f] for f in fields if f in value] or [value[k] for k in sorted(value)]
    return "\n".join(as_text(v) for v in chosen)


def final_template(config: Mapping[str, Any]) -> str:
    """The configuration's last message: the user's turn, filled with each demo's input."""
    return str(config["messages"][-1]["content"])


def demo_turns(template: str, demos: Iterable[Demo], max_chars: int) -> list[dict[str, str]]:
    """Each demo as a user turn (``template`` filled with its input, each value cut to
    ``max_chars``) and an assistant turn (its answer, cut likewise)."""
    turns: list[dict[str, str]] = []
    for d in demos:
        values = d.input if isinstance(d.input, Mapping) else {"input": d.input}
        clipped = {
            k: clip(v if isinstance(v, str) else as_text(v), max_chars) for k, v in values.items()
        }
        try:
            user = template.format(**clipped)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError):
            user = clip(as_text(d.input), max_chars)
        turns.append({"role": "user", "content": user})
        turns.append({"role": "assistant", "content": clip(d.answer, max_chars)})
    return turns


def with_turns(messages: list[dict[str, str]], turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """``messages`` with ``turns`` inserted before the final (user) message."""
    if not turns:
        return messages
    return [*messages[:-1], *turns, messages[-1]]


def _vote_key(answer: str, kind: str) -> str:
    text = answer.strip()
    if kind == "json":
        try:
            return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
        except ValueError:
            return text
    return text.strip("\"'`").rstrip(".!").strip().casefold()


def vote(answers: Sequence[str], kind: str = "label") -> str:
    """The most frequent answer (labels compared without case, quotes or a final period;
    JSON compared as parsed values); ties go to the answer seen first. ``""`` for none."""
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for answer in answers:
        key = _vote_key(answer, kind)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, answer.strip())
    if not counts:
        return ""
    best = max(counts.values())
    return next(first[k] for k in counts if counts[k] == best)
