"""Optional run tracking in MLflow (``pip install 'promptd[tracking]'``).

With ``optimization.tracking.mlflow_tracking_uri`` set, every finished run becomes an
MLflow run in ``mlflow_experiment``: its parameters (prompt, trigger, strategy and why,
budgets, split sizes), its metrics (the active version's and each candidate's validation
mean, the gate's figures, spend), the templates as text artifacts, and the outcome as
tags. The run is logged once it has ended, from a worker thread (MLflow's client is
synchronous); a tracking failure is logged and never fails the run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any, Protocol

import structlog

from promptd.optimization.config import TrackingSettings
from promptd.optimization.outcomes import RunStatus

log = structlog.get_logger("promptd.optimizer")


class Tracker(Protocol):
    """Receives every finished run (its stored row)."""

    async def run_finished(self, run: dict[str, Any]) -> None:
        """Record ``run``; must not raise."""
        ...


class NoTracker:
    """Tracking off."""

    async def run_finished(self, run: dict[str, Any]) -> None:
        """Nothing to do."""


class TrackingUnavailable(RuntimeError):
    """Tracking is configured but MLflow is not installed."""


class MlflowTracker:
    """Logs each finished run to MLflow."""

    def __init__(self, settings: TrackingSettings) -> None:
        if importlib.util.find_spec("mlflow") is None:
            raise TrackingUnavailable(
                "optimization.tracking.mlflow_tracking_uri is set but MLflow is not "
                "installed: pip install 'promptd[tracking]'"
            )
        assert settings.mlflow_tracking_uri is not None
        self.uri = settings.mlflow_tracking_uri
        self.experiment = settings.mlflow_experiment
        self.artifacts = settings.mlflow_artifact_location or _beside_store(self.uri)

    async def run_finished(self, run: dict[str, Any]) -> None:
        """Log ``run`` in a worker thread; failures are logged, not raised."""
        try:
            mlflow_run_id = await asyncio.to_thread(self._log, run)
        except Exception:
            log.exception("optimization_tracking_failed", run_id=run.get("id"))
            return
        log.info("optimization_tracked", run_id=run.get("id"), mlflow_run_id=mlflow_run_id)

    def _log(self, run: dict[str, Any]) -> str:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name(self.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(self.experiment, artifact_location=self.artifacts)
        )
        tags = {
            "promptd.run_id": str(run["id"]),
            "promptd.prompt": str(run["prompt"]),
            "promptd.status": str(run["status"]),
            "promptd.outcome": str(run.get("outcome")),
        }
        created = client.create_run(experiment_id, run_name=str(run["id"]), tags=tags)
        mlflow_id = created.info.run_id
        for name, text in params(run).items():
            client.log_param(mlflow_id, name, text)
        for name, number, step in metrics(run):
            client.log_metric(mlflow_id, name, number, step=step)
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in artifacts(run).items():
                path = Path(tmp) / name
                path.write_text(text, encoding="utf-8")
                client.log_artifact(mlflow_id, str(path))
        status = "FINISHED" if run["status"] == RunStatus.COMPLETED else "FAILED"
        client.set_terminated(mlflow_id, status=status)
        return str(mlflow_id)


def _beside_store(uri: str) -> str | None:
    """``file://<dir>/mlflow-artifacts`` for a ``sqlite:///<dir>/x.db`` store: MLflow's own
    default is ``./mlruns`` in the daemon's working directory, which is nobody's choice."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri[len(prefix) :]).resolve().parent / "mlflow-artifacts").as_uri()


def params(run: dict[str, Any]) -> dict[str, str]:
    """MLflow parameters of a run (strings, MLflow's limit of 6,000 characters each)."""
    selection = run.get("selection") or {}
    progress = run.get("progress") or {}
    out = {
        "prompt": run["prompt"],
        "trigger_kind": run["trigger_kind"],
        "trigger_reason": run["trigger_reason"],
        "strategies": ",".join(run.get("strategies") or []),
        "selection_method": selection.get("method", ""),
        "selection_reason": selection.get("reason", ""),
        "parent_version": run.get("parent_version") or "",
        "seed": run.get("seed"),
        "splits": json.dumps(progress.get("splits", {})),
    }
    return {k: str(v)[:6_000] for k, v in out.items()}


def metrics(run: dict[str, Any]) -> list[tuple[str, float, int]]:
    """MLflow metrics of a run: ``(key, value, step)``; candidates use their index."""
    out: list[tuple[str, float, int]] = [
        ("cost_usd", float(run.get("cost_usd") or 0.0), 0),
        ("llm_calls", float(run.get("llm_calls") or 0), 0),
        ("tokens", float(run.get("tokens") or 0), 0),
    ]
    progress = run.get("progress") or {}
    if progress.get("baseline_val_mean") is not None:
        out.append(("baseline_val_mean", float(progress["baseline_val_mean"]), 0))
    for cand in run.get("candidates") or []:
        if cand.get("val_mean") is not None:
            out.append(("candidate_val_mean", float(cand["val_mean"]), int(cand["index"])))
    gate = run.get("gate") or {}
    for key in ("gain", "ci_low", "ci_high", "confidence", "candidate_mean", "baseline_mean"):
        if isinstance(gate.get(key), int | float):
            out.append((f"gate_{key}", float(gate[key]), 0))
    if "passed" in gate:
        out.append(("gate_passed", 1.0 if gate["passed"] else 0.0, 0))
    return out


def artifacts(run: dict[str, Any]) -> dict[str, str]:
    """Text artifacts: the active template (when known), each candidate, the run row."""
    out: dict[str, str] = {}
    progress = run.get("progress") or {}
    if progress.get("baseline_template"):
        out["baseline.txt"] = str(progress["baseline_template"])
    for cand in run.get("candidates") or []:
        out[f"candidate-{cand['index']:03d}-{cand['strategy']}.txt"] = str(cand["template"])
    out["run.json"] = json.dumps(run, indent=2, sort_keys=True, default=str)
    return out


def build_tracker(settings: TrackingSettings) -> Tracker:
    """The tracker ``settings`` ask for (raises :class:`TrackingUnavailable` if it cannot)."""
    if settings.mlflow_tracking_uri is None:
        return NoTracker()
    return MlflowTracker(settings)
