"""The pipeline CLI: ``promptd pipelines rollout`` turns its flags into the route's body."""

from __future__ import annotations

import argparse

import pytest

from promptd.daemon.cli import pipelines as commands_pipelines
from promptd.daemon.cli.common import CommandError


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    commands_pipelines.register(sub)
    return parser.parse_args(["pipelines", *argv])


def test_rollout_flags_become_the_body() -> None:
    """Repeated --candidate PROMPT=VERSION, --profile, --metric and --require-win."""
    args = _parse(
        "rollout",
        "geo",
        "--candidate",
        "extract=v3",
        "--candidate",
        "answer=v2=b",
        "--metric",
        "quality",
        "--require-win",
    )
    assert commands_pipelines._rollout_body(args) == {
        "candidates": {"extract": "v3", "answer": "v2=b"},
        "primary_metric": "quality",
        "require_win": True,
    }
    plain = _parse("rollout", "geo", "--candidate", "answer=v2", "--profile", "aggressive")
    assert commands_pipelines._rollout_body(plain) == {
        "candidates": {"answer": "v2"},
        "profile": "aggressive",
    }


@pytest.mark.parametrize(
    ("candidates", "message"),
    [
        (["answer"], "use PROMPT=VERSION"),
        (["=v2"], "use PROMPT=VERSION"),
        (["answer="], "use PROMPT=VERSION"),
        (["answer=v2", "answer=v3"], "'answer' is named twice"),
    ],
)
def test_a_bad_candidate_is_one_clear_error(candidates: list[str], message: str) -> None:
    """A candidate without a prompt, a version or the '=', or a step named twice."""
    argv = [item for c in candidates for item in ("--candidate", c)]
    with pytest.raises(CommandError, match=message):
        commands_pipelines._rollout_body(_parse("rollout", "geo", *argv))


def test_rollout_needs_a_candidate() -> None:
    """Without --candidate the parser refuses the command."""
    with pytest.raises(SystemExit):
        _parse("rollout", "geo")
