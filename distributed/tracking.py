"""MLflow: one parent run per pipeline, one child run per stage; metrics from rank 0 only.

The driver creates runs (so workers never race on the sqlite store) and hands run ids to the
workers; rank 0 logs metrics, plots and tables to its stage's run with an explicit client, and each
node's first worker logs that node's system metrics. After a stage the driver logs its datasets and
final model to the stage's run and its headline numbers to the pipeline's run.

What the UI shows: the experiment is tagged as model training, and it carries the shared runs view
that `oodlab ui` opens (`runs_url`): one row per stage run, flat (sorting by a metric un-nests child
runs in MLflow's table), the headline columns, and charts of the per-epoch curves.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from oodlab.datapipes.benchmarks import Benchmark

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reports download plots: no bars for that

MAX_PARAM_LENGTH = 6000  # MLflow 3 limit for a param value
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # MLflow 3: a model-training experiment
VIEW_KEY = "oodlab"  # the shared runs view (experiment tag mlflow.sharedViewState.<key>) that `oodlab ui` opens
SYSTEM_METRICS_INTERVAL_S = 5.0

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
    """The experiment's id, creating it (artifacts beside a sqlite store, in `mlruns/`) if needed.

    It is tagged as a model-training experiment (an existing one too, if it lacks the tag).
    """
    c = client(tracking_uri)
    found = c.get_experiment_by_name(name)
    key, kind = EXPERIMENT_KIND
    if found:
        if key not in found.tags:
            c.set_experiment_tag(found.experiment_id, key, kind)
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()
    return c.create_experiment(name, artifact_location=location, tags={key: kind})


def headline_keys(select: str, groups: Sequence[str]) -> list[str]:
    """A model's headline metrics: ID accuracy, and the selected score's AUROC and FPR95 per group."""
    return ["id_acc", *(f"ood/{select}/{g}/{m}" for g in groups for m in ("auroc", "fpr95"))]


def stage_headline(stage: str, metrics: Mapping[str, float], select: str, groups: Sequence[str]) -> dict[str, float]:
    """A stage's headline numbers as its pipeline run's metrics: `<stage>/id_acc`, `<stage>/<score>/<group>/auroc`,
    ..., and `<stage>/forget_threshold` for an estimate stage."""
    keys = [*headline_keys(select, groups), "forget_threshold"]
    return {f"{stage}/{k.removeprefix('ood/')}": metrics[k] for k in keys if k in metrics}


def share_runs_view(tracking_uri: str, experiment: str, select: str, groups: Sequence[str]) -> None:
    """Store the runs view `oodlab ui` opens, as MLflow's shared-view experiment tag.

    Sorting by a metric makes MLflow's table list child runs as rows of their own, so each stage is a row
    with its headline columns; the charts are narrowed (a regular expression in the charts' search box) to
    the per-epoch curves of the stage runs, leaving out the pipeline runs' one-point summaries.
    """
    state = {"searchFilter": "", "orderByKey": metric_column(f"ood/{select}/all/auroc"), "orderByAsc": False,
             "selectedColumns": ["attributes.`Models`", *map(metric_column, headline_keys(select, groups))],
             "chartsSearchFilter": f"^(ood/{re.escape(select)}/(val|all)/(auroc|fpr95)|id_acc|id_val_acc|train/loss)$"}
    key = f"mlflow.sharedViewState.{VIEW_KEY}"
    client(tracking_uri).set_experiment_tag(experiment_id(tracking_uri, experiment), key, json.dumps(state))


def metric_column(key: str) -> str:
    """A metric's column (and sort key) in MLflow's runs table."""
    return f"metrics.`{key}`"


def runs_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs page in the shared view (MLflow 3.17's UI opens on its GenAI pages without
    `workflowType`, whatever the experiment's kind tag says)."""
    return f"{base_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


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


@contextmanager
def active_run(tracking_uri: str, run_id: str) -> Iterator[None]:
    """Make an open run MLflow's active run (for `mlflow.log_input`, `mlflow.pytorch.log_model`); it ends on exit,
    FINISHED (FAILED on an exception)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            yield
    finally:
        mlflow.set_tracking_uri(previous)


def log_datasets(bench: Benchmark, root: Path) -> None:
    """Every split of the benchmark as a dataset input of the active run: its .beton, and as digest a hash of
    the manifest written beside it (source, count, classes, write options)."""
    from oodlab.datapipes.beton import manifest_path

    for split in bench.splits:
        path = bench.path(root, split)
        manifest = manifest_path(path)
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] if manifest.is_file() else None
        with warnings.catch_warnings():  # MLflow registers its local source twice and warns that it is ambiguous
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            source = resolve_dataset_source(str(path.resolve()))
        context = "train" if split == "id_train" else "validation" if split in ("id_val", "ood_val") else "test"
        mlflow.log_input(MetaDataset(source, name=f"{bench.name}/{split}", digest=digest), context=context)


def log_model(model: Any, name: str, step: int, example: Any) -> str:
    """Log a torch model to the active run as an MLflow model at `step`, in torch.export format; return its id.

    MLflow links the run's metrics at that step to the model, so the Models tab can rank it.
    """
    import mlflow.pytorch

    info = mlflow.pytorch.log_model(model, name=re.sub(r"[/:.%\"']", "-", name), step=step, input_example=example,
                                    pip_requirements=[f"torch=={version('torch')}"])
    return info.model_id


@contextmanager
def system_metrics(tracking_uri: str, run_id: str, node_id: str) -> Iterator[None]:
    """MLflow's system metrics of this machine (CPU, memory, disk, network; GPU with nvidia-ml-py) into `run_id`,
    named `system/<node_id>/...`; one sample every SYSTEM_METRICS_INTERVAL_S, and one more at the end, so a
    short stage has some too."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, node_id=node_id,
                                   tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()


class RunLogger:
    """Logs to one existing run. Create it on rank 0 only."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = client(tracking_uri)
        self.run_id = run_id

    def run_name(self) -> str:
        return self.client.get_run(self.run_id).info.run_name

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
