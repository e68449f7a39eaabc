"""What a prompt version asks the model, as the optimizer sees it: a :class:`Program`.

A version is either a **text** template (one ``str.format`` string that the app sends as
one user message) or a **chat** configuration: messages whose contents are ``str.format``
templates, optionally with the model (a litellm model string) and its parameters. The
optimizer edits programs and never changes their kind: a text prompt gets text
candidates (the app formats one string), a chat prompt gets chat candidates (the app
sends the rendered messages), so an app always receives what it knows how to send.

The parts an edit touches:

* the **instruction**: in text mode the lines before the input block (see
  :mod:`~promptd.optimization.templates`); in chat mode the system message;
* the **demonstrations**: in text mode a block inside the template; in chat mode
  user/assistant turns before the final user message (chat models follow demonstrations
  given as earlier turns far better than examples pasted into one message: SmolLM2-135M
  answered 0 of 12 city questions right with the latter and 11 with the former);
* the **input**: the final user message (chat) or the input block (text), kept as is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from promptd.demos import DemoSpec, EnsembleSpec, as_text
from promptd.optimization.examples import Example
from promptd.optimization.templates import (
    check as check_text,
)
from promptd.optimization.templates import (
    clip,
    escape,
    parse,
    sanitize,
    with_instruction,
)
from promptd.optimization.templates import (
    with_demos as text_with_demos,
)
from promptd.prompt_config import ROLES, describe
from promptd.replacement.registry import PromptVersion, RegistryError, placeholders

Message = dict[str, str]
# Configuration keys the optimizer carries along (it edits only ``demos`` and ``ensemble``,
# through :meth:`Program.with_extra`).
EXTRAS: Final = ("output_schema", "tunable", "demos", "ensemble")


@dataclass(frozen=True, slots=True)
class Program:
    """A text template or a chat configuration (see the module docstring)."""

    messages: tuple[tuple[str, str], ...]
    chat: bool = False
    model: str | None = None
    params: tuple[tuple[str, Any], ...] = field(default=())
    # Other configuration keys (output_schema, tunable), JSON-encoded, carried unchanged.
    extras: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def text(cls, template: str) -> Program:
        """A text program: one template, sent as one user message."""
        return cls((("user", template),))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Program:
        """A chat program from a version's configuration (``messages``, ``model``,
        ``params``); ``ValueError`` naming what is wrong."""
        raw = config.get("messages")
        if not isinstance(raw, list) or not raw:
            raise ValueError("a chat configuration needs a non-empty list of messages")
        messages = []
        for m in raw:
            role, content = m.get("role"), m.get("content")
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(f"message {m!r}: role must be one of {ROLES}, content a string")
            messages.append((role, content))
        params = config.get("params") or {}
        extras = tuple(
            (key, json.dumps(config[key], sort_keys=True))
            for key in EXTRAS
            if config.get(key) is not None
        )
        return cls(
            tuple(messages),
            chat=True,
            model=config.get("model"),
            params=tuple(sorted(params.items())),
            extras=extras,
        )

    @property
    def template(self) -> str:
        """The text template (text mode), or a readable rendering of the messages."""
        if not self.chat:
            return self.messages[0][1]
        return describe(self.to_config())

    def to_config(self) -> dict[str, Any]:
        """The chat configuration (JSON form)."""
        out: dict[str, Any] = {"messages": [{"role": r, "content": c} for r, c in self.messages]}
        if self.model is not None:
            out["model"] = self.model
        if self.params:
            out["params"] = dict(self.params)
        for key, value in self.extras:
            out[key] = json.loads(value)
        return out

    def extra(self, key: str) -> Any:
        """An extra configuration key (``output_schema``, ``tunable``), or None."""
        for name, value in self.extras:
            if name == key:
                return json.loads(value)
        return None

    def with_extra(self, key: str, value: Any) -> Program:
        """The program with configuration key ``key`` set to ``value`` (``None``: removed)."""
        kept = [(k, v) for k, v in self.extras if k != key]
        if value is not None:
            kept.append((key, json.dumps(value, sort_keys=True)))
        extras = tuple(sorted(kept, key=lambda kv: EXTRAS.index(kv[0])))
        return Program(self.messages, self.chat, self.model, self.params, extras)

    def demo_spec(self) -> DemoSpec | None:
        """The pool this program takes its demonstrations from per request, if any."""
        return DemoSpec.of({"demos": self.extra("demos")})

    def ensemble(self) -> EnsembleSpec | None:
        """The program's self-consistency vote, if any."""
        return EnsembleSpec.of({"ensemble": self.extra("ensemble")})

    def with_model(self, model: str | None, params: Mapping[str, Any]) -> Program:
        """The program calling another model or with other parameters (chat only)."""
        merged = {**dict(self.params), **params}
        return Program(self.messages, True, model, tuple(sorted(merged.items())), self.extras)

    def key(self) -> str:
        """Identity for de-duplication."""
        return json.dumps(
            [self.chat, self.messages, self.model, self.params, self.extras], sort_keys=True
        )

    def placeholders(self) -> list[str]:
        """Placeholders over every message (``RegistryError`` for a malformed one)."""
        names: set[str] = set()
        for _role, content in self.messages:
            names.update(placeholders(content))
        return sorted(names)

    def render(self, example: Example) -> list[Message] | None:
        """The messages filled with the example's input, ``None`` when they do not fit."""
        values = example.input if isinstance(example.input, dict) else {"input": example.input}
        try:
            return [{"role": r, "content": c.format(**values)} for r, c in self.messages]
        except (KeyError, IndexError, ValueError, AttributeError, TypeError):
            return None

    # -- parts -------------------------------------------------------------------------

    @property
    def system(self) -> str | None:
        """The system message (chat mode), if any."""
        return self.messages[0][1] if self.chat and self.messages[0][0] == "system" else None

    @property
    def final(self) -> tuple[str, str]:
        """The last message (the input, in a well-formed chat program)."""
        return self.messages[-1]

    def instruction(self) -> str:
        """What instruction strategies rewrite."""
        if not self.chat:
            return parse(self.template).instruction
        return self.system or ""

    def without_demos(self) -> Program:
        """The program with no demonstrations (text block or chat turns)."""
        if not self.chat:
            parts = parse(self.template)
            if not parts.demos:
                return self
            return Program.text(type(parts)(parts.instruction, "", parts.block).assemble())
        head = [m for m in self.messages[:1] if m[0] == "system"]
        extras = tuple((k, v) for k, v in self.extras if k != "demos")
        return Program((*head, self.final), True, self.model, self.params, extras)

    def with_instruction(self, instruction: str) -> Program:
        """The program with its instruction replaced (demonstrations and input kept)."""
        if not self.chat:
            return Program.text(with_instruction(self.template, instruction))
        current = self.system
        content = sanitize(instruction, current) if current else escape(instruction.strip())
        body = self.messages[1:] if current is not None else self.messages
        return Program((("system", content), *body), True, self.model, self.params, self.extras)

    def with_demos(self, demos: Sequence[Example], max_chars: int, min_score: float) -> Program:
        """The program with its demonstrations replaced by ``demos``."""
        if not self.chat:
            return Program.text(text_with_demos(self.template, demos, max_chars, min_score))
        base = self.without_demos()
        head, final = list(base.messages[:-1]), base.final
        turns: list[tuple[str, str]] = []
        for d in demos:
            answer = d.reference(min_score)
            if answer is None:
                continue
            turns.append(("user", escape(_fill(final[1], d, max_chars))))
            turns.append(("assistant", escape(clip(answer, max_chars))))
        return Program((*head, *turns, final), True, self.model, self.params, self.extras)


def _fill(template: str, example: Example, max_chars: int) -> str:
    values = example.input if isinstance(example.input, dict) else {"input": example.input}
    clipped = {
        k: clip(v if isinstance(v, str) else as_text(v), max_chars) for k, v in values.items()
    }
    try:
        return template.format(**clipped)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError):
        return clip(as_text(example.input), max_chars)


def check(candidate: Program, base: Program, seen: set[str], max_chars: int) -> str | None:
    """``None`` when the candidate may be evaluated, else why it is discarded."""
    if candidate.chat != base.chat:
        return "kind_changed"
    if not candidate.chat:
        return check_text(candidate.template, base.template, seen, max_chars)
    if sum(len(c) for _r, c in candidate.messages) > max_chars:
        return "too_long"
    try:
        names = candidate.placeholders()
    except RegistryError:
        return "invalid_template"
    if names != base.placeholders():
        return "placeholders_changed"
    if candidate.final[0] != "user":
        return "invalid_template"
    if candidate.key() in seen or candidate.key() == base.key():
        return "duplicate"
    return None


def seen_key(program: Program) -> str:
    """What :func:`check` compares against ``seen`` (the text of a text program, so
    registered versions and candidates de-duplicate alike)."""
    return program.template.strip() if not program.chat else program.key()


def program_of(version: PromptVersion) -> Program:
    """A registered version as a program (a chat configuration, else its template)."""
    config = getattr(version, "config", None)
    return Program.from_config(config) if config else Program.text(version.template)
