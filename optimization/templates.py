"""Templates as the optimizer sees them: an instruction, demonstrations, an input block.

A prompt version is a ``str.format`` template. The optimizer reads it as three parts,
in this order:

* the **instruction**: the lines before the first line that holds a placeholder, which
  the proposer rewrites;
* an optional **demonstrations** block under :data:`DEMO_HEADING`, which the few-shot
  search replaces (never stacks). Each demonstration is the input block filled with a
  training example's input and followed by its correct answer, so the model sees the
  very pattern it must continue;
* the **input block**: from the first line holding a placeholder to the end
  (``Message: {text}`` and a cue such as ``City:``), kept verbatim by every candidate so
  the app's variables still fill it.

A proposer that returns a whole template keeps it when its placeholders are right. One
that loses a placeholder (small models often do) has written an instruction: the input
block is grafted back rather than the proposal thrown away. Stray braces in a proposal
(a JSON example, say) are escaped so they stay literal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from promptd.demos import as_text
from promptd.optimization.examples import Example
from promptd.replacement.registry import RegistryError, placeholders

DEMO_HEADING: Final = "Examples of good answers:"
_FIELD_RE: Final = re.compile(r"\{[^{}]*\}")


def render(template: str, example: Example) -> str | None:
    """The template filled with the example's input, or ``None`` when it does not fit."""
    values = example.input if isinstance(example.input, dict) else {"input": example.input}
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError):
        return None


def escape(text: str) -> str:
    """Make text literal inside a ``str.format`` template."""
    return text.replace("{", "{{").replace("}", "}}")


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (with an ellipsis when cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _has_placeholder(line: str) -> bool:
    try:
        return bool(placeholders(line))
    except RegistryError:
        return False


@dataclass(frozen=True, slots=True)
class Parts:
    """A template cut into instruction, demonstrations block and input block."""

    instruction: str
    demos: str
    block: str

    def assemble(self) -> str:
        """The template again (parts separated by one blank line)."""
        head = [part for part in (self.instruction, self.demos) if part]
        return "\n\n".join([*head, self.block]) if self.block else "\n\n".join(head)


def parse(template: str) -> Parts:
    """Cut ``template`` into its parts (see the module's docstring)."""
    lines = template.splitlines()
    first = next((i for i, line in enumerate(lines) if _has_placeholder(line)), len(lines))
    head = "\n".join(lines[:first])
    block = "\n".join(lines[first:]).strip("\n")
    # Demonstrations appended after the input (how promptd 0.1 wrote them) are dropped.
    block = block.split("\n\n" + DEMO_HEADING, 1)[0]
    instruction, heading, demos = head.partition(DEMO_HEADING)
    return Parts(instruction.strip(), (heading + demos).strip(), block)


def strip_demos(template: str) -> str:
    """The template without its demonstrations block."""
    parts = parse(template)
    return Parts(parts.instruction, "", parts.block).assemble() if parts.demos else template


def input_block(template: str) -> str:
    """From the first line holding a placeholder to the end: what every candidate keeps."""
    return parse(template).block


def instruction_of(template: str) -> str:
    """The lines before the input block, demonstrations excluded: what the proposer
    rewrites."""
    return parse(template).instruction


def sanitize(proposal: str, base: str) -> str:
    """A proposal made into a valid template with ``base``'s placeholders.

    ``{name}`` for a placeholder of ``base`` stays a placeholder; ``{{`` and ``}}`` stay
    escaped; every other brace is escaped. When a placeholder of ``base`` is still
    missing, the proposal is taken as an instruction and ``base``'s input block is
    appended. The result may still fail :func:`check` (too long, duplicate, ...).
    """
    names = _names(base)
    alternatives = [r"\{\s*(" + "|".join(re.escape(n) for n in names) + r")\s*\}"] if names else []
    pattern = re.compile("|".join([*alternatives, r"\{\{", r"\}\}", r"\{", r"\}"]))

    def replace(match: re.Match[str]) -> str:
        if match.lastindex:  # a known placeholder
            return "{" + match.group(1) + "}"
        token = match.group(0)
        return token if len(token) == 2 else token * 2

    text = pattern.sub(replace, proposal.strip())
    if not set(names) <= set(_names(text)):
        text = f"{instruction_of(text) or text}\n\n{input_block(base)}".strip()
    return text


def _names(template: str) -> list[str]:
    try:
        return placeholders(template)
    except RegistryError:
        return []


def check(template: str, base: str, seen: set[str], max_chars: int) -> str | None:
    """``None`` when the candidate may be evaluated, else why it is discarded."""
    text = template.strip()
    if not text:
        return "empty"
    if len(text) > max_chars:
        return "too_long"
    try:
        names = placeholders(text)
    except RegistryError:
        return "invalid_template"
    if names != _names(base):
        return "placeholders_changed"
    if text in seen or text == base.strip():
        return "duplicate"
    return None


def demo_answer(example: Example, min_score: float) -> str | None:
    """What an example demonstrates: its correction, or its output when well rated."""
    return example.reference(min_score)


def _shot(block: str, example: Example, answer: str, max_chars: int) -> str:
    """One demonstration: the input block filled with the example, then its answer."""
    values = example.input if isinstance(example.input, dict) else {"input": example.input}
    clipped = {
        k: clip(as_text(v), max_chars) if not isinstance(v, str) else clip(v, max_chars)
        for k, v in values.items()
    }
    try:
        filled = block.format(**clipped).rstrip()
    except (KeyError, IndexError, ValueError, AttributeError, TypeError):
        filled = f"Input: {clip(as_text(example.input), max_chars)}\nOutput:"
    separator = " " if filled.endswith(":") else "\n"
    return filled + separator + clip(answer, max_chars)


def with_demos(template: str, demos: Sequence[Example], max_chars: int, min_score: float) -> str:
    """``template`` with its demonstrations block replaced by ``demos`` (braces escaped)."""
    parts = parse(template)
    shots = []
    for d in demos:
        answer = demo_answer(d, min_score)
        if answer is not None:
            shots.append(escape(_shot(parts.block, d, answer, max_chars)))
    if not shots:
        return Parts(parts.instruction, "", parts.block).assemble()
    block = "\n\n".join([DEMO_HEADING, *shots])
    return Parts(parts.instruction, block, parts.block).assemble()


def with_instruction(base: str, instruction: str) -> str:
    """``base`` with its instruction replaced (its demonstrations and input block kept)."""
    parts = parse(base)
    core = Parts(instruction, "", parts.block).assemble()
    fixed = parse(sanitize(core, Parts(parts.instruction, "", parts.block).assemble()))
    return Parts(fixed.instruction, parts.demos, fixed.block).assemble()
