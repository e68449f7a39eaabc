"""``@promptd.instrument``: route, time and report one LLM call per invocation.

Per call, on the app's thread: take a request id (a counter, no UUID), find the unit id
and the episode (see :mod:`.context`), pick the variant from the cached routing (by unit
id, else episode id, else request id; the first call of a prompt may wait once for its
routing, see ``Client.route_first_call``), hand it to the function, time the call, read
token usage from the result, and buffer one plain tuple. Everything costly (event id,
validation, JSON, capture caps, redaction) happens later in the sender thread. The
function's result and exceptions pass through unchanged; an SDK failure is counted in
``sdk_stats().errors`` and never raised.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable, Coroutine, Mapping
from contextvars import Token
from typing import Any, ParamSpec, TypeVar, cast

from promptd.sdk import client as _client_mod
from promptd.sdk.client import Client
from promptd.sdk.context import (
    Episode,
    episode_var,
    last_request_id_var,
    request_id_var,
    unit_id_var,
    variant_var,
)
from promptd.sdk.encode import METRIC
from promptd.sdk.routing_client import PromptVariant
from promptd.sdk.usage import NO_USAGE, PLAIN_TYPES, input_chars, usage_of

P = ParamSpec("P")
R = TypeVar("R")

#: ``unit_id=`` accepts an argument name, a callable of the call's arguments, or None
#: (then the ``unit_id`` context variable, then the request id).
UnitIdSource = str | Callable[..., str | None] | None
#: ``input_chars=``: True counts the text in the call's arguments, a callable of the
#: call's arguments returns the size, False sends none.
InputCharsSource = bool | Callable[..., int | None]


class _Call:
    """What ``begin`` hands to ``finish`` (slots: cheaper than a dict)."""

    __slots__ = (
        "client",
        "episode_id",
        "episode_token",
        "request_id",
        "t0",
        "tokens",
        "ts",
        "unit_id",
        "variant",
    )

    client: Client
    request_id: str
    unit_id: str | None
    # Inherited from the scope; for an outermost call, set by its first nested call.
    episode_id: str | None
    # Set for an outermost call: it is the scope of the calls nested in it.
    episode_token: Token[Any] | None
    variant: PromptVariant
    tokens: tuple[Token[PromptVariant | None], Token[str | None]]
    ts: float
    t0: float


class _Spec:
    """The decorator's arguments, pre-digested once per decorated function."""

    def __init__(
        self,
        fn: Callable[..., Any],
        prompt: str,
        model: str | None,
        default: PromptVariant,
        unit_id: UnitIdSource,
        inject: str | None,
        capture: bool,
        attributes: Mapping[str, str] | None,
        client: Client | None,
        input_size: InputCharsSource = True,
    ) -> None:
        self.prompt = prompt
        self.model = model
        self.default = default
        self.inject = inject
        self.capture = capture
        self.attributes = dict(attributes) if attributes else None
        self.client = client
        signature = inspect.signature(fn)
        params = list(signature.parameters)
        self.param_names = params
        _check_names(fn, signature, unit_id, inject)
        self.unit_callable = unit_id if callable(unit_id) else None
        self.unit_arg = unit_id if isinstance(unit_id, str) else None
        # Position of the unit-id argument when passed positionally (methods count self).
        self.unit_pos = -1
        if isinstance(unit_id, str) and unit_id in params:
            self.unit_pos = params.index(unit_id)
        # What is not the call's input: the instance, the injected variant, the unit id.
        self.skip_first = bool(params) and params[0] in ("self", "cls")
        self.not_input = frozenset(n for n in (inject, unit_id) if isinstance(n, str))
        self.input_size: Callable[..., int | None] | None
        if callable(input_size):
            self.input_size = input_size
        else:
            self.input_size = self.count_input if input_size else None

    def count_input(self, *args: Any, **kwargs: Any) -> int | None:
        """Characters of text in the call's arguments (sender thread; see
        :func:`~promptd.sdk.usage.input_chars`)."""
        skip = self.not_input
        positional = [
            value
            for i, value in enumerate(args)
            if not (i == 0 and self.skip_first)
            and not (i < len(self.param_names) and self.param_names[i] in skip)
        ]
        named = [value for name, value in kwargs.items() if name not in skip]
        return input_chars((*positional, *named))

    def _unit(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        if self.unit_arg is not None:
            value = kwargs.get(self.unit_arg)
            if value is None and 0 <= self.unit_pos < len(args):
                value = args[self.unit_pos]
            return None if value is None else str(value)
        if self.unit_callable is not None:
            value = self.unit_callable(*args, **kwargs)
            return None if value is None else str(value)
        return unit_id_var.get()

    def routing_pending(self) -> bool:
        """True while the prompt's routing is wanted but not known yet (cheap check)."""
        client = self.client or _client_mod._client or _client_mod.get_client()
        return client.routing.enabled and self.prompt not in client.routing.entries

    async def await_routing(self) -> None:
        """Before an async call: wait for the prompt's first routing without blocking the
        loop (``begin`` does not wait inside a running loop)."""
        client = self.client or _client_mod._client or _client_mod.get_client()
        await client.aroute_first_call(self.prompt)

    def begin(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        """Choose the variant and set the context; mutates ``kwargs`` to inject it."""
        client = self.client or _client_mod._client or _client_mod.get_client()
        call = _Call()
        call.client = client
        call.request_id = request_id = client.next_request_id()
        call.unit_id = unit = self._unit(args, kwargs)
        scope = episode_var.get()
        if scope is None:
            # The outermost call: calls nested in it join its implicit episode, whose id
            # is this request id (so routing by either lands in the same arm).
            episode = None
            call.episode_token = episode_var.set(call)
        else:
            call.episode_token = None
            if isinstance(scope, Episode):
                episode = scope.id
            else:
                episode = scope.episode_id or scope.request_id
                scope.episode_id = episode
        call.episode_id = episode
        entry = client.routing.entries.get(self.prompt)
        if entry is None and client.routing.enabled:
            client.routing.want(self.prompt)
            # The first call of a prompt waits for its routing (once, bounded), so it is
            # not served the decorator's default while the daemon has an active version.
            client.route_first_call(self.prompt)
            entry = client.routing.entries.get(self.prompt)
        variant = None
        if entry is not None:
            variant = entry.choose(unit or episode or request_id)
        if variant is None:
            variant = self.default
        elif variant.demos is not None:
            # Demos chosen per request: this call's own record of the ones it is shown.
            variant = variant.for_call()
        if self.inject is not None:
            given = kwargs.get(self.inject)
            if isinstance(given, PromptVariant):
                variant = given  # the caller pinned a variant (tests, replays)
            else:
                kwargs[self.inject] = variant
        call.variant = variant
        call.tokens = (variant_var.set(variant), request_id_var.set(request_id))
        last_request_id_var.set(request_id)
        call.ts = time.time()
        call.t0 = time.perf_counter()
        return call

    def finish(
        self,
        call: _Call,
        result: Any,
        error: str | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Reset the context and buffer the metric tuple."""
        latency_ms = (time.perf_counter() - call.t0) * 1000.0
        variant_token, request_token = call.tokens
        try:
            variant_var.reset(variant_token)
            request_id_var.reset(request_token)
            if call.episode_token is not None:
                episode_var.reset(call.episode_token)
        except ValueError:  # finished in another context (e.g. a generator); harmless
            pass
        usage = NO_USAGE if type(result) in PLAIN_TYPES else usage_of(result)
        captured_in = captured_out = None
        if self.capture:
            captured_in = self._inputs(args, kwargs)
            captured_out = result
        # Counted in the sender thread, off the app's call.
        sizing = None if self.input_size is None else (self.input_size, args, kwargs)
        item = (
            METRIC,
            call.ts,
            self.prompt,
            call.variant.version,
            self.model or usage[3] or "unknown",
            call.request_id,
            call.unit_id,
            latency_ms,
            error is None,
            error,
            usage[0],
            usage[1],
            usage[2],
            captured_in,
            captured_out,
            self.attributes,
            call.episode_id,
            sizing,
            # The demos' record (read in the sender thread); None for fixed demos.
            call.variant.chosen,
        )
        call.client.publisher.put(item)
        if call.client.config.otel_spans:
            from promptd.sdk.otel import annotate_current_span

            model = item[4]
            version = call.variant.version
            tokens_in, tokens_out = usage[0], usage[1]
            annotate_current_span(
                self.prompt,
                version,
                call.request_id,
                call.unit_id,
                model,
                tokens_in,
                tokens_out,
                error,
            )

    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        named = dict(zip(self.param_names, args, strict=False))
        named.update(kwargs)
        for skip in ("self", "cls", self.inject):
            named.pop(skip or "", None)
        return named


def _check_names(
    fn: Callable[..., Any], signature: inspect.Signature, unit_id: UnitIdSource, inject: str | None
) -> None:
    """Catch typos at decoration time (import), not as a TypeError on every call."""
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    for role, name in (("unit_id", unit_id), ("inject", inject)):
        if isinstance(name, str) and name not in signature.parameters and not takes_kwargs:
            raise TypeError(f"{fn.__qualname__}() has no parameter {name!r} for {role}=")


def _count_error(spec: _Spec, where: str) -> None:
    # The SDK must never raise into the app, not even while counting its own error.
    with contextlib.suppress(Exception):
        (spec.client or _client_mod.get_client()).counters.error(where)


def instrument(
    prompt: str,
    *,
    model: str | None = None,
    version: str = "default",
    template: str | None = None,
    unit_id: UnitIdSource = None,
    inject: str | None = None,
    capture: bool = False,
    attributes: Mapping[str, str] | None = None,
    client: Client | None = None,
    input_chars: InputCharsSource = True,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a sync or async function (or method) that makes one LLM call.

    - ``prompt``: the prompt family name, e.g. ``"summarization"``.
    - ``model``: model name for the event; else the result's ``.model``; else ``"unknown"``.
    - ``version`` / ``template``: the default variant, served until routing is known and
      whenever the daemon has no routing for the prompt.
    - ``unit_id``: the assignment unit: an argument name, a callable receiving the call's
      arguments, or None for the :func:`promptd.set_unit_id` context (falling back to
      the request id, i.e. a random assignment per call).
    - ``inject``: name of a keyword argument that receives the chosen
      :class:`PromptVariant`; without it read :func:`promptd.current_variant`.
    - ``capture``: also send the call's arguments and result (size-capped, passed through
      the configured ``redact`` hook in the sender thread). Off by default.
    - ``input_chars``: the size of the call's input without the prompt template, sent as
      ``input_chars`` (rollouts adjust latency and cost on it, see the README). True (the
      default) counts the characters of text in the arguments (strings, and those in
      lists, tuples and dict values), leaving out ``self``/``cls``, the injected variant
      and the unit id; a callable receives the call's arguments and returns the size;
      False sends none. It must not depend on the variant: in a chat whose input carries
      earlier answers of this prompt, count only the new user message.
    """
    default = PromptVariant(prompt, version, template)

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        spec = _Spec(
            fn, prompt, model, default, unit_id, inject, capture, attributes, client, input_chars
        )
        _client_mod.declare(prompt, client)
        if inspect.iscoroutinefunction(fn):
            return cast(Callable[P, R], _wrap_async(fn, spec))
        return _wrap_sync(fn, spec)

    return decorate


def _wrap_sync(fn: Callable[P, R], spec: _Spec) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            call = spec.begin(args, kwargs)
        except Exception:
            _count_error(spec, "instrument")
            return fn(*args, **kwargs)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            _finish(spec, call, None, type(exc).__name__, args, kwargs)
            raise
        _finish(spec, call, result, None, args, kwargs)
        return result

    return wrapper


def _wrap_async(
    fn: Callable[P, Coroutine[Any, Any, R]], spec: _Spec
) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            if spec.routing_pending():
                await spec.await_routing()
            call = spec.begin(args, kwargs)
        except Exception:
            _count_error(spec, "instrument")
            return await fn(*args, **kwargs)
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            _finish(spec, call, None, type(exc).__name__, args, kwargs)
            raise
        _finish(spec, call, result, None, args, kwargs)
        return result

    return wrapper


def _finish(
    spec: _Spec,
    call: _Call,
    result: Any,
    error: str | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    try:
        spec.finish(call, result, error, args, kwargs)
    except Exception:
        _count_error(spec, "instrument")
