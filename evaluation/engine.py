"""The evaluation engine: from stored calls to published evaluation results.

Flow (all in the daemon's event loop, in tasks the engine owns)::

    batch listener        workers            outbox
    (ingest path)         (concurrency)
    sample calls ──▶ queue ──▶ evaluate ──▶ evaluation_results ──▶ feedback topic ──▶ ingest
    CRC-32 + multiply  bounded   checks, judge,  one row per            stores it once,
                       full:     budget, outage  (request, evaluator)   like any feedback
                       counted

**Never slows ingestion.** The batch listener only hashes request ids and puts the
sampled calls in a bounded queue without waiting; a full queue is counted
(``reason="queue_full"``). Everything else runs in the engine's own tasks.

**Exactly once per (request, evaluator).** A result is written to ``evaluation_results``
(primary key ``(request_id, evaluator)``) before it is published; publishing is an outbox
(:mod:`.outbox`) that re-publishes what the broker did not acknowledge, with an
``event_id`` derived from (request, evaluator), so storage deduplicates. A call is never
evaluated again once its result is stored.

**Nothing sampled is lost across a crash.** The durable cursor (:mod:`.cursor`, saved
every ``cursor_interval_s`` and at a clean stop) is the last call id below which every
sampled call is decided. At start the engine re-reads the calls stored above it (up to
the last call stored before ingestion starts), samples them again (the decision is a pure
function of request id and evaluator name), skips the (request, evaluator) pairs that
already have a result and evaluates the rest; live batches continue above. The one
repeat that can happen: the process dies between a judge's answer and the write of its
result (verdicts are written together, within about 50 ms); the judge is then asked again
after the restart, and one result is stored.

Calls stored before evaluation was first switched on are not evaluated (the first start
saves the cursor at the last stored call).

**Interfaces for the daemon's other parts.** Results arrive back through ingestion as
feedback rows with ``source = "eval:<name>"``; batch listeners see them in
``BatchOutcome.evaluation_rows`` (people's feedback stays in ``feedback_rows``), and SQL
readers select them with ``source = 'eval:<name>'`` (people's with ``source IS NULL``).
The engine's own state is :meth:`Engine.describe` (HTTP, CLI) and
:attr:`Engine.calibrator` (agreement per prompt and evaluator,
:meth:`~.calibrator.Calibrator.reports`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog

from promptd._aio import wait_any, wait_event
from promptd.storage.repository import BatchOutcome
from promptd.storage.rows import METRIC_COLUMNS, MetricRow

from .budget import DAY_S, utc_day
from .calibrator import Calibrator
from .calls import Call, Verdict
from .config import EvaluationSettings, Evaluator
from .cursor import Cursor
from .metrics import EvaluationMetrics
from .outbox import Outbox, event_id
from .runner import Runner
from .sampling import Sampler
from .store import EvaluationStore

log = structlog.get_logger("promptd.evaluation")

#: After the first verdict arrives, the writer waits this long for more (one transaction).
WRITE_COALESCE_S = 0.05
#: How often stored results older than the retention are deleted.
PURGE_INTERVAL_S = 3600.0
#: Calls read per chunk when a start re-reads the calls above the cursor.
REREAD_CHUNK = 1000
#: Where a metric row holds its captured output (storage.rows column order).
_OUTPUT: Final = METRIC_COLUMNS.index("output")


@dataclass(frozen=True, slots=True)
class _Item:
    """A sampled call waiting for its evaluators; ``key`` is its cursor range."""

    source: MetricRow | Call
    evaluators: tuple[Evaluator, ...]
    key: int
    reread: bool = False

    def call(self) -> Call:
        return self.source if isinstance(self.source, Call) else Call.from_row(self.source)


class Engine:
    """Sampling on the ingest path, evaluation in owned tasks, results as feedback."""

    def __init__(
        self,
        settings: EvaluationSettings,
        store: EvaluationStore,
        metrics: EvaluationMetrics,
        runner: Runner,
        outbox: Outbox,
        calibrator: Calibrator,
        clock: Callable[[], float] = time.time,
        retention_days: float = 30.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.runner = runner
        self.outbox = outbox
        self.calibrator = calibrator
        self.clock = clock
        # Results are kept as long as raw events (storage.retention_days).
        self.retention_days = retention_days
        self.sampler = Sampler(settings)
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(settings.queue_size)
        self.cursor = Cursor(0)
        self.saved_cursor = 0
        self._reread: tuple[int, int, int] | None = None  # (after, upto, cursor key)
        # Evaluated calls waiting for the writer: (call, verdicts, cursor key).
        self._unwritten: list[tuple[Call, list[Verdict], int]] = []
        self._write_wake = asyncio.Event()

    # -- start ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Before ingestion starts: place the cursor, plan the re-read of the calls above
        it, restore today's spending and the agreement pairs."""
        saved = await self.store.load_cursor()
        last = await self.store.last_call_id()
        position = last if saved is None else min(saved, last)
        self.cursor = Cursor(position)
        if saved is None:
            await self.store.save_cursor(last, self.clock())
        self.saved_cursor = position
        if last > position:
            key = self.cursor.open(last, 0, held=True)
            assert key is not None
            self._reread = (position, last, key)
        now = self.clock()
        spent = await self.store.spent_since(utc_day(now) * DAY_S)
        for name, usd in spent.items():
            if name in self.runner.state:
                self.runner.state[name].budget.restore(usd, now)
        pairs = await self.calibrator.rebuild()
        log.info(
            "evaluation_started",
            evaluators=[e.name for e in self.settings.evaluators],
            cursor=position,
            reread_calls=last - position,
            agreement_pairs=pairs,
        )

    # -- ingest path ------------------------------------------------------------------------

    async def on_batch(self, outcome: BatchOutcome) -> None:
        """Batch listener: take the sampled calls, never wait (a full queue is counted).
        People's feedback is paired with results by the calibrator's tick, from storage."""
        rows = outcome.metric_rows
        if rows:
            key = self.cursor.open(outcome.last_metric_id, 0, held=True)
            sampled = self.sampler.sample(rows)
            if key is not None:
                for row, evaluators in sampled:
                    self._offer(row, evaluators, key)
                self.cursor.release(key)

    def _offer(self, row: MetricRow, evaluators: tuple[Evaluator, ...], key: int) -> None:
        for e in evaluators:
            self.runner.state[e.name].count("sampled")
            self.metrics.sampled.labels(evaluator=e.name).inc()
        if row[_OUTPUT] is None:
            for e in evaluators:
                self.runner.skip(e.name, "no_output")
            return
        try:
            self.queue.put_nowait(_Item(row, evaluators, key))
        except asyncio.QueueFull:
            for e in evaluators:
                self.runner.skip(e.name, "queue_full")
            return
        self.cursor.add(key)

    # -- tasks ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run the workers, the re-read, the outbox, the cursor and calibration until
        ``stop``; the cursor is saved on the way out."""
        try:
            async with asyncio.TaskGroup() as group:
                workers = [
                    group.create_task(self._worker(stop), name=f"promptd:evaluation-worker-{i}")
                    for i in range(self.settings.concurrency)
                ]
                group.create_task(self._writer(stop, workers), name="promptd:evaluation-writer")
                group.create_task(self._reread_calls(stop), name="promptd:evaluation-reread")
                group.create_task(self.outbox.run(stop), name="promptd:evaluation-outbox")
                group.create_task(self.calibrator.run(stop), name="promptd:evaluation-agreement")
                group.create_task(self._save_cursor_loop(stop), name="promptd:evaluation-cursor")
        finally:
            await asyncio.shield(self._save_cursor())

    async def _worker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            getter = asyncio.ensure_future(self.queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait((getter, stopper), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if not getter.done():
                    getter.cancel()
            if not getter.done() or getter.cancelled():
                return
            item = getter.result()
            self.metrics.queue.set(self.queue.qsize())
            try:
                call, verdicts = await self._evaluate(item)
            except Exception:
                # Decided as failed: logged and counted, the loop goes on.
                log.exception("evaluation_failed", request_id=item.call().request_id)
                for e in item.evaluators:
                    self.runner.skip(e.name, "error")
                verdicts = []
            if verdicts:
                # Decided once written: the writer settles it.
                self._unwritten.append((call, verdicts, item.key))
                self._write_wake.set()
            else:
                self.cursor.settle(item.key)

    async def _evaluate(self, item: _Item) -> tuple[Call, list[Verdict]]:
        call = item.call()
        evaluators: Sequence[Evaluator] = item.evaluators
        if item.reread:
            done = await self.store.decided([(call.request_id, e.name) for e in evaluators])
            evaluators = [e for e in evaluators if (call.request_id, e.name) not in done]
        return call, await self.runner.evaluate(call, evaluators)

    async def _writer(self, stop: asyncio.Event, workers: Sequence[asyncio.Task[None]]) -> None:
        """Write the verdicts of many calls in one transaction (every ``WRITE_COALESCE_S``
        while they come), then settle them, publish and pair them; after ``stop``, until
        the workers have handed over their last verdicts."""
        while True:
            stopping = stop.is_set() and all(w.done() for w in workers)
            if not self._unwritten:
                if stopping:
                    return
                self._write_wake.clear()
                await wait_any(self._write_wake, stop, 1.0)
                if not stop.is_set():
                    await wait_event(stop, WRITE_COALESCE_S)
                continue
            batch, self._unwritten = self._unwritten, []
            try:
                await self._write(batch)
            except Exception:
                log.exception("evaluation_write_failed", calls=len(batch))
                if stopping:
                    return  # left undecided: evaluated again after the restart
                self._unwritten[:0] = batch
                await wait_event(stop, 1.0)

    async def _write(self, batch: list[tuple[Call, list[Verdict], int]]) -> None:
        rows = [
            (call, [(v, event_id(call.request_id, v.evaluator)) for v in verdicts])
            for call, verdicts, _ in batch
        ]
        await self.store.save(rows, self.clock())
        for _call, verdicts, key in batch:
            self.cursor.settle(key)
            self._count(verdicts)
        self.metrics.pending.set(self.cursor.outstanding)
        self.outbox.wake()
        scored = [
            (call, {v.evaluator: v.score for v in verdicts if v.score is not None})
            for call, verdicts, _ in batch
        ]
        await self.calibrator.results_stored([(c, s) for c, s in scored if s])

    def _count(self, verdicts: Sequence[Verdict]) -> None:
        for v in verdicts:
            self.runner.state[v.evaluator].count(v.status)
            self.metrics.results.labels(evaluator=v.evaluator, status=v.status).inc()
            if v.score is not None:
                self.metrics.score.labels(evaluator=v.evaluator).observe(v.score)

    async def _reread_calls(self, stop: asyncio.Event) -> None:
        """Take the sampled calls stored above the saved cursor (before this start)."""
        if self._reread is None:
            return
        after, upto, key = self._reread
        taken = 0
        while after < upto and not stop.is_set():
            chunk = await self.store.calls_between(after, upto, REREAD_CHUNK)
            if not chunk:
                break
            for _id, call in chunk:
                evaluators = self.sampler.sampled_by(call.prompt, call.request_id)
                if not evaluators or call.output is None:
                    continue
                self.cursor.add(key)
                taken += 1
                # Waits for room: this is not the ingest path.
                await self.queue.put(_Item(call, evaluators, key, reread=True))
            after = chunk[-1][0]
        if stop.is_set():
            return
        self.cursor.release(key)
        self._reread = None
        log.info("evaluation_reread_done", calls=taken, upto=upto)

    async def _save_cursor_loop(self, stop: asyncio.Event) -> None:
        purged_at = self.clock()
        while not await wait_event(stop, self.settings.cursor_interval_s):
            try:
                await self._save_cursor()
                if self.clock() - purged_at >= PURGE_INTERVAL_S:
                    purged_at = self.clock()
                    await self._purge()
            except Exception:
                log.exception("evaluation_cursor_save_failed")

    async def _purge(self) -> None:
        """Results older than the raw events' retention (their calls are gone too)."""
        cutoff = self.clock() - self.retention_days * DAY_S
        deleted = await self.store.purge_older_than(cutoff)
        if deleted:
            log.info("evaluation_results_purged", deleted=deleted)

    async def _save_cursor(self) -> None:
        position = self.cursor.position
        self.metrics.pending.set(self.cursor.outstanding)
        if position > self.saved_cursor:
            await self.store.save_cursor(position, self.clock())
            self.saved_cursor = position

    # -- views ------------------------------------------------------------------------------

    def readiness_detail(self) -> list[str]:
        """What is wrong with evaluation right now (evaluators down, publishing failing);
        a detail of ``/readyz``, never a reason to be unready."""
        out = self.runner.outages()
        if self.outbox.last_error is not None:
            out.append(f"evaluation results cannot be published: {self.outbox.last_error[:200]}")
        return out

    async def describe(self) -> list[dict[str, Any]]:
        """Every evaluator: configuration, counts since start, stored totals, health,
        agreement (what ``GET /v1/evaluators`` answers)."""
        now = self.clock()
        day_start = utc_day(now) * DAY_S
        totals = await self.store.totals(min(now - DAY_S, day_start), day_start)
        out = []
        for e in self.settings.evaluators:
            state = self.runner.state[e.name]
            h = state.health
            agreement = [
                r.as_dict() for (_, name), r in sorted(self.calibrator.reports.items())
                if name == e.name
            ]  # fmt: skip
            out.append(
                {
                    "name": e.name,
                    "type": e.type,
                    "source": e.source,
                    "prompts": e.prompts,
                    "sample_rate": e.sample_rate,
                    "budget": {
                        "max_calls_per_minute": e.max_calls_per_minute,
                        "max_cost_usd_per_day": e.max_cost_usd_per_day,
                        "spent_usd_today": round(state.budget.spent_usd, 6),
                    },
                    "since_start": dict(sorted(state.counts.items())),
                    "stored": totals.get(e.name, {"scored": 0, "invalid": 0}),
                    "up": h.up,
                    "down_since": h.down_since,
                    "last_error": h.last_error,
                    "agreement": agreement,
                }
            )
        return out

    async def recent(self, name: str) -> list[dict[str, Any]]:
        """The evaluator's newest stored results."""
        return await self.store.recent(name, self.settings.recent_results)
