"""Where settings come from besides arguments: the environment, ``.env`` and the TOML file.

Every ``PROMPTD_`` variable must mean something, so a typo is an error rather than a
setting silently left at its default:

- ``PROMPTD_<SECTION>__<NAME>`` (any depth) names a setting; a dict-valued setting takes
  any key below it;
- the flat names of the common settings (:data:`FLAT_VARIABLES`);
- ``PROMPTD_CONFIG`` names the TOML file;
- the app SDK's variables (:func:`promptd.sdk.config.environment_variables`), so one
  environment can serve the daemon and the apps. Those that mean the same thing for the
  daemon are honoured (:data:`SHARED_SDK_SETTINGS`: the topics and the cluster's
  connection and security); the others (``PROMPTD_DAEMON_URL``, ``PROMPTD_SDK_*``, the
  SDK's client id) are accepted and ignored.

Variables without the prefix are never read. Each source is translated to nested names
(``PROMPTD_HTTP_PORT`` -> ``PROMPTD_HTTP__PORT``) before pydantic-settings parses it, and
remembers which name set each setting, so errors name what the operator wrote.
"""

from __future__ import annotations

import difflib
import os
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource

from promptd.sdk.config import environment_variables as sdk_variables

PREFIX = "PROMPTD_"
DELIMITER = "__"
DOTENV = Path(".env")

#: The common settings under short names (the README's configuration table).
FLAT_VARIABLES: dict[str, tuple[str, ...]] = {
    "PROMPTD_KAFKA_BOOTSTRAP_SERVERS": ("kafka", "bootstrap_servers"),
    "PROMPTD_DATA_DIR": ("storage", "data_dir"),
    "PROMPTD_STORAGE_URL": ("storage", "url"),
    "PROMPTD_HTTP_HOST": ("http", "host"),
    "PROMPTD_HTTP_PORT": ("http", "port"),
    "PROMPTD_ADMIN_TOKEN": ("http", "admin_token"),
}
#: SDK settings that mean the same thing for the daemon: its flat ``PROMPTD_KAFKA_<NAME>``
#: variable sets ``kafka.<name>``. The SDK's ``client_id`` names the app's client, not
#: the daemon's, so it is not shared.
SHARED_SDK_SETTINGS = frozenset(
    {
        "bootstrap_servers",
        "metrics_topic",
        "feedback_topic",
        "routing_topic",
        "enable_idempotence",
        "security_protocol",
        "sasl_mechanism",
        "sasl_username",
        "sasl_password",
    }
)
CONFIG_VARIABLE = "PROMPTD_CONFIG"

Path_ = tuple[str, ...]


class SettingsError(Exception):
    """Invalid configuration; the message names the setting and what is wrong."""


@dataclass(frozen=True, slots=True)
class Variables:
    """The settings variables of one source (environment or ``.env``), translated."""

    #: Lower-case nested names, as pydantic-settings reads them: ``promptd_http__port``.
    nested: dict[str, str] = field(default_factory=dict)
    #: Which variable set each setting: ``("http", "port") -> "PROMPTD_HTTP_PORT"``.
    origins: dict[Path_, str] = field(default_factory=dict)
    #: The TOML file named by ``PROMPTD_CONFIG`` in this source, if any.
    config_file: str | None = None


def read_dotenv(path: Path = DOTENV) -> dict[str, str]:
    """The ``PROMPTD_`` variables of a ``.env`` file (``{}`` when there is none)."""
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    try:
        values = dotenv_values(path, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read {path}: {exc}") from None
    return {k: v for k, v in values.items() if v is not None and k.upper().startswith(PREFIX)}


def translate(given: Mapping[str, str], model: type[BaseModel], where: str = "") -> Variables:
    """Check and translate the ``PROMPTD_`` variables of one source.

    ``where`` is appended to names in messages (``" in .env"``). Raises
    :class:`SettingsError` naming every unknown variable and its closest known name.
    """
    result = Variables()
    unknown: list[str] = []
    config_file: str | None = None
    sdk = sdk_variables()
    for raw_name, value in given.items():
        name = raw_name.upper()
        if not name.startswith(PREFIX):
            continue
        if name == CONFIG_VARIABLE:
            config_file = value
            continue
        path = setting_path(name, model)
        if path is None:
            if name not in sdk:  # an app-only SDK variable: accepted, ignored
                unknown.append(name)
            continue
        previous = result.origins.get(path)
        key = (PREFIX + DELIMITER.join(path)).lower()
        if previous is not None and result.nested[key] != value:
            raise SettingsError(
                f"{previous} and {name}{where} both set {'.'.join(path)}, to different values"
            )
        result.nested[key] = value
        result.origins[path] = name + where
    if unknown:
        raise SettingsError("; ".join(_unknown_message(n, model, where) for n in sorted(unknown)))
    return Variables(result.nested, result.origins, config_file)


def setting_path(name: str, model: type[BaseModel]) -> Path_ | None:
    """The setting an upper-case variable name sets, or None when it sets none."""
    if name in FLAT_VARIABLES:
        return FLAT_VARIABLES[name]
    parts = tuple(name.removeprefix(PREFIX).lower().split(DELIMITER))
    if all(parts) and _known(model, parts):
        return parts
    sdk_field = sdk_variables().get(name)
    if sdk_field in SHARED_SDK_SETTINGS and name == f"PROMPTD_KAFKA_{sdk_field.upper()}":
        return ("kafka", sdk_field)
    return None


def _known(model: type[BaseModel], parts: Path_) -> bool:
    info = model.model_fields.get(parts[0])
    if info is None:
        return False
    if len(parts) == 1:
        return True
    sub = model_of(info.annotation)
    if sub is not None:
        return _known(sub, parts[1:])
    return _is_mapping(info.annotation)


def _members(annotation: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(annotation)
    return (annotation,)


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model in a field's annotation (``Model | None`` too), if any."""
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def _is_mapping(annotation: Any) -> bool:
    return any(typing.get_origin(m) in (dict, Mapping) for m in _members(annotation))


def known_variables(model: type[BaseModel]) -> list[str]:
    """Every variable name the daemon accepts (dict-valued settings not expanded)."""
    names = [*FLAT_VARIABLES, CONFIG_VARIABLE, *sdk_variables()]
    names += [PREFIX + DELIMITER.join(p).upper() for p in _paths(model, ())]
    return names


def open_prefixes(model: type[BaseModel]) -> list[str]:
    """Prefixes under which any name is accepted: the dict-valued settings'
    (``PROMPTD_ROLLOUT__PROFILES__``)."""
    return [
        PREFIX + DELIMITER.join(path).upper() + DELIMITER
        for path in _paths(model, ())
        if _is_mapping(_annotation(model, path))
    ]


def _annotation(model: type[BaseModel], path: Path_) -> Any:
    current: Any = model
    annotation: Any = None
    for part in path:
        annotation = current.model_fields[part].annotation
        current = model_of(annotation)
    return annotation


def sdk_names_module(model: type[BaseModel]) -> str:
    """The source of :mod:`promptd.sdk.daemon_variables`: the daemon's variable names, for
    the SDK's typo check without importing the daemon (a test keeps it current)."""
    names = sorted(set(known_variables(model)) - set(sdk_variables()))
    lines = [
        '"""Every ``PROMPTD_`` variable the daemon accepts besides the SDK\'s own.',
        "",
        "Generated from the daemon's settings; regenerate with",
        "``python -m promptd.daemon.settings > promptd/sdk/daemon_variables.py``",
        "(tests/unit/test_sdk_environment.py fails when it is stale). The SDK reads it to",
        "warn about a misspelled variable without importing the daemon.",
        '"""',
        "",
        "DAEMON_VARIABLES = frozenset(",
        "    {",
        *(f'        "{name}",' for name in names),
        "    }",
        ")",
        "#: Any name below these is accepted (keys of dict-valued settings).",
        "DAEMON_PREFIXES = (",
        *(f'    "{prefix}",' for prefix in open_prefixes(model)),
        ")",
        "",
    ]
    return "\n".join(lines)


def _paths(model: type[BaseModel], head: Path_) -> Iterator[Path_]:
    for name, info in model.model_fields.items():
        path = (*head, name)
        yield path
        sub = model_of(info.annotation)
        if sub is not None:
            yield from _paths(sub, path)


def _unknown_message(name: str, model: type[BaseModel], where: str) -> str:
    close = difflib.get_close_matches(name, known_variables(model), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown variable {name}{where}{hint}: no setting has this name"


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML file; :class:`SettingsError` naming the file if it cannot be read."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read the config file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"the config file {str(path)!r} is not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"the config file {str(path)!r} is not valid TOML: {exc}") from None


@dataclass(frozen=True, slots=True)
class Sources:
    """Everything read from outside the process's arguments, in priority order."""

    environment: Variables
    dotenv: Variables
    config_file: Path | None
    toml: dict[str, Any]

    def origin(self, loc: Path_) -> str | None:
        """Who set the setting at ``loc`` (or the closest setting above it)."""
        for variables in (self.environment, self.dotenv):
            for depth in range(len(loc), 0, -1):
                if loc[:depth] in variables.origins:
                    return variables.origins[loc[:depth]]
        # A missing setting is named by its parent (the table that lacks it).
        parent = loc[:-1] if len(loc) > 1 else loc
        if self.config_file is not None and (_in(self.toml, loc) or _in(self.toml, parent)):
            return f"in {self.config_file}"
        return None


def _in(data: Any, loc: Path_) -> bool:
    for part in loc:
        if isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        elif isinstance(data, dict) and part in data:
            data = data[part]
        elif not (isinstance(data, dict) and data.get("type") == part):
            # (A discriminated union's tag, e.g. an evaluator's type, is in the path too.)
            return False
    return True


def read_sources(model: type[BaseModel], config_file: str | None) -> Sources:
    """Read and check the environment, ``.env`` and the TOML file."""
    environment = translate(os.environ, model)
    dotenv = translate(read_dotenv(), model, f" in {DOTENV}")
    named = config_file or environment.config_file or dotenv.config_file
    if named is not None and config_file is None and not Path(named).is_file():
        raise SettingsError(f"{CONFIG_VARIABLE} names {named!r}, which does not exist")
    path = Path(named) if named else None
    return Sources(environment, dotenv, path, read_toml(path) if path else {})


class VariablesSource(EnvSettingsSource):
    """pydantic-settings' environment parsing, fed with translated variables."""

    def __init__(self, settings_cls: type[BaseSettings], variables: Variables) -> None:
        self._variables = variables
        super().__init__(settings_cls, case_sensitive=False)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return dict(self._variables.nested)


class DataSource(PydanticBaseSettingsSource):
    """Settings from an already parsed mapping (the TOML file)."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """The raw value of one top-level field."""
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)
