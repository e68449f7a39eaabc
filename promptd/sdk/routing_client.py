"""Routing in the app: a cache read on the hot path, refreshed by the sender thread.

The hot path does one dict lookup (``RoutingCache.entries``) and, while a rollout runs, one
SHA-256 bucket of the unit id. The network is the background refresh's (polling
``GET {daemon_url}/v1/prompts/{name}/routing`` every ``ttl_seconds``, and optionally reading
the ``promptd.routing`` topic). Only the first call of a prompt waits, once and bounded by
``routing_timeout_s``, for that prompt's first fetch (``Client.route_first_call``), so it is
served the active version rather than the decorator's default variant. When the daemon is
unreachable the last known routing keeps serving; a prompt the daemon does not know (404)
is served by the default variant. ``Client.start()`` (or ``configure(prompts=...)``)
fetches the routing of every known prompt at once, before any call.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from promptd.sdk.config import SdkConfig
from promptd.sdk.stats import Counters

if TYPE_CHECKING:
    from promptd.routing import Routing
    from promptd.sdk.sender import Sender


@dataclass(frozen=True, slots=True)
class PromptVariant:
    """The prompt version chosen for one call: a template, or a configuration (chat
    messages with a model and parameters, see :mod:`promptd.prompt_config`)."""

    prompt: str
    version: str
    template: str | None = None
    config: Mapping[str, Any] | None = None

    def format(self, **values: Any) -> str:
        """Fill the template's ``{placeholders}`` (``str.format``).

        A configuration version has no single template: ``ValueError`` says to use
        :meth:`messages`, rather than sending a partial prompt.
        """
        if self.config is not None:
            raise ValueError(
                f"prompt {self.prompt!r} version {self.version!r} is a chat configuration: "
                "send variant.messages(...) with variant.model and variant.params"
            )
        if self.template is None:
            raise ValueError(f"prompt {self.prompt!r} version {self.version!r} has no template")
        return self.template.format(**values)

    def messages(self, **values: Any) -> list[dict[str, str]]:
        """The chat messages to send, filled with ``values``: a configuration's messages, or
        a template as one user message."""
        if self.config is not None:
            from promptd.prompt_config import render_messages

            return render_messages(self.config, values)
        return [{"role": "user", "content": self.format(**values)}]

    @property
    def model(self) -> str | None:
        """The configuration's model (None: the app's own choice)."""
        return None if self.config is None else self.config.get("model")

    @property
    def params(self) -> dict[str, Any]:
        """The configuration's parameters (temperature, max_tokens, ...), to pass along."""
        return {} if self.config is None else dict(self.config.get("params") or {})

    @property
    def output_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer should follow, if the configuration has one."""
        return None if self.config is None else self.config.get("output_schema")


class RouteEntry:
    """One prompt's routing, pre-digested for the hot path."""

    __slots__ = ("_bucket", "active", "candidate", "routing", "salt", "threshold")

    def __init__(self, routing: Routing | None, prompt: str) -> None:
        from promptd.routing import bucket, threshold

        self.routing = routing
        self._bucket: Callable[[str, str], int] = bucket
        self.active: PromptVariant | None = None
        self.candidate: PromptVariant | None = None
        self.threshold = 0
        self.salt = ""
        if routing is None:
            return
        if routing.active_version:
            self.active = PromptVariant(
                prompt, routing.active_version, routing.active_template, routing.active_config
            )
        if routing.candidate_version:
            self.candidate = PromptVariant(
                prompt,
                routing.candidate_version,
                routing.candidate_template,
                routing.candidate_config,
            )
            self.threshold = threshold(routing.weight)
            self.salt = routing.salt

    def choose(self, unit_id: str) -> PromptVariant | None:
        """The variant serving ``unit_id``; None means: use the decorator's default."""
        if self.threshold and self._bucket(self.salt, unit_id) < self.threshold:
            return self.candidate
        return self.active


class RoutingCache:
    """Routing per prompt for the hot path, and the background task that refreshes it."""

    def __init__(self, config: SdkConfig, counters: Counters) -> None:
        self.config = config
        self.counters = counters
        self.entries: dict[str, RouteEntry] = {}
        # Prompts the app has used; the refresher keeps each one fresh.
        self.wanted: dict[str, float] = {}
        # Prompts fetched at least once, whatever the outcome (for warm-up waits).
        self.attempted: set[str] = set()
        self.enabled = bool(config.daemon_url) or config.routing_from_kafka

    def warm(self, prompts: Iterable[str], timeout_s: float) -> bool:
        """Wait until each of ``prompts`` has been fetched once (or ``timeout_s`` passed);
        True when all their routings are known. Blocks the calling thread only."""
        wanted = list(prompts)
        for prompt in wanted:
            self.want(prompt)
        if not self.config.daemon_url:
            return all(p in self.entries for p in wanted)
        deadline = time.monotonic() + timeout_s
        while any(p not in self.attempted for p in wanted) and time.monotonic() < deadline:
            time.sleep(0.005)
        return all(p in self.entries for p in wanted)

    def attempted_all(self, prompts: Iterable[str]) -> bool:
        """True once each of ``prompts`` has been fetched at least once."""
        return not self.config.daemon_url or all(p in self.attempted for p in prompts)

    def want(self, prompt: str) -> None:
        """Register a prompt seen for the first time (refreshed from the next tick)."""
        self.wanted.setdefault(prompt, 0.0)

    def install(self, prompt: str, routing: Routing | None, ttl: float) -> None:
        """Serve ``routing`` for ``prompt`` from now on, refreshing after ``ttl`` seconds."""
        self.entries[prompt] = RouteEntry(routing, prompt)
        self.wanted[prompt] = time.monotonic() + ttl

    def _ttl(self, routing: Routing | None) -> float:
        if self.config.routing_ttl_s is not None:
            return self.config.routing_ttl_s
        return routing.ttl_seconds if routing is not None else self.config.routing_retry_s

    async def refresh_loop(self, sender: Sender) -> None:
        """Background task (sender loop): fetch every due prompt, then sleep a tick."""
        # Imported here (sender thread): asyncio and aiohttp stay off ``import promptd``.
        import asyncio

        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.config.routing_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not sender.stopping:
                now = time.monotonic()
                due = [p for p, at in list(self.wanted.items()) if at <= now]
                if due:
                    await asyncio.gather(*(self._refresh(session, p) for p in due))
                await asyncio.sleep(min(self.config.poll_interval_s, 0.05))

    async def _refresh(self, session: Any, prompt: str) -> None:
        from promptd.routing import Routing

        base = str(self.config.daemon_url).rstrip("/")
        url = f"{base}/v1/prompts/{quote(prompt, safe='')}/routing"
        with self.counters.lock:
            self.counters.routing_fetches += 1
        try:
            async with session.get(url) as response:
                if response.status == 404:
                    self.install(prompt, None, self._ttl(None))
                    self.attempted.add(prompt)
                    return
                response.raise_for_status()
                routing = Routing.model_validate_json(await response.read())
        except Exception:
            with self.counters.lock:
                self.counters.routing_failures += 1
            # Keep serving the last known routing; try again a little later.
            self.wanted[prompt] = time.monotonic() + self.config.routing_retry_s
            self.attempted.add(prompt)
            return
        self.install(prompt, routing, self._ttl(routing))
        self.attempted.add(prompt)

    async def kafka_loop(self, sender: Sender) -> None:
        """Background task: apply routing records from the routing topic as they arrive.

        The topic is compacted on real Kafka; the development broker does not compact, so
        the reader reads from the beginning and keeps the latest value per prompt.
        """
        import asyncio

        from aiokafka import AIOKafkaConsumer

        from promptd.routing import Routing

        while not sender.stopping:
            consumer = AIOKafkaConsumer(
                self.config.routing_topic,
                bootstrap_servers=self.config.bootstrap_servers,
                client_id=self.config.client_id,
                auto_offset_reset="earliest",
                enable_auto_commit=False,
            )
            try:
                await asyncio.wait_for(consumer.start(), self.config.send_timeout_s)
                while not sender.stopping:
                    batches = await consumer.getmany(timeout_ms=200)
                    for records in batches.values():
                        for record in records:
                            self._apply_record(Routing, record.value)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.counters.error("routing_topic")
                await sender.sleep(self.config.reconnect_backoff_max_s)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(consumer.stop(), 1.0)

    def _apply_record(self, model: type[Routing], value: bytes | None) -> None:
        try:
            routing = model.model_validate(json.loads(value or b"null"))
        except Exception:
            self.counters.error("routing_record")
            return
        self.install(routing.prompt, routing, self._ttl(routing))
