"""The shell around :mod:`.calibration`: it collects human/evaluator pairs as they meet,
recomputes agreement on a tick, sets the gauges and raises the ``judge_agreement_low``
alert.

Pairs meet from two sides. When the engine stores an evaluator's result it asks storage
for people's feedback on that call (:meth:`Calibrator.results_stored`); people's feedback
stored later is joined to the results on the tick, from the feedback rows stored since the
previous tick (a primary-key range, nothing on the ingest path). Either way a pair is kept
once. At start the pairs of the window are read back from storage (:meth:`Calibrator.rebuild`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Final

import structlog

from promptd._aio import wait_event

from .calibration import Pair, Pairs, Report, below_floor, report
from .calls import Call
from .config import EvaluationSettings
from .metrics import EvaluationMetrics
from .store import EvaluationStore

log = structlog.get_logger("promptd.evaluation")

#: Periods of the window shown as history by the API.
HISTORY_PERIODS: Final = 7
ALERT_RULE: Final = "judge_agreement_low"

#: Called with (prompt, evaluator, firing, reason) when the agreement alert changes.
AgreementHook = Callable[[str, str, bool, str], None]


class Calibrator:
    """Agreement per (prompt, evaluator) between people and evaluators."""

    def __init__(
        self,
        settings: EvaluationSettings,
        store: EvaluationStore,
        metrics: EvaluationMetrics,
        on_alert: AgreementHook,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings.agreement
        self.judges = {e.name for e in settings.evaluators if e.is_judge}
        self.store = store
        self.metrics = metrics
        self.on_alert = on_alert
        self.clock = clock
        self.pairs = Pairs(self.settings.window_s, self.settings.max_pairs)
        self.reports: dict[tuple[str, str], Report] = {}
        self.firing: dict[tuple[str, str], str] = {}
        # Feedback rows up to this id have been joined to the results.
        self.feedback_seen = 0

    async def rebuild(self) -> int:
        """Read the window's pairs back from storage; returns how many."""
        since = self.clock() - self.settings.window_s
        self.feedback_seen = await self.store.last_feedback_id()
        n = 0
        for prompt, variant, evaluator, fid, human, judge, ts in await self.store.pairs_since(
            since
        ):
            n += self.pairs.add(prompt, evaluator, Pair(ts, human, judge, fid, variant))
        return n

    async def results_stored(self, scored: Sequence[tuple[Call, dict[str, float]]]) -> None:
        """Evaluators scored these calls: pair the scores with people's feedback on them
        (one lookup for all)."""
        by_request = {call.request_id: (call, scores) for call, scores in scored}
        for rid, fid, human, _ts in await self.store.human_scores(list(by_request)):
            call, scores = by_request[rid]
            for evaluator, judge in scores.items():
                pair = Pair(call.ts, human, judge, fid, call.variant)
                self.pairs.add(call.prompt, evaluator, pair)

    async def _pair_new_feedback(self) -> None:
        upto = await self.store.last_feedback_id()
        if upto <= self.feedback_seen:
            return
        new = await self.store.pairs_after(self.feedback_seen, upto)
        for prompt, variant, evaluator, fid, human, judge, ts in new:
            self.pairs.add(prompt, evaluator, Pair(ts, human, judge, fid, variant))
        self.feedback_seen = upto

    async def tick(self) -> None:
        """Pair what waits, forget old pairs, recompute, export, alert."""
        await self._pair_new_feedback()
        now = self.clock()
        self.pairs.prune(now)
        s = self.settings
        for prompt, evaluator in list(self.pairs.keys()):
            rep = report(
                prompt, evaluator, self.pairs.get(prompt, evaluator), s.confidence,
                s.binary_threshold, s.min_pairs, HISTORY_PERIODS, now, s.window_s,
            )  # fmt: skip
            self.reports[(prompt, evaluator)] = rep
            self._export(rep)
            if evaluator in self.judges:
                self._alert(rep)

    def _export(self, rep: Report) -> None:
        m, prompt = self.metrics, self.metrics.prompt(rep.prompt)
        m.agreement_pairs.labels(evaluator=rep.evaluator, prompt=prompt).set(rep.pairs)
        for name, est in (("spearman", rep.spearman), ("kappa", rep.kappa)):
            if est is None:
                continue
            for bound, value in (("estimate", est.value), ("low", est.low), ("high", est.high)):
                m.agreement.labels(
                    evaluator=rep.evaluator, prompt=prompt, statistic=name, bound=bound
                ).set(value)

    def _alert(self, rep: Report) -> None:
        key = (rep.prompt, rep.evaluator)
        reason = below_floor(rep, self.settings.spearman_floor, self.settings.kappa_floor)
        prompt = self.metrics.prompt(rep.prompt)
        self.metrics.agreement_low.labels(evaluator=rep.evaluator, prompt=prompt).set(
            1 if reason else 0
        )
        if reason is not None and key not in self.firing:
            self.firing[key] = reason
            log.warning(ALERT_RULE, prompt=rep.prompt, evaluator=rep.evaluator, reason=reason)
            self.on_alert(rep.prompt, rep.evaluator, True, reason)
        elif reason is None and key in self.firing:
            del self.firing[key]
            self.on_alert(rep.prompt, rep.evaluator, False, "agreement is back above the floor")

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``interval_s`` until ``stop``."""
        while not await wait_event(stop, self.settings.interval_s):
            try:
                await self.tick()
            except Exception:
                log.exception("evaluation_calibration_failed")
