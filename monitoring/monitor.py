"""The monitor's asyncio shell around the pure windows (:mod:`.windows`) and rules (:mod:`.rules`).

* :meth:`Monitor.on_batch` (a batch listener) windows every newly stored event, updates the
  Prometheus counters and counts feedback per prompt for the volume trigger. Feedback on a
  whole episode is credited to every call of the episode stored with it or before it
  (looked up in storage, :class:`EpisodeCalls`): each such call's prompt and variant get
  the score, at the feedback's time. A call stored *after* its episode's feedback is not
  credited in the windows (the example store and rollouts still credit it: they join in
  storage, and within the late-feedback window).
* :meth:`Monitor.evaluate_once` runs on an interval: ``expire`` on the loop, then the pure
  :func:`~.rules.evaluate` in a worker thread so that a big rule set never blocks the event
  loop. While a round runs in the thread, the windows are *frozen*: batches are buffered
  (:attr:`Monitor._backlog`) and applied once the thread returns, so the loop never mutates
  what the thread reads. The round's state changes are written to SQLite in one transaction
  *before* any notification leaves (a crash loses at most a notification, never sends one
  twice), then notifications go to the log, to the sink workers and, for degradation alerts
  that fire, to the optimizer's trigger queue.
* :meth:`Monitor.rebuild` refills the windows at start from storage (bounded; see
  :meth:`rebuild`), :meth:`Monitor.restore` reloads the alert states.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import structlog

from promptd._aio import wait_event
from promptd.storage.alerts import AlertChange, history_aggregates, raw_events
from promptd.storage.database import Database
from promptd.storage.rows import FeedbackRow, MetricRow
from promptd.storage.snapshots import SnapshotStore

from .config import MonitoringSettings
from .eventtime import ADMIT_ALL, Admission
from .export import MonitorExport
from .rules import AlertRule, AlertState, Evaluation, Notification, evaluate
from .signals import MonitorSignals
from .sinks import SinkWorker, log_notification
from .snapshot import take
from .triggers import OptimizationTrigger, TriggerQueue
from .windows import SeriesKey, WindowStats, WindowStore

log = structlog.get_logger("promptd.monitoring")

Clock = Callable[[], float]


class AlertPersistence(Protocol):
    """Where alert states go (:class:`~promptd.storage.alerts.AlertStore` fits)."""

    async def save(self, changes: Sequence[AlertChange]) -> None:
        """Persist one round's changes atomically."""
        ...

    async def load_current(self) -> list[dict[str, Any]]:
        """Every stored alert that is not inactive."""
        ...


class EpisodeCalls(Protocol):
    """Where the calls of episodes are looked up
    (:class:`~promptd.storage.repository.EventRepository` fits)."""

    async def episode_calls(
        self, episode_ids: Collection[str], stored_by: float
    ) -> dict[str, list[tuple[str, str]]]:
        """``(prompt, variant)`` of each episode's calls stored at or before ``stored_by``."""
        ...


#: Feedback on an episode credited to one of its calls: (ts, prompt, variant, score).
Credit = tuple[float, str, str, float]


class Batch(Protocol):
    """What a batch listener receives (:class:`~promptd.storage.repository.BatchOutcome`)."""

    @property
    def metric_rows(self) -> tuple[MetricRow, ...]:
        """Newly stored metric events."""
        ...

    @property
    def feedback_rows(self) -> tuple[FeedbackRow, ...]:
        """Newly stored feedback from people and apps (no ``source``)."""
        ...

    @property
    def evaluation_rows(self) -> tuple[FeedbackRow, ...]:
        """Newly stored evaluators' results (``source`` is ``eval:<name>``)."""
        ...

    @property
    def last_metric_id(self) -> int:
        """Highest stored metric row id once the batch is in."""
        ...

    @property
    def last_feedback_id(self) -> int:
        """Highest stored feedback row id once the batch is in."""
        ...

    @property
    def ingested_at(self) -> float:
        """When the batch was stored (its rows' ``ingested_at``)."""
        ...

    @property
    def watermark(self) -> float | None:
        """The window watermark the batch is windowed under (see :mod:`.eventtime`)."""
        ...


@dataclass
class RoundResult:
    """What one evaluation round did (returned for tests and logs)."""

    now: float
    duration_s: float
    notifications: list[Notification] = field(default_factory=list)
    changed: int = 0


class Monitor:
    """Windows, rules, alert states and sink dispatch of one daemon."""

    def __init__(
        self,
        settings: MonitoringSettings,
        rules: Sequence[AlertRule],
        store: WindowStore,
        persistence: AlertPersistence,
        export: MonitorExport,
        triggers: TriggerQueue,
        sinks: Iterable[SinkWorker] = (),
        clock: Clock = time.time,
        snapshots: SnapshotStore | None = None,
        episodes: EpisodeCalls | None = None,
        signals: MonitorSignals | None = None,
    ) -> None:
        self.settings = settings
        self.rules = tuple(rules)
        self._rules_by_name = {r.name: r for r in self.rules}
        self.store = store
        self.persistence = persistence
        self.export = export
        self.triggers = triggers
        self.sinks = list(sinks)
        self.clock = clock
        self.states: dict[str, AlertState] = {}
        #: Batches waiting for the windows to thaw, with the feedback that counts.
        self._backlog: list[tuple[Batch, tuple[Sequence[FeedbackRow], Sequence[Credit]]]] = []
        #: Where episode feedback finds its calls (``None``: it is not windowed).
        self.episodes = episodes
        #: Which feedback counts in each prompt's windows and volume trigger.
        self.signals = signals or MonitorSignals()
        #: Highest (metric, feedback) row ids whose batches are in the windows: a snapshot
        #: of the windows covers every stored row up to these.
        self.covered: tuple[int, int] = (0, 0)
        self._frozen = False
        self._feedback_counts: dict[str, int] = {}
        self._round_lock = asyncio.Lock()
        self.last_round: RoundResult | None = None
        #: Where :meth:`snapshot_once` saves the windows (``None``: never).
        self.snapshots = snapshots
        self._saved_cover: tuple[int, int] | None = None
        export.sinks(s.name for s in self.sinks)

    # ---- ingest -------------------------------------------------------------------------

    async def on_batch(self, outcome: Batch) -> None:
        """Batch listener: window the newly stored events (never blocks for long)."""
        metrics, feedback = outcome.metric_rows, outcome.feedback_rows
        credits = await self._credits(outcome) if feedback else ()
        if metrics or feedback:
            # The Prometheus feedback counters are people's (evaluators have their own).
            self.export.observe_batch(metrics, feedback, credits)
        counted = self._counted(outcome, credits)
        if self._frozen:
            self._backlog.append((outcome, counted))
        else:
            self._apply(outcome, counted)
        if counted[0] or counted[1]:
            self._count_feedback(*counted)

    def _counted(
        self, outcome: Batch, credits: Sequence[Credit]
    ) -> tuple[Sequence[FeedbackRow], Sequence[Credit]]:
        """The batch's call feedback and episode credits that count in the windows: those
        of each prompt's monitor signals (people's, in storage order, then evaluators')."""
        signals = self.signals
        if signals.human_only:
            return outcome.feedback_rows, credits
        counts = signals.counts
        # Rows unpack in column order (storage.rows): prompt at 2, source last.
        rows = [row for row in outcome.feedback_rows if counts(row[2], None)]
        rows += [row for row in outcome.evaluation_rows if counts(row[2], row[-1])]
        return rows, [credit for credit in credits if counts(credit[1], None)]

    async def _credits(self, outcome: Batch) -> list[Credit]:
        """The batch's episode feedback, credited to each call of its episode."""
        # Rows unpack in column order (storage.rows); request_id None: a whole episode.
        episodic = [row for row in outcome.feedback_rows if row[5] is None]
        if not episodic or self.episodes is None:
            return []
        calls = await self.episodes.episode_calls(
            {row[10] for row in episodic if row[10] is not None}, outcome.ingested_at
        )
        return [
            (row[1], prompt, variant, row[6])
            for row in episodic
            for prompt, variant in calls.get(row[10] or "", ())
        ]

    def _apply(
        self, outcome: Batch, counted: tuple[Sequence[FeedbackRow], Sequence[Credit]]
    ) -> None:
        config = self.store.config
        self.store.admit(
            Admission.of(
                outcome.ingested_at,
                outcome.watermark,
                config.lateness_seconds,
                config.max_future_seconds,
            )
        )
        try:
            self._window(outcome.metric_rows, *counted)
        finally:
            self.store.admit(ADMIT_ALL)
        covered = self.covered
        self.covered = (
            max(covered[0], outcome.last_metric_id),
            max(covered[1], outcome.last_feedback_id),
        )

    def _window(
        self,
        metrics: Sequence[MetricRow],
        feedback: Sequence[FeedbackRow],
        credits: Sequence[Credit] = (),
    ) -> None:
        record = self.store.record_metric
        # Rows unpack in column order (storage.rows): the fastest access CPython has.
        for _, t, p, v, m, _, _, lat, ok, _, q, tin, tout, c, _, _, _, _, _, _ in metrics:
            record(t, p, v, m, lat, ok, q, tin, tout, c)
        record_fb = self.store.record_feedback
        for _, ts, prompt, variant, _, request_id, score, _, _, _, _, _ in feedback:
            # Feedback on a whole episode (no request id) counts through its credits; call
            # feedback always names its prompt and variant.
            if request_id is not None and prompt is not None and variant is not None:
                record_fb(ts, prompt, variant, score)
        for ts, prompt, variant, score in credits:
            record_fb(ts, prompt, variant, score)

    def _count_feedback(self, feedback: Sequence[FeedbackRow], credits: Sequence[Credit]) -> None:
        threshold = self.settings.feedback_volume_threshold
        counts = self._feedback_counts
        now = self.clock()
        prompts = [row[2] for row in feedback if row[5] is not None]
        prompts += [credit[1] for credit in credits]
        for prompt in prompts:
            assert prompt is not None  # call feedback always names its prompt
            n = counts.get(prompt, 0) + 1
            if n >= threshold:
                counts.pop(prompt, None)
                self._trigger(
                    OptimizationTrigger(
                        prompt=prompt,
                        kind="feedback_volume",
                        at=now,
                        reason=f"{n} new feedback events",
                        details={
                            "feedback_count": n,
                            "threshold": threshold,
                            "signals": list(self.signals.of(prompt)),
                        },
                    )
                )
            else:
                counts[prompt] = n

    def _trigger(self, trigger: OptimizationTrigger) -> None:
        self.triggers.put(trigger)
        self.export.triggers.labels(kind=trigger.kind).inc()
        log.info(
            "optimization_triggered",
            prompt=trigger.prompt,
            kind=trigger.kind,
            reason=trigger.reason,
        )

    # ---- evaluation ---------------------------------------------------------------------

    async def evaluate_once(self, now: float | None = None) -> RoundResult:
        """One round: expire, evaluate off-loop, persist, then notify."""
        async with self._round_lock:
            now = self.clock() if now is None else now
            started = time.perf_counter()
            self.store.expire(now)
            previous = self.states
            self._frozen = True
            try:
                evaluation, windows = await asyncio.to_thread(self._compute, now, previous)
            finally:
                self._thaw()
            changes = _changes(previous, evaluation, now)
            # Persist first: a notification must never be sent for a state we could lose.
            await self.persistence.save(changes)
            self.states = evaluation.states
            self._dispatch(evaluation.notifications)
            self._update_gauges(windows)
            duration = time.perf_counter() - started
            self.export.evaluation_duration.observe(duration)
            if duration > self.settings.slow_evaluation_s:
                log.warning(
                    "monitor_evaluation_slow",
                    duration_s=round(duration, 3),
                    series=len(self.store.series("model")),
                    rules=len(self.rules),
                )
            result = RoundResult(now, duration, evaluation.notifications, len(changes))
            self.last_round = result
            return result

    def _thaw(self) -> None:
        """Unfreeze the windows and apply the batches that arrived meanwhile."""
        self._frozen = False
        backlog, self._backlog = self._backlog, []
        for outcome, counted in backlog:
            self._apply(outcome, counted)

    def _compute(
        self, now: float, previous: dict[str, AlertState]
    ) -> tuple[Evaluation, list[tuple[str, WindowStats]]]:
        """Runs in a worker thread while the windows are frozen."""
        evaluation = evaluate(self.rules, self.store, now, previous)
        windows: list[tuple[str, WindowStats]] = []
        for seconds in self.settings.export_windows_s:
            label = _window_label(seconds)
            for key in self.store.series("variant"):
                windows.append(
                    (
                        label,
                        self.store.stats(key.prompt, key.variant, window_seconds=seconds, now=now),
                    )
                )
        return evaluation, windows

    def notify(self, note: Notification) -> None:
        """Send an alert raised outside the rules (a starved rollout) to the log and sinks."""
        self._dispatch([note])

    def _dispatch(self, notes: Sequence[Notification]) -> None:
        for note in notes:
            log_notification(note)
            for sink in self.sinks:
                sink.submit(note)
            if note.degradation and note.state == "firing" and note.reason == "fired":
                self._trigger(
                    OptimizationTrigger(
                        prompt=note.labels.get("prompt", ""),
                        kind="degradation",
                        at=note.started_at,
                        reason=f"{note.rule}: {note.metric} {_fmt(note.value)} vs baseline "
                        f"{_fmt(note.baseline)}",
                        details=asdict(note),
                    )
                )

    def _update_gauges(self, windows: list[tuple[str, WindowStats]]) -> None:
        ex = self.export
        firing: dict[tuple[str, str], int] = {}
        pending: dict[str, int] = {}
        for rule in self.rules:
            firing.setdefault((rule.name, rule.severity), 0)
            pending.setdefault(rule.name, 0)
        for state in self.states.values():
            if state.state == "firing":
                key = (state.rule, state.labels.get("severity", ""))
                firing[key] = firing.get(key, 0) + 1
            elif state.state == "pending":
                pending[state.rule] = pending.get(state.rule, 0) + 1
        for (name, severity), n in firing.items():
            ex.alerts_firing.labels(alertname=name, severity=severity).set(n)
        for name, n in pending.items():
            ex.alerts_pending.labels(alertname=name).set(n)
        ex.set_windows(windows)
        ex.series.set(len(self.store.series("model")))
        ex.set_store_counters(self.store.late_events, self.store.future_events)

    # ---- snapshots ----------------------------------------------------------------------

    async def snapshot_once(self, force: bool = False) -> int:
        """Save the windows to storage; returns the snapshot's size (0: nothing to save).

        The windows are frozen while a worker thread encodes them (batches arriving
        meanwhile wait in the backlog, as during an evaluation round), so the snapshot
        holds exactly the batches up to :attr:`covered`. Skipped when no batch arrived
        since the last one, unless ``force``.
        """
        if self.snapshots is None:
            return 0
        started = time.perf_counter()
        async with self._round_lock:
            if self.covered == self._saved_cover and not force:
                return 0
            self._frozen = True
            covered = self.covered
            try:
                snap = await asyncio.to_thread(
                    take, self.store, covered, self.clock(), self.signals
                )
            finally:
                self._thaw()
        await self.snapshots.save(snap)
        self._saved_cover = covered
        duration = time.perf_counter() - started
        self.export.snapshot_seconds.set(duration)
        self.export.snapshot_bytes.set(len(snap.data))
        log.debug("windows_snapshot_saved", bytes=len(snap.data), duration_s=round(duration, 3))
        return len(snap.data)

    async def _snapshot_loop(self, stop: asyncio.Event) -> None:
        interval = self.settings.snapshot_interval_s
        while not stop.is_set():
            await wait_event(stop, interval)
            await self._snapshot_logged()

    async def _snapshot_logged(self) -> None:
        try:
            await self.snapshot_once()
        except Exception:
            # The next one retries; a restart without one only replays more events.
            self.export.snapshot_failures.inc()
            log.exception("windows_snapshot_failed")

    async def run(self, stop: asyncio.Event) -> None:
        """Evaluate every ``evaluation_interval_s``, snapshot the windows every
        ``snapshot_interval_s`` and run the sink workers until ``stop``; then save a last
        snapshot, let the sinks flush for a moment and cancel them."""
        interval = self.settings.evaluation_interval_s
        async with asyncio.TaskGroup() as group:
            workers = [
                group.create_task(w.run(), name=f"promptd:alert-sink:{w.name}") for w in self.sinks
            ]
            resend = group.create_task(self._resend_loop(stop), name="promptd:alert-resend")
            if self.snapshots is not None:
                group.create_task(self._snapshot_loop(stop), name="promptd:windows-snapshot")
            loop = asyncio.get_running_loop()
            next_round = loop.time()
            while not stop.is_set():
                try:
                    await self.evaluate_once()
                except Exception:
                    # Logged and counted; the next round starts from the last saved states.
                    self.export.evaluation_failures.inc()
                    log.exception("monitor_evaluation_failed")
                next_round = max(next_round + interval, loop.time())
                await wait_event(stop, next_round - loop.time())
            resend.cancel()
            if self.snapshots is not None:
                # A clean stop leaves a fresh snapshot: the next start replays nothing.
                await self._snapshot_logged()
            for worker in self.sinks:
                await worker.drain(1.0)
            for task in workers:
                task.cancel()
        for worker in self.sinks:
            close = getattr(worker.sink, "close", None)
            if close is not None:
                await close()
        log.info("monitor_stopped", alerts=len(self.states))

    async def _resend_loop(self, stop: asyncio.Event) -> None:
        """Re-push firing alerts to Alertmanager so it does not time them out."""
        am = [w for w in self.sinks if w.name == "alertmanager"]
        if not am:
            return
        interval = self.settings.alertmanager.resend_interval_s
        while not stop.is_set():
            await wait_event(stop, interval)
            for state in list(self.states.values()):
                rule = self._rules_by_name.get(state.rule)
                if state.state == "firing" and rule is not None:
                    for worker in am:
                        worker.submit(_note_from_state(rule, state, "resend"))

    # ---- start-up -----------------------------------------------------------------------

    async def restore(self) -> int:
        """Reload alert states saved by an earlier run; returns how many."""
        for data in await self.persistence.load_current():
            state = AlertState.from_dict(data)
            self.states[state.fingerprint] = state
        log.info(
            "alert_states_restored",
            alerts=len(self.states),
            firing=sum(s.state == "firing" for s in self.states.values()),
        )
        return len(self.states)

    # ---- views --------------------------------------------------------------------------

    def active(self) -> list[dict[str, Any]]:
        """Pending and firing alerts, firing first, as JSON-ready dicts."""
        order = {"firing": 0, "pending": 1}
        items = [s for s in self.states.values() if s.state in order]
        items.sort(key=lambda s: (order[s.state], s.rule, s.fingerprint))
        return [s.to_dict() for s in items]

    def prompt_stats(self, prompt: str, window_seconds: float) -> dict[str, Any]:
        """Window statistics of ``prompt`` per variant and rolled up."""
        now = self.clock()
        variants = [k for k in self.store.series("variant") if k.prompt == prompt]
        total = self.store.stats(prompt, window_seconds=window_seconds, now=now)
        return {
            "prompt": prompt,
            # Whose scores feedback_count and feedback_mean count ([[evaluation.signals]]).
            "feedback_signals": list(self.signals.of(prompt)),
            "window_seconds": window_seconds,
            "now": now,
            "total": stats_dict(total),
            "variants": {
                k.variant or "": stats_dict(
                    self.store.stats(prompt, k.variant, window_seconds=window_seconds, now=now)
                )
                for k in variants
            },
        }


async def rebuild_windows(
    store: WindowStore,
    db: Database,
    now: float,
    horizon_s: float,
    signals: MonitorSignals | None = None,
) -> dict[str, int]:
    """Refill ``store`` from storage at start, bounded in work.

    Every stored event goes through the admission rule of its own batch
    (:mod:`.eventtime`), so the windows admit exactly what the live ones did. The
    trailing ``horizon_s`` seconds are replayed event by event (exact, with latency
    histograms): that covers every short window. History older than that, back to the
    baseline, is loaded as SQL aggregates per coarsest-tier bucket (one row per series and
    hour by default), which restores counts, rates and means of the 24 h baseline at a cost
    that does not depend on the traffic; latency quantiles of the baseline then cover only the
    replayed part until the baseline has refilled. The loop is yielded to between chunks.
    Feedback counts where ``signals`` (people's by default) say, as in the live monitor.
    """
    signals = signals or MonitorSignals()
    sources = signals.sql_condition()
    config = store.config
    baseline = config.baseline_seconds
    horizon = min(horizon_s, baseline)
    coarse = config.tiers[-1].bucket_seconds
    # The oldest bucket the live windows still hold at ``now``: the baseline tier keeps
    # its buckets ``lateness`` longer than the baseline (see WindowStore._maintain).
    keep_from = math.floor((now - baseline - config.lateness_seconds) / coarse) * coarse
    replay_from = max(now - horizon, keep_from)
    started = time.perf_counter()
    aggregates = 0
    if keep_from < replay_from:
        rows = await history_aggregates(
            db,
            keep_from,
            replay_from,
            coarse,
            config.lateness_seconds,
            config.max_future_seconds,
            sources,
        )
        store.admit(ADMIT_ALL)  # the query applied the rule
        for agg in rows:
            if "fb_n" in agg.values and not signals.counts(agg.prompt, agg.source):
                continue
            store.record_aggregate(agg.start, agg.prompt, agg.variant, agg.model, **agg.values)
            aggregates += 1
    replayed = 0
    async for chunk in raw_events(db, replay_from, sources=sources):
        replayed += store.replay(signals.select(chunk))
        await asyncio.sleep(0)
    store.expire(now)
    summary = {"aggregates": aggregates, "events": replayed}
    log.info(
        "windows_rebuilt",
        **summary,
        horizon_s=horizon,
        series=len(store.series("model")),
        duration_s=round(time.perf_counter() - started, 3),
    )
    return summary


def stats_dict(stats: WindowStats) -> dict[str, Any]:
    """A :class:`WindowStats` as JSON (latencies in milliseconds, like the events)."""
    data = asdict(stats)
    key: SeriesKey = data.pop("key")
    data["prompt"], data["variant"], data["model"] = key
    return data


def _changes(
    previous: dict[str, AlertState], evaluation: Evaluation, now: float
) -> list[AlertChange]:
    """State changes worth persisting: new, removed, a status change or a notification.

    A pending/firing alert whose only change is ``last_true_at``/``value`` is not written
    every round; after a restart the rebuilt windows re-establish it.
    """
    sent = {n.fingerprint: n for n in evaluation.notifications}
    out: list[AlertChange] = []
    for fp, state in evaluation.states.items():
        before = previous.get(fp)
        note = sent.get(fp)
        if before is None or before.state != state.state or note is not None:
            out.append(
                AlertChange(
                    fingerprint=fp,
                    rule=state.rule,
                    status=state.state,
                    ts=now,
                    alert=state.to_dict(),
                    notification=asdict(note) if note is not None else None,
                )
            )
    for fp, before in previous.items():
        if fp not in evaluation.states:
            note = sent.get(fp)
            out.append(
                AlertChange(
                    fingerprint=fp,
                    rule=before.rule,
                    status="inactive",
                    ts=now,
                    alert=None,
                    notification=asdict(note) if note is not None else None,
                )
            )
    return out


def _note_from_state(rule: AlertRule, state: AlertState, reason: str) -> Notification:
    return Notification(
        rule=rule.name,
        fingerprint=state.fingerprint,
        labels=state.labels,
        state="firing",
        reason=reason,
        metric=rule.metric,
        value=state.value,
        threshold=state.threshold,
        baseline=state.baseline,
        severity=rule.severity,
        started_at=state.fired_at or state.active_at,
        resolved_at=None,
        degradation=rule.degradation,
        window_seconds=rule.window,
    )


def _window_label(seconds: float) -> str:
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
