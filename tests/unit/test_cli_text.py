"""What the CLI prints: help for every argument, rollouts in words, quiet broken pipes."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from promptd.daemon import cli
from promptd.daemon.cli.rollout_text import rollout_rows

PROMPTD = [sys.executable, "-m", "promptd.daemon.cli"]


def _actions() -> list[tuple[str, argparse.Action]]:
    found = []
    for parser in cli._all_parsers(cli._parser()):
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction | argparse._VersionAction):
                found.append((parser.prog, action))
    return found


def test_every_argument_of_every_command_is_described() -> None:
    """--help describes each argument and subcommand, with no internal names."""
    undescribed, internal = [], []
    for prog, action in _actions():
        if isinstance(action, argparse._SubParsersAction):
            undescribed += [(prog, c.dest) for c in action._choices_actions if not c.help]
            continue
        if not action.help or action.help == argparse.SUPPRESS:
            undescribed.append((prog, action.dest))
        shown = action.metavar or (action.dest.upper() if not action.option_strings else "")
        if isinstance(shown, str) and re.search(r"SETTING|[A-Za-z_]\.[A-Za-z_]", shown):
            internal.append((prog, shown))
    assert undescribed == []
    assert internal == []


def test_help_states_score_ranges() -> None:
    """Where a command takes a score, its help says 0 to 1."""
    out = subprocess.run(
        [*PROMPTD, "feedback", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "0 to 1" in out
    run_help = subprocess.run(
        [*PROMPTD, "run", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "SETTING" not in run_help
    assert "--data-dir DIR" in run_help


def test_output_into_a_closed_pipe_ends_without_a_traceback(tmp_path: Path) -> None:
    """`promptd … | head` that stops reading: no BrokenPipeError traceback nor 'Exception
    ignored' line, and the shell's exit status for SIGPIPE."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTD_")}
    env["PROMPTD_DATA_DIR"] = str(tmp_path / "data")
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [*PROMPTD, "init"], stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=60
        )
    finally:
        os.close(write)
    assert result.stderr == ""
    assert result.returncode == 141


def test_a_chat_configuration_given_as_config_says_to_use_chat(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old `prompts register NAME --config extract.toml`: --config is the daemon's
    settings file, so the chat configuration is refused with the flag that takes it."""
    monkeypatch.chdir(tmp_path)
    chat = tmp_path / "extract.toml"
    chat.write_text('[[messages]]\nrole = "user"\ncontent = "Message: {text}"\n')
    assert cli.main(["prompts", "register", "extract", "--config", str(chat)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"promptd: {chat} is a chat configuration, not the daemon's settings (--config): "
        f"register it with `promptd prompts register NAME --chat {chat}`"
    )


def _view(status: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "ro-1",
        "prompt": "summarize",
        "baseline_version": "v1",
        "candidate_version": "v2",
        "status": status,
        "step": 1,
        "weight": 0.25 if status in ("running", "paused") else 0.0,
        "primary_metric": "feedback_score",
        "decisions": [{"kind": "advance", "reason": "step 1 complete"}],
        **extra,
    }


ARMS = {
    "baseline": {
        "requests": 900,
        "primary_samples": 450,
        "primary_mean": 0.8,
        "error_rate": 0.01,
        "latency_geomean_ms": 812.4,
        "cost_per_request": 0.0002,
    },
    "candidate": {
        "requests": 300,
        "primary_samples": 150,
        "primary_mean": 0.84,
        "error_rate": 0.0,
        "latency_geomean_ms": 790.0,
        "cost_per_request": None,
    },
}
STATISTICS = {
    "primary_diff": 0.04,
    "primary_se": 0.031,
    "primary_p_worse": 1.0,
    "primary_p_better": 0.42,
    "step_n_baseline": 120,
    "step_n_candidate": 40,
    "step_elapsed_s": 95.2,
}


def test_a_live_rollout_shows_its_step_arms_and_test_figures() -> None:
    """The text view has what --json has for a decision: step and share, each arm's
    samples and means, the test's difference, standard error and p-values."""
    rows = dict(rollout_rows(_view("running", arms=ARMS, statistics=STATISTICS, winner=None)))
    assert rows["traffic"] == "step 2, 25% of units on the candidate"
    assert rows["  baseline"] == (
        "900 requests, 450 feedback_score samples (mean 0.800), errors 1.0%, "
        "latency 812 ms (geometric mean), $0.00020 per request"
    )
    assert rows["  candidate"].startswith("300 requests, 150 feedback_score samples (mean 0.840)")
    assert rows["test"] == (
        "candidate − baseline +0.0400 (standard error 0.0310); always-valid p: worse 1.000, "
        "better 0.420"
    )
    assert rows["this step"] == "120 / 40 samples (baseline / candidate), 95 s in"
    assert rows["significantly better"] == "neither (yet)"


@pytest.mark.parametrize(
    ("status", "traffic"),
    [
        ("promoted", "ended: v2 was promoted and serves all traffic"),
        ("rolled_back", "ended: rolled back, v1 serves all traffic"),
        ("no_improvement", "ended without a significant win: v1 stays active"),
        ("paused", "paused at step 2, 25% of units on the candidate"),
        ("pending", "not started yet"),
    ],
)
def test_the_traffic_row_says_where_the_rollout_stands(status: str, traffic: str) -> None:
    """An ended rollout says how it ended, never 'step / weight 0 / 0.0'."""
    rows = rollout_rows(_view(status, arms=None, statistics=None, winner="candidate"))
    assert dict(rows)["traffic"] == traffic
    assert "step / weight" not in dict(rows)
