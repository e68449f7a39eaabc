"""Alert sinks: structlog, a Kafka topic, a generic webhook and Prometheus Alertmanager.

Every sink but the log is fed through its own bounded queue and worker task
(:class:`SinkWorker`), so a slow or dead receiver never blocks ingestion or evaluation, and
one failing sink does not delay the others. A delivery is retried with exponential backoff
when the error is retriable; a final failure is logged (``alert_sink_failed``) and counted
(``promptd_alert_sink_failures_total``), and the monitor carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
import structlog

from .export import MonitorExport
from .rules import Notification

log = structlog.get_logger("promptd.monitoring.sinks")


class SinkError(RuntimeError):
    """A delivery failed; ``retriable`` says whether trying again may help."""

    retriable = True

    def __init__(self, sink: str, reason: str, *, retriable: bool = True) -> None:
        super().__init__(f"{sink}: {reason}")
        self.sink = sink
        self.reason = reason
        self.retriable = retriable


class Sink(Protocol):
    """Something that delivers one batch of notifications (raises :class:`SinkError`)."""

    name: str

    async def send(self, notes: list[Notification]) -> None:
        """Deliver ``notes`` or raise."""
        ...


def notification_payload(note: Notification) -> dict[str, Any]:
    """The JSON document of one notification (Kafka and webhook): rule, labels, state,
    value, threshold, started_at, resolved_at and the rest of the notification."""
    data = asdict(note)
    data["started_at_iso"] = _iso(note.started_at)
    data["resolved_at_iso"] = _iso(note.resolved_at) if note.resolved_at is not None else None
    return data


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def log_notification(note: Notification) -> None:
    """The structlog sink: one line per notification (synchronous, cheap)."""
    event = "alert_firing" if note.state == "firing" else "alert_resolved"
    log.warning(
        event,
        rule=note.rule,
        fingerprint=note.fingerprint,
        labels=note.labels,
        reason=note.reason,
        metric=note.metric,
        value=note.value,
        threshold=note.threshold,
        baseline=note.baseline,
        severity=note.severity,
        started_at=note.started_at,
        resolved_at=note.resolved_at,
    )


SendBytes = Callable[[str, bytes, bytes], Awaitable[None]]


class KafkaSink:
    """Publishes each notification as JSON on the alerts topic, keyed by fingerprint."""

    name = "kafka"

    def __init__(self, topic: str, send: SendBytes) -> None:
        self._topic = topic
        # (topic, key, value) -> ack; raises on failure (the daemon's bounded Producer.send).
        self._send = send

    async def send(self, notes: list[Notification]) -> None:
        """Send every notification; any failure is retriable."""
        for note in notes:
            body = json.dumps(notification_payload(note), sort_keys=True).encode()
            try:
                await self._send(self._topic, note.fingerprint.encode(), body)
            except Exception as exc:
                raise SinkError(self.name, repr(exc)) from exc


class _HttpSink:
    name = "http"

    def __init__(
        self, url: str, timeout_s: float, headers: Mapping[str, str] | None = None
    ) -> None:
        self._url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily inside the running loop; closed by close().
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self._session

    async def _post(self, body: Any) -> None:
        try:
            async with self._client().post(self._url, json=body) as response:
                if response.status >= 500 or response.status == 429:
                    raise SinkError(self.name, f"HTTP {response.status}")
                if response.status >= 400:
                    text = (await response.text())[:200]
                    raise SinkError(self.name, f"HTTP {response.status}: {text}", retriable=False)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SinkError(self.name, repr(exc)) from exc

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class WebhookSink(_HttpSink):
    """POSTs ``{"alerts": [payload, ...]}`` as JSON to a URL."""

    name = "webhook"

    async def send(self, notes: list[Notification]) -> None:
        """One POST for the batch; 5xx, 429, timeouts and connection errors are retriable."""
        await self._post({"alerts": [notification_payload(n) for n in notes]})


class AlertmanagerSink(_HttpSink):
    """Pushes alerts to Alertmanager's v2 API (``POST {url}/api/v2/alerts``)."""

    name = "alertmanager"

    def __init__(self, base_url: str, timeout_s: float, generator_url: str = "") -> None:
        super().__init__(base_url.rstrip("/") + "/api/v2/alerts", timeout_s)
        self._generator_url = generator_url

    async def send(self, notes: list[Notification]) -> None:
        """One POST for the batch (Alertmanager de-duplicates by label set)."""
        await self._post([self.alert(n) for n in notes])

    def alert(self, note: Notification) -> dict[str, Any]:
        """An ``postableAlert``: labels, annotations, startsAt and endsAt when resolved."""
        annotations = {
            "summary": f"{note.rule}: {note.metric} = {_fmt(note.value)} "
            f"(threshold {_fmt(note.threshold)})",
            "value": _fmt(note.value),
            "threshold": _fmt(note.threshold),
            "reason": note.reason,
        }
        if note.baseline is not None:
            annotations["baseline"] = _fmt(note.baseline)
        alert: dict[str, Any] = {
            "labels": dict(note.labels),
            "annotations": annotations,
            "startsAt": _iso(note.started_at),
        }
        if note.resolved_at is not None:
            alert["endsAt"] = _iso(note.resolved_at)
        if self._generator_url:
            alert["generatorURL"] = self._generator_url
        return alert


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


class SinkWorker:
    """A bounded queue and a worker task in front of one sink, with retry and backoff."""

    def __init__(
        self,
        sink: Sink,
        export: MonitorExport,
        *,
        retries: int,
        backoff_s: float,
        queue_size: int = 1000,
        max_batch: int = 100,
    ) -> None:
        self.sink = sink
        self._export = export
        self._retries = retries
        self._backoff = backoff_s
        self._max_batch = max_batch
        self._queue: asyncio.Queue[Notification] = asyncio.Queue(queue_size)
        self.delivered = 0

    @property
    def name(self) -> str:
        """The sink's name (metric label)."""
        return self.sink.name

    def submit(self, note: Notification) -> None:
        """Enqueue without waiting; when the queue is full drop the oldest (counted)."""
        if self._queue.full():
            dropped = self._queue.get_nowait()
            self._queue.task_done()
            self._export.sink_dropped.labels(sink=self.name).inc()
            log.warning("alert_sink_dropped", sink=self.name, fingerprint=dropped.fingerprint)
        self._queue.put_nowait(note)

    def pending(self) -> int:
        """Notifications waiting."""
        return self._queue.qsize()

    async def run(self) -> None:
        """Deliver until cancelled."""
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._deliver(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) until the queue is empty, e.g. before shutdown."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)

    async def _deliver(self, batch: list[Notification]) -> None:
        delay = self._backoff
        for attempt in range(self._retries + 1):
            try:
                await self.sink.send(batch)
            except SinkError as exc:
                last_try = attempt == self._retries or not exc.retriable
                if last_try:
                    self._export.sink_failures.labels(sink=self.name).inc()
                    log.error(
                        "alert_sink_failed",
                        sink=self.name,
                        error=exc.reason,
                        attempts=attempt + 1,
                        alerts=len(batch),
                    )
                    return
                log.warning("alert_sink_retry", sink=self.name, error=exc.reason, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay *= 2
            except Exception as exc:  # a bug in a sink must not kill the worker
                self._export.sink_failures.labels(sink=self.name).inc()
                log.exception("alert_sink_failed", sink=self.name, error=repr(exc))
                return
            else:
                self.delivered += len(batch)
                for note in batch:
                    self._export.notifications.labels(sink=self.name, state=note.state).inc()
                return
