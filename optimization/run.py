"""One optimization run: examples, splits, search, selection, gate — with checkpoints.

A run is fixed by its :class:`RunPlan` (persisted when it starts): the prompt, the
active template it starts from, the strategies, a seed and the example snapshot. Given
the plan, the run is deterministic up to the models' answers, and every answer is
persisted as it arrives (see :class:`~promptd.optimization.llm.CachedLLM`). A run that
a restart interrupted is therefore resumed by executing its plan again: everything it
had done replays from the cache at no cost, and it continues where it stopped.

Phases (``phase`` in the run row):

1. ``examples`` — the prompt's examples within the snapshot, split by ``request_id``
   hash into train / validation / test; only usable examples count (see the evaluator);
2. ``baseline`` — the active template on the validation split;
3. ``search`` — each strategy proposes and scores candidates on validation; a share of
   the budget (what the gate needs) is held back;
4. ``gate`` — the single candidate with the best validation mean, if it beats the
   active template there, against the active template on the untouched test split.

Outcomes: ``gate_passed``, ``gate_failed``, ``no_improvement_on_validation``,
``no_candidate``, ``not_enough_examples``, ``budget_exhausted`` and, without an
evaluation model, ``proposed`` (the runner then lets an online rollout decide).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from promptd.optimization.config import OptimizationSettings
from promptd.optimization.evaluator import Evaluator
from promptd.optimization.examples import Example, ExampleStore, Snapshot, Splits, split
from promptd.optimization.gate import GateResult, decide
from promptd.optimization.llm import Budget, BudgetExceeded, CachedLLM, LLMClient
from promptd.optimization.program import Program, seen_key
from promptd.optimization.store import OptimizationStore
from promptd.optimization.strategies import get_strategy
from promptd.optimization.strategies.base import Candidate, SearchContext, SearchResult

log = structlog.get_logger("promptd.optimizer")


@dataclass(frozen=True)
class RunPlan:
    """Everything that fixes a run (persisted at its start, read back on resume)."""

    run_id: str
    prompt: str
    trigger_kind: str
    trigger_reason: str
    strategies: tuple[str, ...]
    selection: dict[str, Any]
    seed: int
    snapshot: Snapshot
    parent_version: str
    baseline: Program
    started_at: float
    elapsed_s: float = 0.0
    resumes: int = 0


@dataclass
class RunProgress:
    """What a run has found so far; checkpointed into its row."""

    phase: str = "examples"
    splits: dict[str, int] = field(default_factory=dict)
    baseline_val_mean: float | None = None
    candidates: list[Candidate] = field(default_factory=list)
    discarded: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    selected: int | None = None
    gate: GateResult | None = None
    outcome: str = "none"

    @property
    def chosen(self) -> Candidate | None:
        """The selected candidate."""
        return None if self.selected is None else self.candidates[self.selected]

    def progress_json(self, baseline: Program) -> dict[str, Any]:
        """The ``progress`` column."""
        return {
            "phase": self.phase,
            "splits": self.splits,
            "baseline_val_mean": self.baseline_val_mean,
            "baseline_template": baseline.template,
            "selected": self.selected,
            "notes": self.notes,
        }


Checkpoint = Callable[[RunProgress, Budget], Awaitable[None]]
Notify = Callable[[str, dict[str, Any]], Awaitable[None]]


class RunExecution:
    """Executes a :class:`RunPlan` once (again, after a restart)."""

    def __init__(
        self,
        plan: RunPlan,
        settings: OptimizationSettings,
        store: OptimizationStore,
        examples: ExampleStore,
        client: LLMClient,
        checkpoint: Checkpoint,
        notify: Notify,
        known: set[str] | None = None,
    ) -> None:
        self.plan = plan
        # Programs registered before (any status): not proposed again.
        self.known = known or set()
        self.settings = settings
        self.store = store
        self.examples = examples
        self.client = client
        self.checkpoint = checkpoint
        self.notify = notify
        self.progress = RunProgress()
        self.budget = Budget(settings.max_llm_calls, settings.max_cost_usd, settings.max_tokens)
        self.llm: CachedLLM | None = None

    async def execute(self) -> RunProgress:
        """Run every phase; the progress says how it ended (``outcome``)."""
        plan, settings = self.plan, self.settings
        spent = await self.store.spend(plan.run_id)
        self.budget.spend(spent.calls, spent.tokens, spent.cost_usd)
        self.budget.deadline = time.monotonic() + max(settings.timeout_s - plan.elapsed_s, 0.0)
        self.llm = CachedLLM(
            self.client, self.store, self.budget, plan.run_id, settings.max_concurrency
        )
        pool = await self.examples.examples(plan.prompt, plan.snapshot)
        splits = split(
            pool, settings.splits.salt, settings.splits.train, settings.splits.validation
        )
        if settings.evaluation.model is None:
            return await self._propose_only(splits)
        evaluator = Evaluator(self.llm, settings.evaluation)
        validation, test = self._usable(evaluator, splits)
        self.progress.splits = {
            "examples": len(pool),
            "train": len(splits.train),
            "validation": len(validation),
            "test": len(test),
        }
        limits = settings.splits
        if len(validation) < limits.min_validation or len(test) < limits.min_test:
            self.progress.notes.append(
                f"{len(validation)} usable validation and {len(test)} test examples; "
                f"need {limits.min_validation} and {limits.min_test} (examples need captured "
                "input and a correct answer: a correction, or an output rated at least "
                f"{settings.evaluation.reference_min_score})"
            )
            return await self._end("not_enough_examples")
        self._hold_back_for_gate(len(test), evaluator)
        try:
            await self._phase("baseline")
            baseline_scores = await evaluator.scores(plan.baseline, validation)
        except BudgetExceeded as exc:
            self.progress.notes.append(f"baseline: {exc}")
            return await self._end("budget_exhausted")
        self.progress.baseline_val_mean = float(np.mean(baseline_scores))
        await self._phase("search")
        await self._search(splits.train, validation, evaluator)
        best = self._select()
        if best is None:
            return await self._end("no_candidate")
        if best.val_mean is None or best.val_mean <= self.progress.baseline_val_mean:
            self.progress.notes.append(
                f"best validation mean {best.val_mean:.4f} does not beat the active "
                f"version's {self.progress.baseline_val_mean:.4f}"
            )
            return await self._end("no_improvement_on_validation")
        return await self._gate(best, test, evaluator)

    def _usable(
        self, evaluator: Evaluator, splits: Splits[Example]
    ) -> tuple[list[Example], list[Example]]:
        limits = self.settings.splits
        base = self.plan.baseline
        validation = [e for e in splits.validation if evaluator.usable(e, base)]
        test = [e for e in splits.test if evaluator.usable(e, base)]
        return validation[: limits.max_validation], test[: limits.max_test]

    def _hold_back_for_gate(self, n_test: int, evaluator: Evaluator) -> None:
        per_example = 2 if evaluator.metric is None else 1  # the judge doubles the calls
        share = 2 * n_test * per_example / max(self.settings.max_llm_calls, 1)
        self.budget.hold_back(share, self.settings.timeout_s * min(share, 0.5))

    async def _search(
        self, train: list[Example], validation: list[Example], evaluator: Evaluator
    ) -> None:
        seen = {seen_key(self.plan.baseline), *self.known}
        ctx = SearchContext(
            run_id=self.plan.run_id,
            prompt=self.plan.prompt,
            seed=self.plan.seed,
            baseline=self.plan.baseline,
            train=train,
            validation=validation,
            evaluator=evaluator,
            llm=self.llm,
            settings=self.settings,
            seen=seen,
            on_candidate=self._candidate,
            baseline_val_mean=self.progress.baseline_val_mean or 0.0,
        )
        for name in self.plan.strategies:
            try:
                result = await get_strategy(name).search(ctx)
            except BudgetExceeded as exc:
                result = SearchResult(stopped=str(exc))
            self._collect(name, result)
            if result.stopped:
                break

    def _collect(self, name: str, result: SearchResult) -> None:
        for reason, count in result.discarded.items():
            self.progress.discarded[f"{name}:{reason}"] += count
        for note in [*result.notes, *([result.stopped] if result.stopped else [])]:
            self.progress.notes.append(f"{name}: {note}")
            log.info(
                "optimization_strategy_note", run_id=self.plan.run_id, strategy=name, note=note
            )

    async def _candidate(self, cand: Candidate) -> None:
        cand.index = len(self.progress.candidates)
        self.progress.candidates.append(cand)
        await self.checkpoint(self.progress, self.budget)
        await self.notify("candidate_evaluated", cand.summary())

    def _select(self) -> Candidate | None:
        scored = [c for c in self.progress.candidates if c.val_mean is not None]
        if not scored:
            return None
        # Highest validation mean; the earliest wins ties (stable across replays).
        best = max(scored, key=lambda c: (c.val_mean, -c.index))
        self.progress.selected = best.index
        return best

    async def _gate(
        self, best: Candidate, test: list[Example], evaluator: Evaluator
    ) -> RunProgress:
        await self._phase("gate")
        self.budget.release()
        try:
            candidate = await evaluator.scores(best.program, test)
            baseline = await evaluator.scores(self.plan.baseline, test)
        except BudgetExceeded as exc:
            self.progress.notes.append(f"gate: {exc}")
            return await self._end("budget_exhausted")
        result = decide(
            candidate,
            baseline,
            min_confidence=self.settings.min_confidence_for_deployment,
            min_gain=self.settings.min_gain,
            samples=self.settings.evaluation.bootstrap_samples,
            seed=self.plan.seed,
            min_examples=self.settings.splits.min_test,
        )
        self.progress.gate = result
        await self.notify("gate_decided", {"candidate": best.index, **result.to_dict()})
        return await self._end("gate_passed" if result.passed else "gate_failed")

    async def _propose_only(self, splits: Splits[Example]) -> RunProgress:
        """No evaluation model: propose without scoring; the online rollout decides."""
        self.progress.splits = {"train": len(splits.train)}
        await self._phase("search")
        ctx = SearchContext(
            run_id=self.plan.run_id,
            prompt=self.plan.prompt,
            seed=self.plan.seed,
            baseline=self.plan.baseline,
            train=[*splits.train, *splits.validation],
            validation=[],
            evaluator=None,
            llm=None,
            settings=self.settings,
            seen={seen_key(self.plan.baseline), *self.known},
            on_candidate=self._candidate,
        )
        for name in self.plan.strategies:
            self._collect(name, await get_strategy(name).search(ctx))
            if self.progress.candidates:
                self.progress.selected = 0
                return await self._end("proposed")
        return await self._end("no_candidate")

    async def _phase(self, phase: str) -> None:
        self.progress.phase = phase
        await self.checkpoint(self.progress, self.budget)

    async def _end(self, outcome: str) -> RunProgress:
        self.progress.outcome = outcome
        self.progress.phase = "done"
        return self.progress
