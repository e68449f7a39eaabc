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
