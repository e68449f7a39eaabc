"""What every search strategy gets and returns.

A strategy proposes programs (templates or chat configurations, see
:mod:`~promptd.optimization.program`) and scores each on the validation split through the
run's one :class:`~promptd.optimization.evaluator.Evaluator` (via
:meth:`SearchContext.evaluate`, which also checks the candidate, de-duplicates it and
checkpoints it). It never sees the
test split. It returns every candidate it scored; the runner selects the one with the
best validation mean, and only that one meets the gate.

Randomness comes from :meth:`SearchContext.rng`, seeded by the run, and proposer calls
carry a nonce naming their place in the run: the same run replays the same search, which
is how a resumed run finds every answer it already paid for in the call cache.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import numpy as np
import structlog

from promptd.demos import as_text
from promptd.optimization.config import OptimizationSettings
from promptd.optimization.evaluator import Scorer
from promptd.optimization.examples import Example
from promptd.optimization.llm import CachedLLM, Message
from promptd.optimization.pools import DemoPools
from promptd.optimization.program import Program, check, seen_key
from promptd.optimization.templates import clip

log = structlog.get_logger("promptd.optimizer")


@dataclass
class Candidate:
    """A proposed program, its provenance and its validation score."""

    program: Program
    strategy: str
    rationale: str
    val_mean: float | None = None
    val_n: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    index: int = -1
    # Per-example validation scores (what selection compares candidates by).
    val_scores: tuple[float, ...] = ()

    def summary(self) -> dict[str, Any]:
        """JSON form for the run row and events (template included)."""
        return {
            "index": self.index,
            "strategy": self.strategy,
            "rationale": self.rationale[:2_000],
            "template": self.program.template,
            "config": self.program.to_config() if self.program.chat else None,
            "val_mean": None if self.val_mean is None else round(self.val_mean, 6),
            "val_n": self.val_n,
            "details": self.details,
        }


@dataclass
class SearchResult:
    """What a strategy found, what it threw away, and why it stopped early if it did."""

    candidates: list[Candidate] = field(default_factory=list)
    discarded: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    stopped: str | None = None


CandidateHook = Callable[[Candidate], Awaitable[None]]
# Receives every scoring of a program (a trial), for the run's record.
TrialHook = Callable[[dict[str, Any]], Awaitable[None]]


class SearchContext:
    """The run as a strategy sees it."""

    def __init__(
        self,
        *,
        run_id: str,
        prompt: str,
        seed: int,
        baseline: Program,
        train: Sequence[Example],
        validation: Sequence[Any],
        evaluator: Scorer | None,
        llm: CachedLLM | None,
        settings: OptimizationSettings,
        seen: set[str],
        on_candidate: CandidateHook,
        baseline_val_mean: float = 0.0,
        on_trial: TrialHook | None = None,
        pools: DemoPools | None = None,
    ) -> None:
        self.run_id = run_id
        self.prompt = prompt
        self.seed = seed
        self.baseline = baseline
        self.train = list(train)
        self.validation = list(validation)
        self.evaluator = evaluator
        self.llm = llm
        self.settings = settings
        self.seen = seen
        self.on_candidate = on_candidate
        # The validation mean of ``baseline`` (what proposers are told it scored).
        self.baseline_val_mean = baseline_val_mean
        self.on_trial = on_trial
        # The run's demonstration pools (for strategies that retrieve demos per input).
        self.pools = pools

    def rng(self, *tags: str) -> random.Random:
        """A generator seeded by the run and ``tags`` (same run, same draws)."""
        digest = hashlib.sha256(f"{self.seed}:{':'.join(tags)}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    @property
    def min_score(self) -> float:
        """Rating at which an example's own output counts as a correct answer."""
        return self.settings.fewshot.min_score

    def demo_pool(self) -> list[Example]:
        """Training examples with a trusted answer, one per distinct input."""
        unique: dict[str, Example] = {}
        for e in self.train:
            if e.reference(self.min_score) is None:
                continue
            unique.setdefault(as_text(e.input).strip().lower(), e)
        return list(unique.values())

    def teaching_examples(self, n: int) -> list[Example]:
        """Training examples for the proposer: corrected and poorly rated ones first."""
        ranked = sorted(
            self.train,
            key=lambda e: (e.correction is None, e.score, e.request_id),
        )
        return ranked[:n]

    async def evaluate(
        self,
        program: Program,
        strategy: str,
        rationale: str,
        result: SearchResult,
        details: dict[str, Any] | None = None,
    ) -> Candidate | None:
        """Check ``program``, score it on the validation split, checkpoint it.

        Returns ``None`` (counting the reason) for a candidate that is invalid or was
        tried before; raises :class:`BudgetExceeded` when the budget runs out first.
        Without an evaluation model the candidate is kept unscored.
        """
        reason = check(program, self.baseline, self.seen, self.settings.max_template_chars)
        if reason is not None:
            result.discarded[reason] += 1
            log.info(
                "optimizer_candidate_discarded",
                run_id=self.run_id,
                strategy=strategy,
                reason=reason,
            )
            return None
        if not program.chat:
            program = Program.text(program.template.strip())
        self.seen.add(seen_key(program))
        cand = Candidate(program, strategy, rationale, details=details or {})
        if self.evaluator is not None:
            scores = await self.evaluator.scores(program, self.validation)
            cand.val_mean = float(np.mean(scores)) if scores else 0.0
            cand.val_n = len(scores)
            cand.val_scores = tuple(scores)
            await self.record(strategy, "validation", scores, {"rationale": rationale[:300]})
        await self.on_candidate(cand)
        result.candidates.append(cand)
        return cand

    async def record(
        self, strategy: str, kind: str, scores: Sequence[float], details: dict[str, Any]
    ) -> None:
        """Record one trial (a scoring of a program) in the run."""
        if self.on_trial is None:
            return
        mean = float(np.mean(scores)) if len(scores) else 0.0
        await self.on_trial(
            {
                "step": self.prompt,
                "strategy": strategy,
                "kind": kind,
                "n": len(scores),
                "mean": round(mean, 6),
                "details": details,
            }
        )

    def remaining_calls(self) -> float:
        """Paid calls the search may still make (infinite without a model client)."""
        if self.llm is None:
            return float("inf")
        return self.llm.budget.remaining_calls()

    async def trial(
        self, program: Program, examples: Sequence[Any], strategy: str, details: dict[str, Any]
    ) -> float:
        """Mean validation score of ``program`` on a subset (MIPRO's trials), recorded."""
        assert self.evaluator is not None
        scores = await self.evaluator.scores(program, examples)
        await self.record(strategy, "minibatch", scores, details)
        return float(np.mean(scores)) if scores else 0.0

    async def propose(self, messages: list[Message], nonce: str) -> str:
        """One proposer answer; ``nonce`` names its place in the run (see module doc)."""
        assert self.llm is not None
        assert self.settings.proposer is not None
        return await self.llm.complete(
            self.settings.proposer, messages, "proposer", nonce=f"{self.run_id}:{nonce}"
        )


def needs_models(settings: OptimizationSettings) -> str | None:
    """Why a strategy that proposes and scores cannot run, or ``None`` when it can."""
    if settings.proposer is None:
        return "no proposer model configured ([optimization.proposer] model)"
    if settings.evaluation.model is None:
        return "no evaluation model configured ([optimization.evaluation.model])"
    return None


class Strategy(Protocol):
    """A search over programs.

    A class attribute ``pipelines = True`` says it can also search one step of a
    pipeline, where every score is end to end on episodes and the step's examples are
    the episodes' calls; without it, a strategy is for single prompts only.
    """

    name: str

    def unavailable(self, settings: OptimizationSettings) -> str | None:
        """Why this strategy cannot run with ``settings``, or ``None`` when it can."""
        ...

    async def search(self, ctx: SearchContext) -> SearchResult:
        """Propose and score candidates; never raises for a bad proposal, only counts it.

        May raise :class:`~promptd.optimization.llm.BudgetExceeded` (the runner keeps
        what was scored before it).
        """
        ...


# -- proposals shared by instruction-writing strategies ------------------------------------

PROPOSER_SYSTEM: Final = (
    "You are an expert prompt engineer. You write the instruction that tells a language "
    "model how to do a task. The input is added after your instruction automatically."
)

# Varied asks make proposals diverse even at temperature 0 (MIPROv2's "tips").
TIPS: Final = (
    "Be precise about the exact form of the answer.",
    "Keep it short and direct.",
    "Say what the model must not do, based on the mistakes above.",
    "Describe the task step by step.",
    "Give the model a clear role and goal.",
    "Name the kind of input and what to look for in it.",
)

_INSTRUCTION_RE: Final = re.compile(r"<instruction>\s*(.*?)\s*</instruction>", re.DOTALL | re.I)
_OPEN_RE: Final = re.compile(r"<instruction>\s*(.*)", re.DOTALL | re.I)
_PREFIX_RE: Final = re.compile(r"^(new instruction|instruction)\s*:\s*", re.I)


def example_lines(e: Example, limit: int, min_score: float) -> list[str]:
    """How an example is shown to the proposer."""
    lines = [
        f"Input: {clip(as_text(e.input), limit)}",
        f"Model's answer: {clip(as_text(e.output), limit)}",
        f"Rating: {e.score:.2f}",
    ]
    reference = e.reference(min_score)
    if reference is not None:
        lines.append(f"Correct answer: {clip(reference, limit)}")
    if e.comments:
        lines.append(f"Feedback: {clip(e.comments, limit)}")
    return lines


def proposal_messages(
    ctx: SearchContext,
    current: str,
    tried: Sequence[tuple[str, float]],
    tip: str,
    n_examples: int,
) -> list[Message]:
    """The proposer's messages: the task as the model sees it, examples, earlier scores."""
    limit = ctx.settings.instruction.max_example_chars
    blocks = [
        "The model receives this prompt (instruction first, then the input):",
        "---",
        ctx.baseline.without_demos().template,
        "---",
        "",
        f"Current instruction: {current or '(none)'}",
    ]
    examples = ctx.teaching_examples(n_examples)
    if examples:
        blocks += ["", "Examples from production:"]
        for e in examples:
            blocks += ["", *example_lines(e, limit, ctx.min_score)]
    if tried:
        blocks += ["", "Instructions tried so far, with their scores (0 to 1, higher is better):"]
        for text, score in sorted(tried, key=lambda t: t[1]):
            blocks.append(f"Score {score:.2f}: {clip(text, limit)}")
        blocks.append("Write a better instruction than all of these.")
    blocks += [
        "",
        f"Write a new instruction for this task. {tip}",
        "Reply with only the new instruction between <instruction> and </instruction>.",
    ]
    return [
        {"role": "system", "content": PROPOSER_SYSTEM},
        {"role": "user", "content": "\n".join(blocks)},
    ]


def parse_instruction(answer: str) -> str | None:
    """The instruction in a proposer answer (the last tagged one; small models often
    forget the closing tag or the tags altogether), or ``None`` when there is none."""
    found = _INSTRUCTION_RE.findall(answer)
    if found:
        text = found[-1]
    else:
        opened = _OPEN_RE.search(answer)
        text = opened.group(1) if opened else answer
    text = _PREFIX_RE.sub("", text.strip().strip("`").strip()).strip()
    return text or None
