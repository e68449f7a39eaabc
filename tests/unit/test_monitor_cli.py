"""``promptd alerts`` and ``promptd stats`` against a stubbed daemon API."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from promptd.daemon.cli import monitoring as commands_monitoring
from promptd.daemon.cli.common import CommandError
from promptd.daemon.settings import Settings

STATS = {
    "request_count": 10,
    "request_rate": 0.5,
    "success_rate": 0.9,
    "latency_p50": 120.0,
    "latency_p95": 800.0,
    "latency_p99": 900.0,
    "feedback_mean": 0.7,
    "feedback_count": 4,
    "cost_per_request": None,
}


def _parse(argv: list[str]) -> tuple[argparse.Namespace, Any]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    handlers = commands_monitoring.register(sub)
    args = parser.parse_args(argv)
    return args, handlers[args.command]


def test_stats_prints_one_row_per_variant(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stats table has a row per variant and a total; the window goes in the query."""
    calls: list[str] = []

    def fake(settings: Settings, method: str, path: str) -> Any:
        calls.append(path)
        return {"now": 0, "total": STATS, "variants": {"v1": STATS, "v2": STATS}}

    monkeypatch.setattr(commands_monitoring, "http_json", fake)
    args, handler = _parse(["stats", "sum mary", "--window", "1m"])
    assert handler(args, Settings()) == 0
    out = capsys.readouterr().out
    assert calls == ["/v1/prompts/sum%20mary/stats?window=1m"]
    for text in ("v1", "v2", "(all)", "90.0%"):
        assert text in out


def test_stats_without_events_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt without events in the window is reported as an error."""
    monkeypatch.setattr(
        commands_monitoring,
        "http_json",
        lambda *a: {"total": {"request_count": 0}, "variants": {}},
    )
    args, handler = _parse(["stats", "nope"])
    with pytest.raises(CommandError, match="no events"):
        handler(args, Settings())


def test_alerts_lists_active_and_recent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Active alerts are listed with state, rule and labels, then the recent history."""
    body = {
        "active": [
            {
                "state": "firing",
                "rule": "slow",
                "fired_at": 1.0,
                "value": 1500.0,
                "threshold": 1000.0,
                "labels": {"alertname": "slow", "prompt": "p"},
            }
        ],
        "recent": [{"ts": 1.0, "state": "firing", "rule": "slow"}],
    }
    monkeypatch.setattr(commands_monitoring, "http_json", lambda *a: body)
    args, handler = _parse(["alerts"])
    assert handler(args, Settings()) == 0
    out = capsys.readouterr().out
    for text in ("firing", "prompt=p", "recent:"):
        assert text in out
