"""Strategies: each turns the active template and production examples into candidates.

* ``fewshot`` — bootstrap demonstrations from well-rated examples (no LLM). They are
  appended after the template under a fixed heading (see :data:`DEMO_HEADING`), braces
  escaped so the demonstrations add no placeholders.
* ``instruction`` — a proposer model rewrites the template, shown the worst-rated
  examples with their feedback, comments and corrections (reflective, like GEPA), in
  ``n_candidates`` independent proposals per round (breadth) over ``depth`` rounds, each
  round seeing the previous proposals (like COPRO).
* ``gepa`` — delegates to the optional ``gepa`` package when it is installed.

Every proposal passes :func:`check_candidate`; rejected ones are counted by reason in
:attr:`StrategyResult.discarded`, never registered.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog

from promptd.daemon.optimize_config import OptimizationSettings
from promptd.daemon.optimize_llm import BudgetExceeded, LLMClient, LLMError
from promptd.replacement.registry import RegistryError, placeholders
from promptd.storage.examples import Example, as_text

log = structlog.get_logger("promptd.optimizer")

DEMO_HEADING: Final = "Examples of good answers:"
_TEMPLATE_RE: Final = re.compile(r"<template>\s*(.*?)\s*</template>", re.DOTALL)
_RATIONALE_RE: Final = re.compile(r"<rationale>\s*(.*?)\s*</rationale>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A proposed template with its provenance."""

    template: str
    strategy: str
    rationale: str


@dataclass
class StrategyResult:
    """Candidates of one strategy, what it discarded, and why it stopped early if it did."""

    candidates: list[Candidate] = field(default_factory=list)
    discarded: Counter[str] = field(default_factory=Counter)
    stopped: str | None = None
    note: str | None = None


@dataclass
class StrategyContext:
    """What a strategy sees: the active template, existing versions, examples, settings."""

    prompt: str
    run_id: str
    template: str
    existing_templates: set[str]
    best: list[Example]
    worst: list[Example]
    settings: OptimizationSettings
    llm: LLMClient | None


class Strategy(Protocol):
    """A producer of candidates."""

    name: str

    async def propose(self, ctx: StrategyContext) -> StrategyResult:
        """Candidates for ``ctx``; never raises for a bad proposal, only counts it."""
        ...


def check_candidate(template: str, ctx: StrategyContext, seen: set[str]) -> str | None:
    """``None`` when the candidate may be kept, else the reason it is discarded."""
    text = template.strip()
    if not text:
        return "empty"
    if len(text) > ctx.settings.max_template_chars:
        return "too_long"
    try:
        names = placeholders(text)
    except RegistryError:
        return "invalid_template"
    if names != placeholders(ctx.template):
        return "placeholders_changed"
    if text in ctx.existing_templates or text in seen or text == ctx.template.strip():
        return "duplicate"
    return None


def _keep(result: StrategyResult, ctx: StrategyContext, seen: set[str], cand: Candidate) -> None:
    reason = check_candidate(cand.template, ctx, seen)
    if reason is not None:
        result.discarded[reason] += 1
        log.info(
            "optimizer_candidate_discarded",
            prompt=ctx.prompt,
            run_id=ctx.run_id,
            strategy=cand.strategy,
            reason=reason,
        )
        return
    text = cand.template.strip()
    seen.add(text)
    result.candidates.append(Candidate(text, cand.strategy, cand.rationale))


def _escape(text: str) -> str:
    """Make text literal inside a ``str.format`` template."""
    return text.replace("{", "{{").replace("}", "}}")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def choose_demos(examples: Sequence[Example], k: int) -> list[Example]:
    """Up to ``k`` well-rated examples, deduplicated by input and spread out.

    Greedy max-min diversity on token sets (Jaccard distance): start from the best-rated
    example, then repeatedly take the one least similar to those already chosen, so the
    demonstrations cover different kinds of input rather than ``k`` near-copies.
    """
    unique: dict[str, Example] = {}
    for e in examples:
        unique.setdefault(as_text(e.input).strip().lower(), e)
    pool = list(unique.values())
    if not pool:
        return []
    chosen = [pool.pop(0)]
    while pool and len(chosen) < k:

        def distance(e: Example) -> float:
            tokens = _tokens(as_text(e.input))
            sims = []
            for c in chosen:
                other = _tokens(as_text(c.input))
                union = tokens | other
                sims.append(len(tokens & other) / len(union) if union else 1.0)
            return 1.0 - max(sims)

        best = max(pool, key=distance)
        pool.remove(best)
        chosen.append(best)
    return chosen


def render_demos(template: str, demos: Sequence[Example], max_chars: int) -> str:
    """The template followed by the demonstrations block (braces escaped)."""
    parts = [template.rstrip(), "", DEMO_HEADING]
    for d in demos:
        answer = d.correction if d.correction is not None else d.output
        parts.append("")
        parts.append("Input: " + _escape(_clip(as_text(d.input), max_chars)))
        parts.append("Output: " + _escape(_clip(as_text(answer), max_chars)))
    return "\n".join(parts)


class FewShot:
    """Bootstrap demonstrations from well-rated production examples."""

    name = "fewshot"

    async def propose(self, ctx: StrategyContext) -> StrategyResult:
        """One candidate with ``max_demos`` demonstrations and one with half as many."""
        result = StrategyResult()
        conf = ctx.settings.fewshot
        base = ctx.template.split("\n\n" + DEMO_HEADING, 1)[0]  # do not stack demo blocks
        demos = choose_demos([e for e in ctx.best if e.output is not None], conf.max_demos)
        if not demos:
            result.note = "no well-rated examples with captured output"
            return result
        seen: set[str] = set()
        for k in sorted({len(demos), max(1, len(demos) // 2)}, reverse=True):
            template = render_demos(base, demos[:k], conf.max_demo_chars)
            rationale = (
                f"{k} demonstrations from well-rated production examples "
                f"(mean score ≥ {conf.min_score})"
            )
            _keep(result, ctx, seen, Candidate(template, self.name, rationale))
        return result


PROPOSER_SYSTEM: Final = """You are an expert prompt engineer. You improve a prompt template \
used in production, based on real examples that users rated poorly and their feedback.
Rules:
- Keep every placeholder exactly as written, with its braces: {placeholders}. Add no new ones.
- Write literal braces as {{{{ and }}}}.
- Answer with the complete new template between <template> and </template>, then one \
sentence on what you changed between <rationale> and </rationale>."""


def _example_block(e: Example, limit: int) -> str:
    lines = [
        f"Input: {_clip(as_text(e.input), limit)}",
        f"Output: {_clip(as_text(e.output), limit)}",
        f"Score: {e.score:.2f} ({e.n_feedback} ratings)",
    ]
    if e.comments:
        lines.append(f"Feedback: {_clip(e.comments, limit)}")
    if e.correction is not None:
        lines.append(f"Correct answer: {_clip(as_text(e.correction), limit)}")
    return "\n".join(lines)


def proposer_messages(
    ctx: StrategyContext, attempt: int, previous: Sequence[Candidate]
) -> list[dict[str, str]]:
    """The proposer's chat messages for one proposal."""
    conf = ctx.settings.instruction
    names = ", ".join("{" + n + "}" for n in placeholders(ctx.template)) or "(none)"
    examples = "\n\n".join(
        _example_block(e, conf.max_example_chars) for e in ctx.worst[: conf.worst_examples]
    )
    user = [
        "Current template:",
        "<template>",
        ctx.template,
        "</template>",
        "",
        "Poorly rated production examples:",
        examples or "(none recorded)",
    ]
    if previous:
        user += ["", "Earlier proposals (improve on them, do not repeat them):"]
        user += [f"<template>\n{c.template}\n</template>" for c in previous]
    user += ["", f"Proposal {attempt + 1}: propose a different, improved template."]
    return [
        {"role": "system", "content": PROPOSER_SYSTEM.replace("{placeholders}", names)},
        {"role": "user", "content": "\n".join(user)},
    ]


def parse_proposal(text: str) -> tuple[str, str] | None:
    """``(template, rationale)`` from a proposer answer, ``None`` when malformed."""
    found = _TEMPLATE_RE.search(text)
    if found is None:
        return None
    why = _RATIONALE_RE.search(text)
    return found.group(1), (why.group(1) if why else "instruction rewrite")


class Instruction:
    """Instruction rewrites proposed by an LLM from the worst-rated examples."""

    name = "instruction"

    async def propose(self, ctx: StrategyContext) -> StrategyResult:
        """``n_candidates`` proposals per round for ``depth`` rounds, within the budget."""
        result = StrategyResult()
        proposer = ctx.settings.proposer
        if proposer is None or ctx.llm is None:
            result.note = "no proposer model configured ([optimization.proposer] model)"
            return result
        conf = ctx.settings.instruction
        seen: set[str] = set()
        previous: list[Candidate] = []
        try:
            for _round in range(conf.depth):
                messages = [proposer_messages(ctx, i, previous) for i in range(conf.n_candidates)]
                answers = await asyncio.gather(
                    *(ctx.llm.complete(proposer, m, "proposer") for m in messages),
                    return_exceptions=True,
                )
                round_candidates = []
                for answer in answers:
                    if isinstance(answer, BudgetExceeded):
                        result.stopped = str(answer)
                        continue
                    if isinstance(answer, LLMError):
                        result.discarded["llm_error"] += 1
                        log.warning(
                            "optimizer_proposer_failed", run_id=ctx.run_id, error=str(answer)
                        )
                        continue
                    if isinstance(answer, BaseException):
                        raise answer
                    parsed = parse_proposal(answer)
                    if parsed is None:
                        result.discarded["malformed"] += 1
                        continue
                    before = len(result.candidates)
                    _keep(result, ctx, seen, Candidate(parsed[0], self.name, parsed[1]))
                    round_candidates.extend(result.candidates[before:])
                previous = round_candidates or previous
                if result.stopped:
                    break
        except BudgetExceeded as exc:  # pragma: no cover - gather returns it instead
            result.stopped = str(exc)
        return result


class Gepa:
    """Delegate to the optional ``gepa`` package (reflective evolutionary search)."""

    name = "gepa"

    @staticmethod
    def available() -> bool:
        """True when ``gepa`` can be imported."""
        return importlib.util.find_spec("gepa") is not None

    async def propose(self, ctx: StrategyContext) -> StrategyResult:
        """The best template GEPA finds on the production examples, or a clear note."""
        result = StrategyResult()
        if not self.available():
            result.note = "the gepa strategy needs the optional package: pip install gepa"
            return result
        proposer = ctx.settings.proposer
        task = ctx.settings.evaluation.model or proposer
        if proposer is None or task is None:
            result.note = "gepa needs [optimization.proposer] (and ideally evaluation.model)"
            return result
        data = [_gepa_instance(e) for e in ctx.best + ctx.worst if e.reference or e.output]
        if len(data) < 2:
            result.note = "gepa needs at least two examples with an answer"
            return result
        half = max(1, len(data) // 2)
        calls = max(1, ctx.settings.max_llm_calls)

        def run() -> Any:
            gepa = importlib.import_module("gepa")
            return gepa.optimize(
                seed_candidate={"system_prompt": ctx.template},
                trainset=data[:half],
                valset=data[half:],
                task_lm=task.model,
                reflection_lm=proposer.model,
                max_metric_calls=calls,
            )

        # gepa is synchronous; keep it off the event loop.
        outcome = await asyncio.to_thread(run)
        best = getattr(outcome, "best_candidate", None) or {}
        template = best.get("system_prompt") if isinstance(best, dict) else None
        if isinstance(template, str):
            _keep(result, ctx, set(), Candidate(template, self.name, "GEPA reflective search"))
        return result


def _gepa_instance(e: Example) -> dict[str, Any]:
    answer = e.reference or as_text(e.output)
    return {"input": as_text(e.input), "additional_context": {}, "answer": answer}


STRATEGIES: Final[dict[str, type[FewShot] | type[Instruction] | type[Gepa]]] = {
    "fewshot": FewShot,
    "instruction": Instruction,
    "gepa": Gepa,
}


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; ``KeyError`` naming the known ones."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}") from None
