"""Daemon configuration: one root :class:`Settings` built once at start and passed down.

Sources, highest priority first: constructor arguments (tests, CLI flags), environment
variables ``PROMPTD_…`` (nested sections with ``__``, e.g. ``PROMPTD_KAFKA__GROUP_ID``;
the common ones also have flat aliases such as ``PROMPTD_KAFKA_BOOTSTRAP_SERVERS``), a
``.env`` file, then the TOML file named by ``PROMPTD_CONFIG`` or ``--config``.
See ``promptd.example.toml`` at the repository root for every setting with its default.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from promptd.monitoring.config import MonitoringSettings
from promptd.optimization.config import OptimizationSettings
from promptd.replacement.profiles import RolloutProfile

# The --config file, passed to the TOML source without touching os.environ.
_CONFIG_FILE: ContextVar[str | None] = ContextVar("promptd_config_file", default=None)


class SettingsError(Exception):
    """Invalid configuration; the message names the setting and what is wrong."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    """Kafka connection, topics and consumer tuning."""

    bootstrap_servers: str | None = Field(
        default=None,
        description="host:port[,host:port]; unset means: start the embedded development broker",
    )
    client_id: str = "promptd"
    group_id: str = "promptd"
    metrics_topic: str = "promptd.metrics"
    feedback_topic: str = "promptd.feedback"
    dlq_topic: str = "promptd.dlq"
    alerts_topic: str = "promptd.alerts"
    routing_topic: str = "promptd.routing"
    optimization_topic: str = "promptd.optimization"
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

    @property
    def embedded(self) -> bool:
        """True when no bootstrap address is configured (development broker)."""
        return not self.bootstrap_servers

    @property
    def event_topics(self) -> tuple[str, str]:
        """The two topics the ingestion consumer reads."""
        return (self.metrics_topic, self.feedback_topic)


class HttpSettings(_Section):
    """The HTTP API (health, metrics, status, admin)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8787, ge=0, le=65535)
    admin_token: str | None = Field(default=None, min_length=16)
    routing_ttl_s: float = Field(default=30.0, gt=0)


class StorageSettings(_Section):
    """SQLite storage."""

    data_dir: Path = Path("./data")
    database_name: str = "promptd.db"
    busy_timeout_ms: int = Field(default=5_000, ge=0)
    retention_days: float = Field(default=30.0, gt=0)
    retention_interval_s: float = Field(default=3600.0, gt=0)
    # How often the daemon checks that its database file is still the one it opened.
    file_check_interval_s: float = Field(default=1.0, gt=0)

    @property
    def database_path(self) -> Path:
        """Full path of the SQLite file."""
        return self.data_dir / self.database_name


class RolloutSettings(_Section):
    """Rollout controller: tick, default profile and metric, custom profiles."""

    tick_interval_s: float = Field(default=10.0, gt=0)
    default_profile: str = "balanced"
    default_primary_metric: Literal["feedback_score", "success_rate", "quality"] = "feedback_score"
    # Multiplies every step's minimum duration and the starvation grace period; the demo
    # and tests use a small value to see a whole rollout in seconds.
    time_scale: float = Field(default=1.0, gt=0)
    # Extra or overriding profiles by name: {name = {steps = [...], alpha_worse = ...}}.
    profiles: dict[str, RolloutProfile] = Field(default_factory=dict)

    @field_validator("profiles", mode="before")
    @classmethod
    def _name_profiles(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"name": k, **v} if isinstance(v, dict) else v for k, v in value.items()}
        return value


class Settings(BaseSettings):
    """Root settings of the daemon."""

    model_config = SettingsConfigDict(
        env_prefix="PROMPTD_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="forbid",
        frozen=True,
        populate_by_name=True,
    )

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    shutdown_timeout_s: float = Field(default=10.0, gt=0)
    kafka: KafkaSettings = KafkaSettings()
    http: HttpSettings = HttpSettings()
    storage: StorageSettings = StorageSettings()
    rollout: RolloutSettings = RolloutSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    optimization: OptimizationSettings = OptimizationSettings()

    # Flat aliases the operator guide promises (PROMPTD_KAFKA_BOOTSTRAP_SERVERS, ...);
    # folded into the sections by ``_fold_flat``.
    kafka_bootstrap_servers: str | None = Field(default=None, exclude=True)
    data_dir: Path | None = Field(default=None, exclude=True)
    http_host: str | None = Field(default=None, exclude=True)
    http_port: int | None = Field(default=None, exclude=True, ge=0, le=65535)
    admin_token: str | None = Field(
        default=None, exclude=True, validation_alias=AliasChoices("admin_token")
    )

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
        """Order: arguments, environment, ``.env``, then the TOML file if one is named."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        toml_path = _CONFIG_FILE.get() or os.environ.get("PROMPTD_CONFIG")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)

    def model_post_init(self, context: Any, /) -> None:
        """Fold the flat aliases into their sections (the flat form wins)."""
        kafka_update: dict[str, Any] = {}
        if self.kafka_bootstrap_servers is not None:
            kafka_update["bootstrap_servers"] = self.kafka_bootstrap_servers or None
        http_update: dict[str, Any] = {}
        if self.http_host is not None:
            http_update["host"] = self.http_host
        if self.http_port is not None:
            http_update["port"] = self.http_port
        if self.admin_token is not None:
            http_update["admin_token"] = self.admin_token
        storage_update: dict[str, Any] = {}
        if self.data_dir is not None:
            storage_update["data_dir"] = self.data_dir
        for name, update in (
            ("kafka", kafka_update),
            ("http", http_update),
            ("storage", storage_update),
        ):
            if update:
                section = getattr(self, name)
                merged = type(section).model_validate({**section.model_dump(), **update})
                object.__setattr__(self, name, merged)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from all sources; raise :class:`SettingsError` naming the bad setting."""
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise SettingsError(f"config file {str(path)!r} does not exist")
        token = _CONFIG_FILE.set(str(path))
        try:
            return _build(**overrides)
        finally:
            _CONFIG_FILE.reset(token)
    elif (named := os.environ.get("PROMPTD_CONFIG")) and not Path(named).is_file():
        raise SettingsError(f"PROMPTD_CONFIG names {named!r}, which does not exist")
    return _build(**overrides)


def _build(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None
    except ValueError as exc:  # a malformed TOML file
        raise SettingsError(f"cannot read the configuration: {exc}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per bad setting, each naming the setting as an operator would write it."""
    lines = []
    for err in exc.errors(include_url=False):
        dotted = ".".join(str(p) for p in err["loc"])
        env = "PROMPTD_" + "__".join(str(p) for p in err["loc"]).upper()
        given = err.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"invalid setting {dotted} [{env}]: {err['msg']}{shown}")
    return "; ".join(lines)
