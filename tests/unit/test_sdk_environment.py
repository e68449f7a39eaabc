"""The SDK's reading of the app's environment: typos and bad values are warned about once."""

from __future__ import annotations

import logging

import pytest

from promptd.sdk import SdkConfig, notices
from promptd.sdk.config import environment_variables


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with no cause warned about yet."""
    monkeypatch.setattr(notices, "_warned", set())


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "promptd.sdk"]


def test_daemon_variable_list_is_current() -> None:
    """The SDK's copy of the daemon's variable names matches the daemon's settings (else
    regenerate it: python -m promptd.daemon.settings > promptd/sdk/daemon_variables.py)."""
    from pathlib import Path

    import promptd.sdk.daemon_variables as generated
    from promptd.daemon.settings import Settings
    from promptd.daemon.settings_sources import sdk_names_module

    assert Path(generated.__file__).read_text() == sdk_names_module(Settings)


def test_misspelled_variable_is_warned_once_with_the_closest_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A PROMPTD_ variable nothing reads is named once, with the variable meant; the
    config is still built."""
    env = {"PROMPTD_KAFKA_BOOTSTRAP_SERVER": "localhost:9092", "PROMPTD_DEAMON_URL": "x"}
    with caplog.at_level(logging.WARNING, "promptd.sdk"):
        config = SdkConfig.from_env(env)
        SdkConfig.from_env(env)
    assert config.bootstrap_servers is None
    assert sorted(_warnings(caplog)) == [
        "promptd SDK: unknown variable PROMPTD_DEAMON_URL (did you mean PROMPTD_DAEMON_URL?): "
        "neither the SDK nor the daemon reads it, so it has no effect",
        "promptd SDK: unknown variable PROMPTD_KAFKA_BOOTSTRAP_SERVER (did you mean "
        "PROMPTD_KAFKA_BOOTSTRAP_SERVERS?): neither the SDK nor the daemon reads it, so it "
        "has no effect",
    ]


def test_daemon_and_sdk_variables_are_not_warned(caplog: pytest.LogCaptureFixture) -> None:
    """One environment serves the daemon and the apps: the daemon's variables (flat,
    nested, keys of dict-valued settings) and every SDK variable pass silently."""
    env = dict.fromkeys(environment_variables(), "1")
    env.update(
        {
            "PROMPTD_HTTP_PORT": "8787",
            "PROMPTD_ADMIN_TOKEN": "x" * 16,
            "PROMPTD_OPTIMIZATION__PROPOSER__MODEL": "openai/gpt-4o-mini",
            "PROMPTD_ROLLOUT__PROFILES__FAST__TICK": "1",
            "OTHER_VARIABLE": "ignored",
        }
    )
    with caplog.at_level(logging.WARNING, "promptd.sdk"):
        SdkConfig.from_env({k: v for k, v in env.items() if "QUEUE" not in k})
    assert [m for m in _warnings(caplog) if "unknown variable" in m] == []


def test_bad_values_are_warned_and_leave_the_default(caplog: pytest.LogCaptureFixture) -> None:
    """A value that does not parse (a number, a boolean) keeps the default and is named
    once."""
    env = {
        "PROMPTD_SDK_QUEUE_SIZE": "lots",
        "PROMPTD_KAFKA_ENABLE_IDEMPOTENCE": "ture",
        "PROMPTD_SDK_SEND_TIMEOUT_S": "2.5",
    }
    with caplog.at_level(logging.WARNING, "promptd.sdk"):
        config = SdkConfig.from_env(env)
    assert config.queue_size == SdkConfig().queue_size
    assert config.enable_idempotence is False
    assert config.send_timeout_s == 2.5
    assert sorted(_warnings(caplog)) == [
        "promptd SDK: invalid value 'lots' in PROMPTD_SDK_QUEUE_SIZE: expected an integer; "
        "the default is used",
        "promptd SDK: invalid value 'ture' in PROMPTD_KAFKA_ENABLE_IDEMPOTENCE: expected "
        "true or false (also 1/0, yes/no, on/off); the default is used",
    ]


def test_booleans_are_read_strictly() -> None:
    """true/false and their usual spellings are read; nothing else turns a flag off."""
    assert SdkConfig.from_env({"PROMPTD_SDK_ROUTE_FIRST_CALL": "off"}).route_first_call is False
    assert SdkConfig.from_env({"PROMPTD_KAFKA_ENABLE_IDEMPOTENCE": "Yes"}).enable_idempotence
