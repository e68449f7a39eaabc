"""One optimization run, for a prompt or a pipeline alike: its phases, with checkpoints.

A run is fixed by its :class:`~promptd.optimization.plan.RunPlan` (persisted when it
starts). Given the plan, the run is deterministic up to the models' answers, and every
answer is persisted as it arrives (see :class:`~promptd.optimization.llm.CachedLLM`). A
run that a restart interrupted is therefore resumed by executing its plan again:
everything it had done replays from the cache at no cost, and it continues where it
stopped. What depends on the target (one prompt's calls or a pipeline's episodes, how
programs are scored, how the search goes) is the target's
(:mod:`promptd.optimization.targets`); the phases are one:

1. ``examples`` — the target's data within the snapshot, split by a hash of its id into
   train / validation / test; only data that can score the active programs counts;
2. ``baseline`` — the active programs on the validation split;
3. ``search`` — the target's search proposes candidates (a program for every step) and
   scores each on validation; what the gate needs of the budget is held back, the
   judge's calls included;
4. ``select`` — among the candidates that beat the active programs on validation, the
   best, unless another is within the validation noise of it and closer to the active
   version (:mod:`promptd.optimization.candidates`);
5. ``gate`` — that one candidate against the active programs on the untouched test split.

The hand-off of a gated candidate is :mod:`promptd.optimization.handoff`'s. Outcomes are
:class:`~promptd.optimization.outcomes.Outcome` values; without an evaluation model a
prompt's run proposes a candidate unscored (``proposed``) and says so.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from promptd.optimization import candidates as selection
from promptd.optimization.embeddings import RunEmbeddings
from promptd.optimization.evaluator import Evaluator
from promptd.optimization.examples import split_of
from promptd.optimization.gate import GateResult, decide
from promptd.optimization.llm import Budget, BudgetExceeded, CachedLLM
from promptd.optimization.outcomes import Outcome
from promptd.optimization.plan import RunPlan
from promptd.optimization.pools import DemoPools
from promptd.optimization.program import Program
from promptd.optimization.services import RunServices
from promptd.optimization.stackelberg import Equilibrium, Response
from promptd.optimization.strategies.base import Candidate, SearchResult
from promptd.optimization.targets import Data, PipelineTarget, PromptTarget
from promptd.storage.pools import PoolStore

log = structlog.get_logger("promptd.optimizer")

# Trials are checkpointed at most this often (candidates and phases always are).
TRIAL_CHECKPOINT_S = 1.0
UNSCORED = (
    "the candidate is unscored: no evaluation model is configured "
    "([optimization.evaluation.model] would score it on validation and gate it on test)"
)


@dataclass
class RunCandidate:
    """A candidate of the run: a program for every step, scored on validation."""

    programs: dict[str, Program]
    strategy: str
    rationale: str
    scores: tuple[float, ...]
    index: int
    details: dict[str, Any] = field(default_factory=dict)
    scored: bool = True

    @property
    def val_mean(self) -> float | None:
        """Validation mean (``None`` when unscored)."""
        return float(np.mean(self.scores)) if self.scored and self.scores else None

    def summary(self, active: Mapping[str, Program]) -> dict[str, Any]:
        """JSON form for the run row and events (the changed templates included)."""
        changed = {p: prog for p, prog in self.programs.items() if prog != active[p]}
        if len(active) == 1:
            [program] = self.programs.values()
            template = program.template
            config = program.to_config() if program.chat else None
        else:
            template = "\n\n".join(f"[{p}]\n{prog.template}" for p, prog in changed.items())
            config = None
        mean = self.val_mean
        return {
            "index": self.index,
            "strategy": self.strategy,
            "rationale": self.rationale[:2_000],
            "template": template,
            "config": config,
            "steps": sorted(changed),
            "val_mean": None if mean is None else round(mean, 6),
            "val_n": len(self.scores),
            "details": self.details,
        }


@dataclass
class RunProgress:
    """What a run has found so far; checkpointed into its row."""

    phase: str = "examples"
    splits: dict[str, int] = field(default_factory=dict)
    baseline_scores: tuple[float, ...] = ()
    candidates: list[RunCandidate] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)
    discarded: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    selected: int | None = None
    equilibrium: dict[str, Any] | None = None
    gate: GateResult | None = None
    unscored: bool = False
    outcome: Outcome = Outcome.NONE

    @property
    def baseline_val_mean(self) -> float | None:
        """The active programs' validation mean, once scored."""
        return float(np.mean(self.baseline_scores)) if self.baseline_scores else None

    @property
    def chosen(self) -> RunCandidate | None:
        """The selected candidate."""
        return None if self.selected is None else self.candidates[self.selected]

    def progress_json(self, plan: RunPlan) -> dict[str, Any]:
        """The ``progress`` column."""
        active = plan.active
        chosen = self.chosen
        return {
            "phase": self.phase,
            "splits": self.splits,
            "baseline_val_mean": self.baseline_val_mean,
            "baseline_template": "\n\n".join(
                prog.template if len(active) == 1 else f"[{p}]\n{prog.template}"
                for p, prog in active.items()
            ),
            "selected": self.selected,
            "chosen": None
            if chosen is None
            else {p: prog.template for p, prog in chosen.programs.items() if prog != active[p]},
            "unscored": self.unscored,
            "equilibrium": self.equilibrium,
            "trials": self.trials,
            "notes": self.notes,
        }


Checkpoint = Callable[[RunProgress, Budget], Awaitable[None]]
Notify = Callable[[str, dict[str, Any]], Awaitable[None]]


class RunExecution:
    """Executes a :class:`RunPlan` once (again, after a restart)."""

    def __init__(
        self,
        plan: RunPlan,
        services: RunServices,
        checkpoint: Checkpoint,
        notify: Notify,
        known: Mapping[str, set[str]] | None = None,
    ) -> None:
        self.plan = plan
        self.services = services
        self.settings = services.settings
        self.checkpoint = checkpoint
        self.notify = notify
        # Per step: programs registered before (any status, not by this run).
        self.known: Mapping[str, set[str]] = known or {}
        self.progress = RunProgress()
        b = plan.budget
        self.budget = Budget(b.llm_calls, b.cost_usd, b.tokens)
        self.llm: CachedLLM | None = None
        self._last_trial_checkpoint = 0.0
        if plan.pipeline is not None:
            assert services.episodes is not None, "a pipeline run needs an episode source"
            self.target: PromptTarget | PipelineTarget = PipelineTarget(
                plan, services.episodes, self.settings
            )
        else:
            self.target = PromptTarget(plan, services.examples, self.settings)

    # -- the phases --------------------------------------------------------------------

    async def execute(self) -> RunProgress:
        """Run every phase; the progress says how it ended (``outcome``)."""
        plan, settings = self.plan, self.settings
        store = self.services.store
        spent = await store.spend(plan.run_id)
        self.budget.spend(spent.calls, spent.tokens, spent.cost_usd)
        self.budget.deadline = time.monotonic() + plan.remaining_s
        self.llm = CachedLLM(
            self.services.client_factory(),
            store,
            self.budget,
            plan.run_id,
            settings.max_concurrency,
        )
        if settings.evaluation.model is None:
            return await self._without_evaluation()
        evaluator = Evaluator(self.llm, settings.evaluation, self._pools())
        data = await self.target.data(evaluator)
        self.progress.splits = data.sizes
        limits = settings.splits
        if len(data.validation) < limits.min_validation or len(data.test) < limits.min_test:
            self.progress.notes.append(
                f"{len(data.validation)} usable validation and {len(data.test)} test "
                f"examples; need {limits.min_validation} and {limits.min_test} ({data.needs})"
            )
            return self._end(Outcome.NOT_ENOUGH_EXAMPLES)
        self._hold_back_for_gate(len(data.test), evaluator)
        try:
            await self._phase("baseline")
            scores = await self.target.scores(plan.active, data.validation)
        except BudgetExceeded as exc:
            self.progress.notes.append(f"baseline: {exc}")
            return self._end(Outcome.BUDGET_EXHAUSTED)
        self.progress.baseline_scores = tuple(scores)
        await self._phase("search")
        await self.target.search(data, self)
        return await self._select_and_gate(data)

    def _pools(self) -> DemoPools:
        """The run's demonstration pools: stored snapshots, retrieval from the train
        split only, embeddings through the run's budget when a model is configured."""
        assert self.llm is not None
        splits, knn = self.settings.splits, self.settings.knn
        embeddings = None if knn.embedding is None else RunEmbeddings(self.llm, knn.embedding)
        return DemoPools(
            PoolStore(self.services.store.db),
            self.plan.prompt,
            lambda rid: split_of(rid, splits.salt, splits.train, splits.validation) == "train",
            embeddings,
        )

    def _hold_back_for_gate(self, n_test: int, evaluator: Evaluator) -> None:
        """Reserve what the gate pays: both programs answer every test example through
        every step, and a judge scores each final answer (a candidate voting over ``n``
        samples pays ``n`` answers)."""
        per_example: float = self.target.calls_per_example + (1 if evaluator.metric is None else 0)
        knn = self.settings.knn
        if "knn" in self.plan.strategies and knn.ensemble_n > 1:
            per_example *= (1 + knn.ensemble_n) / 2
        share = 2 * n_test * per_example / max(self.budget.max_calls, 1)
        self.budget.hold_back(share, self.plan.budget.timeout_s * min(share, 0.5))

    async def _select_and_gate(self, data: Data) -> RunProgress:
        if not any(c.scored for c in self.progress.candidates):
            return self._end(Outcome.NO_CANDIDATE)
        picked = self._select()
        if picked is None:
            best = max(c.val_mean or 0.0 for c in self.progress.candidates)
            self.progress.notes.append(
                f"best validation mean {best:.4f} does not beat the active "
                f"version's {self.progress.baseline_val_mean or 0.0:.4f}"
            )
            return self._end(Outcome.NO_IMPROVEMENT)
        await self._phase("gate")
        self.budget.release()
        try:
            candidate = await self.target.scores(picked.programs, data.test)
            baseline = await self.target.scores(self.plan.active, data.test)
        except BudgetExceeded as exc:
            self.progress.notes.append(f"gate: {exc}")
            return self._end(Outcome.BUDGET_EXHAUSTED)
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
        await self.notify("gate_decided", {"candidate": picked.index, **result.to_dict()})
        return self._end(Outcome.GATE_PASSED if result.passed else Outcome.GATE_FAILED)

    def _select(self) -> RunCandidate | None:
        """The candidate to gate (see :mod:`promptd.optimization.candidates`)."""
        active = self.plan.active
        pool = [c for c in self.progress.candidates if c.scored and c.programs != active]
        picked = selection.select(
            [
                selection.Option(c.scores, selection.total_distance(c.programs, active))
                for c in pool
            ],
            self.progress.baseline_scores,
            self.settings.candidate_tolerance_se,
        )
        if picked is None:
            return None
        chosen = pool[picked.index]
        self.progress.selected = chosen.index
        self.progress.notes.append(f"selected candidate {chosen.index}: {picked.reason}")
        return chosen

    async def _without_evaluation(self) -> RunProgress:
        """No evaluation model: propose without scoring; the online rollout decides."""
        if not isinstance(self.target, PromptTarget):
            self.progress.notes.append("a pipeline run needs optimization.evaluation.model")
            return self._end(Outcome.NO_EVALUATION_MODEL)
        data = await self.target.data(None)
        self.progress.splits = {"train": data.sizes["train"]}
        await self._phase("search")
        await self.target.propose(data, self)
        if not self.progress.candidates:
            return self._end(Outcome.NO_CANDIDATE)
        self.progress.selected = 0
        self.progress.unscored = True
        self.progress.notes.insert(0, UNSCORED)
        return self._end(Outcome.PROPOSED)

    async def _phase(self, phase: str) -> None:
        self.progress.phase = phase
        await self.checkpoint(self.progress, self.budget)

    def _end(self, outcome: Outcome) -> RunProgress:
        self.progress.outcome = outcome
        self.progress.phase = "done"
        return self.progress

    # -- what the target's search reports (RunHooks) -----------------------------------

    @property
    def baseline_val_mean(self) -> float:
        """The active programs' validation mean (0 before it is known)."""
        return self.progress.baseline_val_mean or 0.0

    async def candidate(
        self, programs: dict[str, Program], found: Candidate, scores: Sequence[float]
    ) -> None:
        """A run candidate, checkpointed and announced."""
        cand = RunCandidate(
            programs,
            found.strategy,
            found.rationale,
            tuple(scores),
            len(self.progress.candidates),
            found.details,
            scored=len(scores) > 0,
        )
        found.index = cand.index
        self.progress.candidates.append(cand)
        await self.checkpoint(self.progress, self.budget)
        await self.notify("candidate_evaluated", cand.summary(self.plan.active))

    async def trial(self, entry: dict[str, Any]) -> None:
        """One scoring of a program, kept in the run's record."""
        self.progress.trials.append(entry)
        now = time.monotonic()
        if now - self._last_trial_checkpoint >= TRIAL_CHECKPOINT_S:
            self._last_trial_checkpoint = now
            await self.checkpoint(self.progress, self.budget)

    def collect(self, name: str, result: SearchResult) -> None:
        """A search's notes and discarded proposals."""
        for reason, count in result.discarded.items():
            self.progress.discarded[f"{name}:{reason}"] += count
        for note in [*result.notes, *([result.stopped] if result.stopped else [])]:
            self.progress.notes.append(f"{name}: {note}")
            log.info(
                "optimization_strategy_note", run_id=self.plan.run_id, strategy=name, note=note
            )

    def choose(self, responses: Sequence[Response]) -> int:
        """The leader/follower pair the run would select (the best when none beats the
        active pipeline: the run then ends without improvement anyway)."""
        active = self.plan.active
        pipeline = self.plan.pipeline
        assert pipeline is not None
        options = [
            selection.Option(r.scores, selection.total_distance(r.programs(pipeline), active))
            for r in responses
        ]
        picked = selection.select(
            options, self.progress.baseline_scores, self.settings.candidate_tolerance_se
        )
        if picked is None:
            return max(range(len(responses)), key=lambda i: (responses[i].val_mean, -i))
        return picked.index

    def equilibrium(self, eq: Equilibrium) -> None:
        """The leader/follower result, for the record."""
        assert self.plan.pipeline is not None
        self.progress.equilibrium = eq.report(self.plan.pipeline)
        self.progress.notes.extend(eq.notes)
