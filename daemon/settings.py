"""Daemon configuration: one root :class:`Settings` built once at start and passed down.

Sources, highest priority first: constructor arguments (tests, CLI flags), environment
variables ``PROMPTD_…`` (nested sections with ``__``, e.g. ``PROMPTD_KAFKA__GROUP_ID``;
the common ones also have flat names such as ``PROMPTD_KAFKA_BOOTSTRAP_SERVERS``), a
``.env`` file, then the TOML file named by ``--config`` or ``PROMPTD_CONFIG``. Unknown
``PROMPTD_`` variables and TOML keys are errors (see :mod:`promptd.daemon.settings_sources`).
See ``promptd.example.toml`` at the repository root for every setting with its default.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from promptd.daemon.settings_sources import (
    DataSource,
    SettingsError,
    Sources,
    VariablesSource,
    model_of,
    read_sources,
    sdk_names_module,
)
from promptd.evaluation.config import EvaluationSettings
from promptd.monitoring.config import MonitoringSettings
from promptd.optimization.config import OptimizationSettings
from promptd.replacement.profiles import PROFILES, RolloutProfile

__all__ = ["Settings", "SettingsError", "load_settings"]

# The --config file, passed to the TOML source without touching os.environ.
_CONFIG_FILE: ContextVar[str | None] = ContextVar("promptd_config_file", default=None)
# The sources read by the last Settings() in this context, for naming bad settings.
_LAST_SOURCES: ContextVar[Sources | None] = ContextVar("promptd_settings_sources", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    """Kafka connection, topics and consumer tuning."""

    bootstrap_servers: str | None = Field(
        default=None,
        description="host:port[,host:port]; unset means: start the embedded development broker",
    )
    # The embedded development broker's port on 127.0.0.1 (only when bootstrap_servers is
    # unset): Kafka's usual 9092, so an app's localhost:9092 reaches it; 0 picks a free one.
    embedded_port: int = Field(default=9092, ge=0, le=65535)
    client_id: str = "promptd"
    group_id: str = "promptd"
    metrics_topic: str = "promptd.metrics"
    feedback_topic: str = "promptd.feedback"
    dlq_topic: str = "promptd.dlq"
    alerts_topic: str = "promptd.alerts"
    routing_topic: str = "promptd.routing"
    optimization_topic: str = "promptd.optimization"
    # OTLP trace data, as the OpenTelemetry Collector's Kafka exporter writes it (and
    # POST /v1/traces publishes it); empty: do not read spans.
    otlp_topic: str | None = "promptd.otlp"
    otlp_encoding: Literal["otlp_proto", "otlp_json"] = "otlp_proto"
    create_topics: bool = True
    topic_partitions: int = Field(default=3, ge=1, le=1000)
    replication_factor: int = Field(default=1, ge=1, le=10)
    # Off by default only because the development broker cannot do it; turn it on for
    # real Kafka clusters.
    enable_idempotence: bool = False
    max_batch_records: int = Field(default=5_000, ge=1, le=1_000_000)
    fetch_max_wait_ms: int = Field(default=100, ge=1, le=10_000)
    max_partition_fetch_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    max_record_bytes: int = Field(default=256 * 1024, ge=1024)
    send_timeout_s: float = Field(default=10.0, gt=0)
    commit_timeout_s: float = Field(default=10.0, gt=0)
    request_timeout_ms: int = Field(default=15_000, ge=1_000)
    retry_backoff_initial_s: float = Field(default=0.5, gt=0)
    retry_backoff_max_s: float = Field(default=30.0, gt=0)
    # A consumer that holds partitions yet stores nothing while lag exists for this long
    # reports unhealthy.
    stall_timeout_s: float = Field(default=120.0, gt=0)
    # No fetch answer from the broker (or no partitions assigned) for this long turns
    # /readyz 503; so does a storage write that has not finished for this long.
    readiness_timeout_s: float = Field(default=10.0, gt=0)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None

    @field_validator("bootstrap_servers", "otlp_topic")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        # PROMPTD_KAFKA_BOOTSTRAP_SERVERS= (empty) means the embedded broker, as unset does;
        # PROMPTD_KAFKA__OTLP_TOPIC= turns the OTLP source off.
        return value or None

    @property
    def embedded(self) -> bool:
        """True when no bootstrap address is configured (development broker)."""
        return not self.bootstrap_servers

    @property
    def event_topics(self) -> tuple[str, ...]:
        """The topics the ingestion consumer reads: metrics, feedback, and OTLP spans."""
        own = (self.metrics_topic, self.feedback_topic)
        return own if self.otlp_topic is None else (*own, self.otlp_topic)


class OtlpSettings(_Section):
    """How OpenTelemetry spans map to calls (see docs/opentelemetry.md)."""

    # The span (then resource) attributes naming the prompt, first present wins.
    prompt_attributes: list[str] = Field(
        default_factory=lambda: ["gen_ai.prompt.name", "langfuse.observation.prompt.name"],
        min_length=1,
    )
    # The prompt of LLM spans that name none; unset: such spans are skipped (no_prompt).
    default_prompt: str | None = Field(default=None, min_length=1, max_length=200)
    # Store the input and output recorded on spans (for optimization examples).
    capture: bool = True
    # Largest OTLP record read (the Collector's producer default is 1,000,000 bytes).
    max_record_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # How often the active versions used for spans without promptd.variant are reloaded.
    active_versions_ttl_s: float = Field(default=1.0, gt=0)


class HttpSettings(_Section):
    """The HTTP API (health, metrics, status, admin)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8787, ge=0, le=65535)
    admin_token: str | None = Field(default=None, min_length=16)
    routing_ttl_s: float = Field(default=30.0, gt=0)


class StorageSettings(_Section):
    """Storage: a SQLite file in ``data_dir`` (default), or a shared PostgreSQL ``url``."""

    data_dir: Path = Path("./data")
    database_name: str = "promptd.db"
    # postgresql://user:password@host:5432/dbname: the store several daemons share (one
    # leads, see [ha]). Unset: the SQLite file data_dir/database_name (one daemon).
    url: str | None = None
    # PostgreSQL connections per daemon (reads, the writer, streams of replayed events).
    pool_size: int = Field(default=10, ge=3, le=200)
    # The server ends a session idle inside a transaction this long: a paused daemon
    # cannot hold a lock past its lease. Keep it below ha.lease_duration_s.
    idle_in_transaction_timeout_s: float = Field(default=5.0, gt=0)
    busy_timeout_ms: int = Field(default=5_000, ge=0)
    retention_days: float = Field(default=30.0, gt=0)
    retention_interval_s: float = Field(default=3600.0, gt=0)
    # How often the daemon checks that its database file is still the one it opened.
    file_check_interval_s: float = Field(default=1.0, gt=0)
    # At start, PRAGMA quick_check verifies every page of the database for at most this
    # long (about 1 s per GB); damage found refuses the start, a check cut short by the
    # limit is logged. 0 turns the check off.
    integrity_check_s: float = Field(default=10.0, ge=0)
    # Start over deliberately: a new (empty) store whose consumer group has committed
    # offsets reads every partition from its earliest offset instead of refusing to run
    # (`promptd run --new-store`). Leave it off: a lost database must be noticed.
    accept_new_store: bool = False

    @field_validator("url")
    @classmethod
    def _postgresql_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (unset: the SQLite file in data_dir)")
        return value

    @property
    def database_path(self) -> Path:
        """Full path of the SQLite file."""
        return self.data_dir / self.database_name

    @property
    def shared(self) -> bool:
        """True with a PostgreSQL store (daemons may share it; one leads)."""
        return self.url is not None

    @property
    def target(self) -> Path | str:
        """What :meth:`~promptd.storage.database.Database.open` opens."""
        return self.url if self.url is not None else self.database_path


class HaSettings(_Section):
    """Leadership among the daemons that share one PostgreSQL store (unused with SQLite).

    The leader holds a lease in the database and renews it every ``retry_period_s``; it
    stops acting when it could not renew for ``renew_deadline_s``, and a standby takes
    over once the lease is ``lease_duration_s`` old (as client-go's leader election).
    """

    # This daemon's name in the lease and in status (default: host name, pid, a suffix).
    identity: str | None = Field(default=None, min_length=1, max_length=200)
    # The URL standbys forward mutations to while this daemon leads (default:
    # http://<http.host or this host's name>:<http.port>).
    advertise_url: str | None = None
    lease_duration_s: float = Field(default=10.0, gt=0)
    renew_deadline_s: float = Field(default=7.0, gt=0)
    retry_period_s: float = Field(default=2.0, gt=0)
    forward_timeout_s: float = Field(default=10.0, gt=0)

    @field_validator("renew_deadline_s")
    @classmethod
    def _renew_before_expiry(cls, value: float, info: ValidationInfo) -> float:
        lease = info.data.get("lease_duration_s")
        if lease is not None and value >= lease:
            raise ValueError(f"must be below ha.lease_duration_s ({lease})")
        return value

    @field_validator("retry_period_s")
    @classmethod
    def _retry_before_deadline(cls, value: float, info: ValidationInfo) -> float:
        deadline = info.data.get("renew_deadline_s")
        if deadline is not None and value >= deadline:
            raise ValueError(f"must be below ha.renew_deadline_s ({deadline})")
        return value


class RolloutSettings(_Section):
    """Rollout controller: tick, default profile and metric, custom profiles."""

    tick_interval_s: float = Field(default=10.0, gt=0)
    # Extra or overriding profiles by name: {name = {steps = [...], alpha_worse = ...}}.
    # Declared before default_profile, which is checked against them.
    profiles: dict[str, RolloutProfile] = Field(default_factory=dict)
    default_profile: str = "balanced"
    default_primary_metric: Literal["feedback_score", "success_rate", "quality"] = "feedback_score"
    # Multiplies every step's minimum duration and the starvation grace period; the demo
    # and tests use a small value to see a whole rollout in seconds.
    time_scale: float = Field(default=1.0, gt=0)
    # Save live rollouts' aggregates this often (and at a clean stop), so that a start
    # replays only the events stored since instead of all since the rollout began. 0: never.
    snapshot_interval_s: float = Field(default=60.0, ge=0)

    @field_validator("profiles", mode="before")
    @classmethod
    def _name_profiles(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"name": k, **v} if isinstance(v, dict) else v for k, v in value.items()}
        return value

    @field_validator("default_profile")
    @classmethod
    def _known_profile(cls, value: str, info: ValidationInfo) -> str:
        configured = info.data.get("profiles")
        if configured is None:  # the profiles are invalid themselves; that error is shown
            return value
        known = sorted({*PROFILES, *configured})
        if value not in known:
            raise ValueError(f"unknown profile {value!r}; known profiles: {', '.join(known)}")
        return value


class Settings(BaseSettings):
    """Root settings of the daemon."""

    model_config = SettingsConfigDict(
        env_prefix="PROMPTD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    shutdown_timeout_s: float = Field(default=10.0, gt=0)
    kafka: KafkaSettings = KafkaSettings()
    http: HttpSettings = HttpSettings()
    otlp: OtlpSettings = OtlpSettings()
    storage: StorageSettings = StorageSettings()
    ha: HaSettings = HaSettings()
    rollout: RolloutSettings = RolloutSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    optimization: OptimizationSettings = OptimizationSettings()
    evaluation: EvaluationSettings = EvaluationSettings()

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Order: arguments, environment, ``.env``, then the TOML file if one is named.

        The environment and ``.env`` are checked and translated by
        :func:`~promptd.daemon.settings_sources.read_sources` (unknown names are errors).
        """
        sources = read_sources(cls, _CONFIG_FILE.get())
        _LAST_SOURCES.set(sources)
        return (
            init_settings,
            VariablesSource(settings_cls, sources.environment),
            VariablesSource(settings_cls, sources.dotenv),
            DataSource(settings_cls, sources.toml),
        )


def load_settings(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    origins: Mapping[str, str] | None = None,
) -> Settings:
    """Build settings from all sources; raise :class:`SettingsError` naming the bad setting.

    ``overrides`` maps dotted setting names (``"http.port"``) to values that win over
    every other source (the CLI's flags); ``origins`` names where each came from
    (``{"http.port": "--http-port"}``) for error messages.
    """
    if config_file is not None and not Path(config_file).is_file():
        raise SettingsError(f"config file {str(config_file)!r} does not exist")
    token = _CONFIG_FILE.set(None if config_file is None else str(config_file))
    try:
        return Settings(**_nest(overrides or {}))
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc, origins)) from None
    finally:
        _CONFIG_FILE.reset(token)


def _nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for name, value in dotted.items():
        *head, last = name.split(".")
        target = nested
        for part in head:
            target = target.setdefault(part, {})
        target[last] = value
    return nested


def _did_you_mean(loc: tuple[str, ...]) -> str:
    model: type[BaseModel] | None = Settings
    for part in loc[:-1]:
        info = model.model_fields.get(part) if model is not None else None
        model = model_of(info.annotation) if info is not None else None
    if model is None:
        return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {'.'.join((*loc[:-1], close[0]))}?)" if close else ""


#: Settings whose values are never printed, not even when invalid.
_SECRET = re.compile(r"(token|password|secret|api_key|credentials?)$", re.IGNORECASE)


def describe_validation_error(
    exc: ValidationError, origins: Mapping[str, str] | None = None
) -> str:
    """One line naming each bad setting as the operator set it, never showing a secret."""
    sources = _LAST_SOURCES.get()
    parts = []
    for err in exc.errors(include_url=False):
        loc = tuple(str(p) for p in err["loc"])
        dotted = ".".join(loc)
        origin = (origins or {}).get(dotted) or (sources.origin(loc) if sources else None)
        origin = origin or "PROMPTD_" + "__".join(loc).upper()
        given = err.get("input")
        secret = any(_SECRET.search(part) for part in loc)
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "no such setting" + _did_you_mean(loc)
        hidden = secret or isinstance(given, dict) or repr(given) in message
        shown = "" if hidden else f" (got {given!r})"
        parts.append(f"invalid setting {dotted} [{origin}]: {message}{shown}")
    return "; ".join(parts)


if __name__ == "__main__":
    # Regenerates the SDK's copy of the daemon's variable names (see sdk_names_module).
    import sys

    sys.stdout.write(sdk_names_module(Settings))
