"""Settings: sources, precedence, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptd.daemon.settings import SettingsError, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "promptd.example.toml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PROMPTD_ variable or .env file from the developer's shell leaks in."""
    import os

    for name in list(os.environ):
        if name.startswith("PROMPTD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_example_config_loads_and_matches_defaults() -> None:
    """The documented example config is valid and equal to the built-in defaults."""
    from promptd.daemon.settings import Settings

    assert load_settings(EXAMPLE) == Settings()


def test_environment_overrides_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Flat and nested PROMPTD_ variables win over the TOML file."""
    config = tmp_path / "c.toml"
    config.write_text(
        'log_level = "debug"\n[kafka]\ngroup_id = "from-toml"\ntopic_partitions = 6\n'
    )
    monkeypatch.setenv("PROMPTD_KAFKA_BOOTSTRAP_SERVERS", "k1:9092")
    monkeypatch.setenv("PROMPTD_KAFKA__GROUP_ID", "from-env")
    monkeypatch.setenv("PROMPTD_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("PROMPTD_HTTP_PORT", "9999")
    monkeypatch.setenv("PROMPTD_ADMIN_TOKEN", "s3cret-token-0123456789")
    settings = load_settings(config)
    assert settings.log_level == "debug"
    assert settings.kafka.bootstrap_servers == "k1:9092"
    assert settings.kafka.group_id == "from-env"
    assert settings.kafka.topic_partitions == 6
    assert settings.storage.data_dir == tmp_path / "d"
    assert settings.http.port == 9999
    assert settings.http.admin_token == "s3cret-token-0123456789"


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    """A .env file in the working directory sets PROMPTD_ variables."""
    (tmp_path / ".env").write_text("PROMPTD_HTTP_HOST=127.0.0.2\nPROMPTD_LOG_LEVEL=WARNING\n")
    settings = load_settings()
    assert settings.http.host == "127.0.0.2"
    assert settings.log_level == "warning"


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("PROMPTD_HTTP_PORT", "70000", "PROMPTD_HTTP_PORT"),
        ("PROMPTD_KAFKA__TOPIC_PARTITIONS", "zero", "PROMPTD_KAFKA__TOPIC_PARTITIONS"),
        ("PROMPTD_ADMIN_TOKEN", "short", "PROMPTD_ADMIN_TOKEN"),
        ("PROMPTD_LOG_LEVEL", "loud", "PROMPTD_LOG_LEVEL"),
    ],
)
def test_invalid_setting_is_named(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    """An invalid value fails at start with a message naming the setting."""
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError, match=named):
        load_settings()


def test_unknown_toml_key_is_an_error(tmp_path: Path) -> None:
    """A typo in the TOML file is reported with its section and key."""
    config = tmp_path / "c.toml"
    config.write_text("[kafka]\ngroup = 'x'\n")
    with pytest.raises(SettingsError, match=r"kafka\.group"):
        load_settings(config)


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    """Naming a config file that does not exist is a clear error."""
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_sdk_variables_are_honoured_or_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's flat topic and security variables set the daemon's settings; its daemon
    URL, client id and PROMPTD_SDK_* variables are accepted and ignored."""
    monkeypatch.setenv("PROMPTD_KAFKA_METRICS_TOPIC", "app.metrics")
    monkeypatch.setenv("PROMPTD_KAFKA_FEEDBACK_TOPIC", "app.feedback")
    monkeypatch.setenv("PROMPTD_KAFKA_ROUTING_TOPIC", "app.routing")
    monkeypatch.setenv("PROMPTD_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("PROMPTD_KAFKA_CLIENT_ID", "my-app")
    monkeypatch.setenv("PROMPTD_DAEMON_URL", "http://daemon:8787")
    monkeypatch.setenv("PROMPTD_SDK_QUEUE_SIZE", "10")
    kafka = load_settings().kafka
    assert (kafka.metrics_topic, kafka.feedback_topic, kafka.routing_topic) == (
        "app.metrics",
        "app.feedback",
        "app.routing",
    )
    assert kafka.security_protocol == "SASL_SSL"
    assert kafka.client_id == "promptd"


def test_every_sdk_variable_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """No variable the SDK reads is refused by the daemon (one environment serves both)."""
    import dataclasses

    from promptd.sdk.config import SdkConfig, environment_variables

    kinds = {f.name: str(f.type) for f in dataclasses.fields(SdkConfig)}
    samples = {"bool": "true", "int": "10", "float": "1.0"}
    for name, field in environment_variables().items():
        kind = kinds[field]
        value = next((v for k, v in samples.items() if kind.startswith(k)), "PLAINTEXT")
        monkeypatch.setenv(name, "k:9092" if field == "bootstrap_servers" else value)
    assert load_settings().kafka.bootstrap_servers == "k:9092"


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("PROMPTD_HTTP_PROT", "PROMPTD_HTTP_PORT"),
        ("PROMPTD_KAFKA_GROUP_ID", "PROMPTD_KAFKA__GROUP_ID"),
        ("PROMPTD_KAFKA__GROUPID", "PROMPTD_KAFKA__GROUP_ID"),
        ("PROMPTD_DAEMON_UR", "PROMPTD_DAEMON_URL"),
    ],
)
def test_unknown_variable_names_the_closest(
    monkeypatch: pytest.MonkeyPatch, name: str, suggestion: str
) -> None:
    """A PROMPTD_ variable that sets nothing is an error naming it and the closest name."""
    monkeypatch.setenv(name, "1")
    with pytest.raises(SettingsError, match=f"unknown variable {name} .did you mean {suggestion}"):
        load_settings()


def test_nested_names_below_dict_settings_are_known(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variables below a model or dict setting are known (deep nesting, optional models)."""
    monkeypatch.setenv("PROMPTD_OPTIMIZATION__PROPOSER__MODEL", "openai/gpt-4o-mini")
    settings = load_settings()
    assert settings.optimization.proposer is not None


def test_unprefixed_variables_are_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """ADMIN_TOKEN and DATA_DIR without the prefix set nothing."""
    monkeypatch.setenv("ADMIN_TOKEN", "x" * 20)
    monkeypatch.setenv("DATA_DIR", "/elsewhere")
    settings = load_settings()
    assert settings.http.admin_token is None
    assert str(settings.storage.data_dir) == "data"


def test_flat_and_nested_names_must_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting one setting through two names with different values is an error."""
    monkeypatch.setenv("PROMPTD_HTTP_PORT", "1000")
    monkeypatch.setenv("PROMPTD_HTTP__PORT", "2000")
    with pytest.raises(SettingsError, match="PROMPTD_HTTP_PORT and PROMPTD_HTTP__PORT"):
        load_settings()


def test_flags_win_and_are_named_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI overrides win over the environment, and a bad one is named by its flag."""
    monkeypatch.setenv("PROMPTD_HTTP_PORT", "1000")
    assert load_settings(overrides={"http.port": 2000}).http.port == 2000
    with pytest.raises(SettingsError, match=r"http\.port \[--http-port\]"):
        load_settings(overrides={"http.port": 99999}, origins={"http.port": "--http-port"})


def test_secrets_are_never_printed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An invalid secret (admin token, SASL password) is reported by name only."""
    monkeypatch.setenv("PROMPTD_ADMIN_TOKEN", "short-secret")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "PROMPTD_ADMIN_TOKEN" in str(info.value)
    assert "short-secret" not in str(info.value)
    monkeypatch.delenv("PROMPTD_ADMIN_TOKEN")
    config = tmp_path / "c.toml"
    config.write_text('[kafka]\nsasl_password = ["hunter2"]\n')
    with pytest.raises(SettingsError) as info:
        load_settings(config)
    assert "kafka.sasl_password" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_unknown_default_profile(tmp_path: Path) -> None:
    """rollout.default_profile must name a built-in or configured profile."""
    config = tmp_path / "c.toml"
    config.write_text(
        '[rollout]\ndefault_profile = "careful"\n'
        "[rollout.profiles.careful]\nsteps = [{weight = 1.0}]\n"
    )
    assert load_settings(config).rollout.default_profile == "careful"
    config.write_text('[rollout]\ndefault_profile = "carefull"\n')
    with pytest.raises(SettingsError, match=r"rollout\.default_profile .in .*c\.toml.: unknown"):
        load_settings(config)


def test_toml_errors_name_the_file(tmp_path: Path) -> None:
    """Invalid TOML, non-UTF-8 bytes and a directory are each reported with the path."""
    config = tmp_path / "c.toml"
    config.write_text("[kafka\n")
    with pytest.raises(SettingsError, match=r"c\.toml' is not valid TOML: .*line 1"):
        load_settings(config)
    config.write_bytes(b'log_level = "\xff"\n')
    with pytest.raises(SettingsError, match=r"c\.toml' is not UTF-8"):
        load_settings(config)


def test_typo_in_toml_suggests_the_key(tmp_path: Path) -> None:
    """An unknown TOML key names the closest known key of its section."""
    config = tmp_path / "c.toml"
    config.write_text("[storage]\nretention_day = 3\n")
    with pytest.raises(SettingsError, match=r"did you mean storage\.retention_days"):
        load_settings(config)


def test_empty_bootstrap_means_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    """PROMPTD_KAFKA_BOOTSTRAP_SERVERS= (empty) selects the embedded broker, as unset does."""
    monkeypatch.setenv("PROMPTD_KAFKA_BOOTSTRAP_SERVERS", "")
    assert load_settings().kafka.embedded


def test_example_evaluators_are_valid() -> None:
    """The commented evaluators of the example config, uncommented, are valid settings."""
    import re
    import tomllib

    from promptd.evaluation.config import EvaluationSettings

    text, signals = EXAMPLE.read_text(encoding="utf-8").split("# [[evaluation.signals]]")
    blocks = text.split("# [[evaluation.evaluators]]")[1:]
    assert len(blocks) == 3

    def uncommented(block: str) -> dict[str, object]:
        # A block ends at the first blank line (prose about the next section follows).
        block = block.split("\n\n")[0]
        lines = [re.sub(r"^# ", "", line) for line in block.splitlines() if line.startswith("# ")]
        lines = [line for line in lines if not line.startswith("#") and line.strip()]
        return tomllib.loads("\n".join(lines))

    evaluators = [uncommented(block) for block in blocks]
    settings = EvaluationSettings.model_validate(
        {"evaluators": evaluators, "signals": [uncommented(signals)]}
    )
    assert [e.type for e in settings.evaluators] == ["json_schema", "regex", "judge"]
    assert settings.signals_for("support", "rollout") == ("eval:helpful",)


def test_bad_evaluators_are_named_in_the_config_file(tmp_path: Path) -> None:
    """A misspelled or missing key of an evaluator is one line naming the evaluator's
    place, the key and the file it comes from."""
    config = tmp_path / "c.toml"
    config.write_text(
        '[[evaluation.evaluators]]\nname = "ok"\ntype = "length"\nmax_chars = 3\n'
        '[[evaluation.evaluators]]\nname = "helpful"\ntype = "judge"\nmodel = "m"\n'
        'rubrik = "x"\n'
    )
    with pytest.raises(SettingsError) as err:
        load_settings(config)
    message = str(err.value)
    assert f"evaluation.evaluators.1.judge.rubric [in {config}]: Field required" in message
    assert f"evaluation.evaluators.1.judge.rubrik [in {config}]: no such setting" in message
