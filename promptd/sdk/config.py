"""SDK configuration: explicit arguments first, then the same ``PROMPTD_`` variables as the daemon.

A plain frozen dataclass rather than pydantic-settings: it is built in the app process at
import or first call, and importing pydantic-settings there would cost tens of milliseconds.

Environment variables (all optional):

==========================================  =====================================================
``PROMPTD_KAFKA_BOOTSTRAP_SERVERS``         ``host:port[,...]``; unset means: publish nothing
``PROMPTD_DAEMON_URL``                      base URL of the daemon, for routing (e.g. http://...)
``PROMPTD_KAFKA_METRICS_TOPIC``             default ``promptd.metrics``
``PROMPTD_KAFKA_FEEDBACK_TOPIC``            default ``promptd.feedback``
``PROMPTD_KAFKA_ROUTING_TOPIC``             default ``promptd.routing``
``PROMPTD_KAFKA_CLIENT_ID``                 default ``promptd-sdk``
``PROMPTD_KAFKA_ENABLE_IDEMPOTENCE``        ``true`` for real Kafka clusters; default off
``PROMPTD_KAFKA_SECURITY_PROTOCOL``         ``PLAINTEXT`` (default), ``SSL``, ``SASL_SSL``, ...
``PROMPTD_KAFKA_SASL_MECHANISM``            with ``..._SASL_USERNAME`` / ``..._SASL_PASSWORD``
``PROMPTD_SDK_QUEUE_SIZE``                  events buffered in memory before dropping (10000)
``PROMPTD_SDK_ROUTING_TTL_S``               overrides the routing's own ``ttl_seconds``
``PROMPTD_SDK_ROUTE_FIRST_CALL``            ``false``: a prompt's first call never waits for routing
``PROMPTD_SDK_OTEL_SPANS``                  ``true``: annotate the app's current span
==========================================  =====================================================

A ``PROMPTD_`` variable nothing reads and a value that does not parse are warned about
once (:mod:`promptd.sdk.environment`), never silently ignored.

The nested daemon form (``PROMPTD_KAFKA__BOOTSTRAP_SERVERS``) is accepted too, so one
environment can serve both the daemon and the apps.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: A redaction hook: gets ``("input" | "output", value)`` and returns what may be stored.
Redactor = Callable[[str, Any], Any]
#: The app's embedding function for pools searched by embedding: text to vector.
Embedder = Callable[[str], Sequence[float]]


@dataclass(frozen=True, slots=True)
class SdkConfig:
    """Everything the SDK needs; build it with :meth:`from_env` or ``promptd.configure``."""

    bootstrap_servers: str | None = None
    daemon_url: str | None = None
    metrics_topic: str = "promptd.metrics"
    feedback_topic: str = "promptd.feedback"
    routing_topic: str = "promptd.routing"
    client_id: str = "promptd-sdk"
    enable_idempotence: bool = False
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    #: Bounded in-memory buffer; when full, the *newest* event is dropped and counted.
    queue_size: int = 10_000
    batch_size: int = 500
    #: How often the idle sender looks for new events; also the delivery latency floor.
    poll_interval_s: float = 0.02
    #: Every Kafka operation (connect, batch send, stop) is bounded by this.
    send_timeout_s: float = 5.0
    send_retries: int = 3
    #: Backoff between connection attempts while the broker is unreachable (capped).
    reconnect_backoff_max_s: float = 2.0
    #: How long ``flush()`` at interpreter exit may take at most.
    exit_flush_timeout_s: float = 3.0
    routing_timeout_s: float = 2.0
    #: The first call of each prompt waits (at most ``routing_timeout_s``, once per prompt
    #: and process) for the prompt's routing, so that it is served the active version
    #: rather than the decorator's default. Off: it never waits and gets the default.
    route_first_call: bool = True
    #: Overrides the routing's ``ttl_seconds`` when set.
    routing_ttl_s: float | None = None
    #: Retry delay after a failed routing fetch (the last known routing keeps serving).
    routing_retry_s: float = 5.0
    #: Read routing updates from the ``routing_topic`` as well as polling the daemon.
    routing_from_kafka: bool = False
    #: Request ids remembered for ``feedback()`` without prompt/variant arguments.
    feedback_lru_size: int = 10_000
    #: Cap on captured ``input``/``output`` (serialized JSON bytes); longer values are cut.
    capture_max_bytes: int = 32 * 1024
    redact: Redactor | None = None
    #: Prometheus registry for the SDK counters: ``None`` = the global registry,
    #: ``False`` = do not export.
    registry: Any = None
    #: Prompts whose routing :meth:`Client.start` fetches before the first call, besides
    #: those of every ``@instrument``-decorated function.
    prompts: tuple[str, ...] = ()
    #: Set the call's GenAI attributes on the app's current OpenTelemetry span (see
    #: :mod:`promptd.sdk.otel`; needs ``opentelemetry-api``).
    otel_spans: bool = False
    #: For versions whose demo pool is searched by embedding: the app's function from
    #: the input's text to its vector, with the pool's embedding model. Unset: the SDK
    #: asks the daemon (``POST /v1/prompts/{name}/embed``, the daemon's model and key).
    embed: Embedder | None = None

    def __post_init__(self) -> None:
        # configure(prompts=["a", "b"]) passes a list; keep the config hashable and frozen.
        object.__setattr__(self, "prompts", tuple(self.prompts))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> SdkConfig:
        """Read ``PROMPTD_`` variables, then apply ``overrides`` (which win).

        A variable nothing reads (a typo) and a value that does not parse are warned
        about once (see :mod:`promptd.sdk.environment`); a bad value leaves the default.
        """
        from promptd.sdk.environment import check_environment, invalid_value

        env = os.environ if environ is None else environ
        check_environment(env, environment_variables())
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            found = _lookup(env, field.name)
            if found is None:
                continue
            variable, raw = found
            try:
                values[field.name] = _convert(raw, field.type)
            except ValueError as exc:
                invalid_value(variable, raw, str(exc))
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown promptd SDK setting(s): {', '.join(sorted(unknown))}")
        values.update(overrides)
        if values.get("bootstrap_servers") == "":
            values["bootstrap_servers"] = None
        return cls(**values)

    def replace(self, **changes: Any) -> SdkConfig:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


_KAFKA_FIELDS = {
    "bootstrap_servers",
    "metrics_topic",
    "feedback_topic",
    "routing_topic",
    "client_id",
    "enable_idempotence",
    "security_protocol",
    "sasl_mechanism",
    "sasl_username",
    "sasl_password",
}
_NOT_FROM_ENV = {"redact", "registry", "prompts", "embed"}


def _candidates(name: str) -> list[str]:
    """The variables that set field ``name``, first found wins."""
    if name in _NOT_FROM_ENV:
        return []
    if name == "daemon_url":
        return ["PROMPTD_DAEMON_URL"]
    if name in _KAFKA_FIELDS:
        upper = name.upper()
        return [f"PROMPTD_KAFKA_{upper}", f"PROMPTD_KAFKA__{upper}"]
    return [f"PROMPTD_SDK_{name.upper()}"]


def environment_variables() -> dict[str, str]:
    """Every variable the SDK reads, mapped to the :class:`SdkConfig` field it sets.

    The daemon uses this list: it accepts these names in a shared environment (and
    honours the ones that mean the same thing for it, such as the topics).
    """
    return {
        variable: field.name
        for field in dataclasses.fields(SdkConfig)
        for variable in _candidates(field.name)
    }


def _lookup(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """``(variable, value)`` of the first variable that sets field ``name``."""
    for key in _candidates(name):
        if key in env:
            return key, env[key]
    return None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(raw: str, annotation: object) -> Any:
    """Parse one variable; ``ValueError`` saying what was expected."""
    text = str(annotation)
    if not raw and "None" in text:
        return None
    if text.startswith("bool"):
        word = raw.strip().lower()
        if word not in _TRUE | _FALSE:
            raise ValueError("true or false (also 1/0, yes/no, on/off)")
        return word in _TRUE
    try:
        if text.startswith("int"):
            return int(raw)
        if text.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError("an integer" if text.startswith("int") else "a number") from None
    return raw
