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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from promptd.demos import DemoSpec, EnsembleSpec, demo_turns, final_template, vote, with_turns
from promptd.sdk.config import SdkConfig
from promptd.sdk.pools import LoadedPool, PoolKey, build, daemon_embedder, pool_key
from promptd.sdk.stats import Counters

if TYPE_CHECKING:
    from promptd.routing import Routing
    from promptd.sdk.sender import Sender


class DemoChoice:
    """The demos one call was shown (their ids go into the call's event)."""

    __slots__ = ("ids",)

    def __init__(self) -> None:
        self.ids: list[str] | None = None


class DynamicDemos:
    """A version's per-request demonstrations: its declaration and its loaded pool
    (``None`` while it cannot be loaded: the call then gets none, counted)."""

    __slots__ = ("counters", "pool", "spec", "template")

    def __init__(
        self, spec: DemoSpec, pool: LoadedPool | None, template: str, counters: Counters
    ) -> None:
        self.spec = spec
        self.pool = pool
        self.template = template
        self.counters = counters

    def turns(self, values: Mapping[str, Any], choice: DemoChoice | None) -> list[dict[str, str]]:
        """The demo turns for an input; never raises (a failure is counted, no demos)."""
        demos = []
        try:
            if self.pool is None:
                self.counters.error("demos_unavailable")
            else:
                demos = self.pool.choose(self.spec, values)
        except Exception as exc:
            self.counters.error("demos", exc)
        if choice is not None:
            choice.ids = [d.id for d in demos]
        return demo_turns(self.template, demos, self.spec.max_chars)


@dataclass(frozen=True, slots=True)
class PromptVariant:
    """The prompt version chosen for one call: a template, or a configuration (chat
    messages with a model and parameters, see :mod:`promptd.prompt_config`), possibly
    with demonstrations chosen per request (``demos``, see :mod:`promptd.demos`)."""

    prompt: str
    version: str
    template: str | None = None
    config: Mapping[str, Any] | None = None
    demos: DynamicDemos | None = field(default=None, compare=False, repr=False)
    # The call's record of the demos it was shown (one per call; see for_call).
    chosen: DemoChoice | None = field(default=None, compare=False, repr=False)

    def for_call(self) -> PromptVariant:
        """This variant for one call: with its own record of the demos shown."""
        return PromptVariant(
            self.prompt, self.version, self.template, self.config, self.demos, DemoChoice()
        )

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
        """The chat messages to send, filled with ``values``: a configuration's messages
        (with the demos nearest to this input before the last one, when the version takes
        them from a pool), or a template as one user message."""
        if self.config is not None:
            from promptd.prompt_config import render_messages

            messages = render_messages(self.config, values)
            if self.demos is None:
                return messages
            return with_turns(messages, self.demos.turns(values, self.chosen))
        return [{"role": "user", "content": self.format(**values)}]

    async def amessages(self, **values: Any) -> list[dict[str, str]]:
        """:meth:`messages` for async code: a pool searched by embedding asks for the
        input's vector in a worker thread, not on the event loop."""
        if self.demos is not None and self.demos.spec.retriever == "embedding":
            import asyncio

            return await asyncio.to_thread(lambda: self.messages(**values))
        return self.messages(**values)

    @property
    def demo_ids(self) -> list[str] | None:
        """The ids of the demos this call was shown (after :meth:`messages`)."""
        return None if self.chosen is None else self.chosen.ids

    @property
    def ensemble(self) -> EnsembleSpec | None:
        """The configuration's self-consistency vote: sample ``n`` answers at its
        ``temperature`` and keep :meth:`vote`'s (``None``: one answer)."""
        return EnsembleSpec.of(self.config)

    def vote(self, answers: Sequence[str]) -> str:
        """The most frequent of ``answers`` (see :func:`promptd.demos.vote`)."""
        spec = self.ensemble
        return vote(answers, spec.answer if spec is not None else "label")

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


#: Builds a version's per-request demos from its configuration (``None``: fixed demos).
DemosFor = Callable[[Mapping[str, Any] | None], DynamicDemos | None]


def _no_demos(config: Mapping[str, Any] | None) -> DynamicDemos | None:
    return None


class RouteEntry:
    """One prompt's routing, pre-digested for the hot path."""

    __slots__ = ("_bucket", "active", "candidate", "routing", "salt", "threshold")

    def __init__(
        self, routing: Routing | None, prompt: str, demos_for: DemosFor = _no_demos
    ) -> None:
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
                prompt,
                routing.active_version,
                routing.active_template,
                routing.active_config,
                demos_for(routing.active_config),
            )
        if routing.candidate_version:
            self.candidate = PromptVariant(
                prompt,
                routing.candidate_version,
                routing.candidate_template,
                routing.candidate_config,
                demos_for(routing.candidate_config),
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
        # Demonstration pools of the served versions, loaded before their routing is.
        self.pools: dict[PoolKey, LoadedPool] = {}

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

        def demos_for(config: Mapping[str, Any] | None) -> DynamicDemos | None:
            spec = DemoSpec.of(config)
            if spec is None or config is None:
                return None
            pool = self.pools.get(pool_key(spec, config))
            return DynamicDemos(spec, pool, final_template(config), self.counters)

        self.entries[prompt] = RouteEntry(routing, prompt, demos_for)
        self.wanted[prompt] = time.monotonic() + ttl
        self._drop_unused_pools()

    def _needed_pools(self, routing: Routing) -> list[PoolKey]:
        keys = []
        for config in (routing.active_config, routing.candidate_config):
            spec = DemoSpec.of(config)
            if spec is not None and config is not None:
                keys.append(pool_key(spec, config))
        return keys

    def _drop_unused_pools(self) -> None:
        used = {
            v.demos.pool.key
            for e in list(self.entries.values())
            for v in (e.active, e.candidate)
            if v is not None and v.demos is not None and v.demos.pool is not None
        }
        for key in [k for k in self.pools if k not in used]:
            self.pools.pop(key, None)

    async def _load_pools(self, session: Any, prompt: str, routing: Routing) -> None:
        """Fetch and index the pools ``routing`` serves that are not loaded yet (raises
        when one cannot be: the routing is then not installed, and fetched again)."""
        import asyncio

        base = str(self.config.daemon_url).rstrip("/")
        for key in self._needed_pools(routing):
            if key in self.pools:
                continue
            url = f"{base}/v1/prompts/{quote(prompt, safe='')}/pools/{quote(key[0], safe='')}"
            async with session.get(url) as response:
                response.raise_for_status()
                body = json.loads(await response.read())
            embed = self.config.embed or daemon_embedder(
                base, prompt, self.config.routing_timeout_s
            )
            # Indexing a large pool takes a moment: off the sender's loop.
            self.pools[key] = await asyncio.to_thread(build, key, body, embed)

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
            await self._load_pools(session, prompt, routing)
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
        if self.config.daemon_url and any(k not in self.pools for k in self._needed_pools(routing)):
            # A pool to load first: the HTTP refresh fetches routing and pool together.
            self.wanted[routing.prompt] = 0.0
            return
        self.install(routing.prompt, routing, self._ttl(routing))
