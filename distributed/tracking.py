"""MLflow: one parent run per pipeline, one child run per stage; metrics from rank 0 only.

The driver creates runs (so workers never race on the sqlite store) and hands run ids to the
workers; rank 0 logs metrics, plots and tables to its stage's run with an explicit client.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

MAX_PARAM_LENGTH = 6000  # MLflow 3 limit for a param value

# What MLflow reads from the environment to reach a server: forwarded to Ray jobs and workers, never logged.
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|access_token|secret|key|sig|signature)=)[^&#\s]*")


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it masked: `user:password@` -> `***@`, `?token=...` -> `?token=***`."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def tracking_env() -> dict[str, str]:
    """The MLflow server address and credentials set in this environment."""
    return {k: os.environ[k] for k in TRACKING_ENV if os.environ.get(k)}


def client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment's id, creating it (artifacts beside a sqlite store, in `mlruns/`) if needed."""
    c = client(tracking_uri)
    found = c.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()
    return c.create_experiment(name, artifact_location=location)


def start_run(tracking_uri: str, experiment: str, name: str, tags: Mapping[str, str],
              parent_run_id: str | None = None) -> str:
    """Create a run (a child of `parent_run_id` if given) and return its id; it stays open until end_run."""
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client(tracking_uri).create_run(experiment_id(tracking_uri, experiment), run_name=name, tags=all_tags)
    return run.info.run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status)


class RunLogger:
    """Logs to one existing run. Create it on rank 0 only."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = client(tracking_uri)
        self.run_id = run_id

    def params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, redact(str(v))[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def metrics(self, metrics: Mapping[str, float], step: int) -> None:
        stamp = mlflow.utils.time.get_current_time_millis()
        items = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def text(self, text: str, name: str, folder: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(redact(text))
            self.artifact(path, folder)

    def figure(self, fig: Any, name: str, folder: str = "plots") -> None:
        from oodlab.plots import save_figure

        with tempfile.TemporaryDirectory() as tmp:
            self.artifact(save_figure(fig, Path(tmp) / name), folder)
