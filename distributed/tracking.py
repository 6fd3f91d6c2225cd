"""MLflow: one parent run per pipeline, one child run per stage; metrics from rank 0 only.

The driver creates runs (so workers never race on the sqlite store) and hands run ids to the
workers; rank 0 logs metrics, plots and tables to its stage's run with an explicit client, and each
node's first worker logs that node's system metrics. After a stage the driver logs its datasets and
final model to the stage's run and its headline numbers to the pipeline's run.

What the UI shows: the experiment carries a saved runs view (`share_runs_view`): one row per trained model, flat,
with its headline columns and every score's AUROC, and charts of the per-epoch curves. `oodlab ui` prints the
link that opens it (`runs_url`); a teammate who opens the experiment on a shared server without that link finds
it on the first line of the experiment's description, shown atop each of its pages, and under the runs page's
Views menu. MLflow 3.17.2's UI honours nothing more: the experiment's kind tag (`mlflow.experimentKind`, still
set) is read only when its workflow switch is off, which that build hard-codes on, so each browser opens in the
mode it last used (GenAI at first); and its runs table has no experiment-level default, so without the view it
nests stage runs under their pipeline run and shows no metric columns.

When the server goes away mid-run, training goes on: a RunLogger given a buffer folder keeps what it cannot
send in a durable local buffer (tracking_buffer) and sends it, in order, once the server answers again;
what is left when the pipeline ends waits on disk for `oodlab mlflow-upload` (upload_buffers).
"""

from __future__ import annotations

import hashlib
import glob
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from oodlab.config import Config, flatten, to_dict
from oodlab.datapipes.benchmarks import Benchmark
from oodlab.scores import available_scores
from oodlab.storage import local_root
from oodlab.distributed.tracking_buffer import (Buffer, ReplayError, buffered_runs, op_name, replayable, resolve,
                                               unreachable)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reports download plots: no bars for that
# MLflow retries a failed HTTP call 7 times (about 4 minutes against a stopped server); 3 give up after about 12 s,
# and a RunLogger with a buffer keeps what failed, so a lost server does not stall training.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")

MAX_PARAM_LENGTH = 6000  # MLflow 3 limit for a param value
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # MLflow 3: a model-training experiment
VIEW_KEY = "oodlab"  # the saved runs view (experiment tag mlflow.sharedViewState.<key>) that `oodlab ui` opens
VIEW_NAME = "Models compared (oodlab)"  # its name in the runs page's Views menu
DESCRIPTION = "mlflow.note.content"  # the experiment's description, shown atop each of its pages
SYSTEM_METRICS_INTERVAL_S = 5.0
BUFFER_FOLDER = "mlflow-buffer"  # under <ray.storage_path>/<config name>/ (a local mirror for URI storage)

log = logging.getLogger("oodlab")

# What MLflow reads from the environment to reach a server: forwarded to Ray jobs and workers, never logged.
TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|access_token|secret|key|sig|signature)=)[^&#\s]*")


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it masked: `user:password@` -> `***@`, `?token=...` -> `?token=***`."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def redacted_config(cfg: Config) -> dict[str, Any]:
    """A config flattened (`a.b: value`) with every credential redacted: what state files keep."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in flatten(to_dict(cfg)).items()}


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
    """Store the runs view `oodlab ui` opens as a saved view of the experiment, and link it from the experiment's
    description.

    The view lists the runs that have an `id_acc`, that is one row per trained or evaluated model (pipeline and
    sweep runs, and estimate stages, have none), sorted by a metric (which lists child runs as rows of their own),
    with the headline columns and every score's AUROC over all OOD sets; the charts are narrowed (a regular
    expression in the charts' search box) to the headline per-epoch curves.
    """
    state = {"searchFilter": f"{metric_column('id_acc')} >= 0",
             "orderByKey": metric_column(f"ood/{select}/all/auroc"), "orderByAsc": False,
             "selectedColumns": ["attributes.`Models`", *map(metric_column, headline_keys(select, groups)),
                                 *(metric_column(f"ood/{s}/all/auroc") for s in available_scores() if s != select)],
             "chartsSearchFilter": f"^(ood/{re.escape(select)}/(val|all)/(auroc|fpr95)|id_acc|id_val_acc|train/loss)$"}
    c = client(tracking_uri)
    found = c.get_experiment(experiment_id(tracking_uri, experiment))
    # a saved view in MLflow's envelope, so its Views menu lists it by name
    stamp = now_ms()
    view = {"name": VIEW_NAME, "createdAt": found.creation_time or stamp, "updatedAt": stamp,
            "state": json.dumps(state)}
    c.set_experiment_tag(found.experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(view))
    description = found.tags.get(DESCRIPTION, "")
    c.set_experiment_tag(found.experiment_id, DESCRIPTION, with_view_link(description, found.experiment_id))


def with_view_link(description: str, experiment_id: str) -> str:
    """`description` with the link to the saved view as its first paragraph (MLflow shows a description collapsed
    to its first line): replacing an earlier such link, keeping whatever else is written there."""
    first, _, rest = description.partition("\n\n")
    if f"viewStateShareKey={VIEW_KEY})" not in first:
        rest = description
    link = (f"**[Compare the trained models]({runs_path(experiment_id)})**: one row per model with its OOD metrics "
            f"(the saved view *{VIEW_NAME}*, also under Views)")
    return f"{link}\n\n{rest}" if rest.strip() else link


def metric_column(key: str) -> str:
    """A metric's column (and sort key) in MLflow's runs table."""
    return f"metrics.`{key}`"


def runs_path(experiment_id: str) -> str:
    """The experiment's runs page in the saved view, relative to the UI's address. `workflowType` is needed: MLflow
    3.17's UI opens in the mode the browser last used (GenAI at first), whatever the experiment's kind tag says."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def runs_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs page in the saved view, on the UI at `base_url`."""
    return f"{base_url}/{runs_path(experiment_id)}"


def start_run(tracking_uri: str, experiment: str, name: str, tags: Mapping[str, str],
              parent_run_id: str | None = None) -> str:
    """Create a run (a child of `parent_run_id` if given) and return its id; it stays open until end_run."""
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client(tracking_uri).create_run(experiment_id(tracking_uri, experiment), run_name=name, tags=all_tags)
    return run.info.run_id


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED", buffer: Path | None = None) -> None:
    """End a run with `status`; with a `buffer` folder, after the records waiting there for it (see RunLogger)."""
    RunLogger(tracking_uri, run_id, buffer).end(status)


def kill_open_runs(tracking_uri: str, run_ids: list[str | None]) -> None:
    """End as KILLED the runs still RUNNING (a run replaced by --restart); None entries are skipped."""
    c = client(tracking_uri)
    for run_id in run_ids:
        if run_id and c.get_run(run_id).info.status == "RUNNING":
            end_run(tracking_uri, run_id, "KILLED")


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Mark a run that a failure ended (FAILED, KILLED) as RUNNING again: its rerun continues it."""
    c = client(tracking_uri)
    if c.get_run(run_id).info.status != "RUNNING":
        c.update_run(run_id, status="RUNNING")


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (ConnectionError naming the redacted URI) if an http(s) tracking server does not answer.

    MLflow's own client retries for minutes; this asks the server's /health once. Any HTTP answer counts
    (an auth error is reported later, by the call that needs the credentials).
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        health(tracking_uri, timeout_s)
    except requests.RequestException as err:
        raise ConnectionError(f"mlflow.tracking_uri: the MLflow server at {redact(tracking_uri)} does not answer "
                              f"({type(err).__name__}); start it, or set mlflow.tracking_uri / MLFLOW_TRACKING_URI "
                              "to a reachable server") from None


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

    for split in bench.files:
        path = bench.path(root, split)
        manifest = manifest_path(path)
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] if manifest.is_file() else None
        with warnings.catch_warnings():  # MLflow registers its local source twice and warns that it is ambiguous
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            source = resolve_dataset_source(str(path.resolve()))
        context = "train" if split in ("id_train", "outliers") else "validation" if split in ("id_val", "ood_val") else "test"
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
    short stage has some too. Samples are not buffered: MLflow's monitor stops at its first failed call, and the
    last sample is dropped if the server is away then."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, node_id=node_id,
                                   tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        try:  # samples, not records: those taken while the server is away are dropped, not buffered
            if answers(tracking_uri):
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
        except Exception as err:
            if not unreachable(err):
                raise


def buffer_folder(cfg: Config) -> Path:
    """Where a config's RunLoggers keep what the server did not take: always on this machine's disk."""
    return local_root(cfg.ray.storage_path) / cfg.name / BUFFER_FOLDER


def buffer_folders(cfg: Config) -> list[Path]:
    """The config's buffer folder and those of its sweep's trials (named `<name>.<trial id>`)."""
    trials = sorted(local_root(cfg.ray.storage_path).glob(f"{glob.escape(cfg.name)}.*/{BUFFER_FOLDER}"))
    return [buffer_folder(cfg), *trials]


def buffered(cfg: Config) -> dict[str, int]:
    """Run id -> records waiting on disk for it, over the config's buffer folders."""
    return {run_id: n for folder in buffer_folders(cfg) for run_id, n in buffered_runs(folder).items()}


def upload_buffers(cfg: Config) -> dict[str, int]:
    """Send every run's waiting records, oldest first; return what is left (run id -> records; empty: all sent).

    A record the server refuses for another reason than being unreachable raises ReplayError; it stays buffered.
    """
    for folder in buffer_folders(cfg):
        for run_id in buffered_runs(folder):
            RunLogger(cfg.mlflow.tracking_uri, run_id, folder).flush()
    return buffered(cfg)


def buffer_note(cfg: Config) -> str | None:
    """A line for the user when records wait on disk, naming the command that sends them."""
    waiting = buffered(cfg)
    if not waiting:
        return None
    return (f"MLflow at {redact(cfg.mlflow.tracking_uri)} did not answer: {sum(waiting.values())} records of "
            f"{len(waiting)} runs wait in {buffer_folder(cfg)}; once it is back, `oodlab mlflow-upload CONFIG` "
            "sends them")


def health(tracking_uri: str, timeout_s: float = 5.0) -> int:
    """The HTTP status of the tracking server's /health (requests' error if it does not answer)."""
    import requests

    return requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s).status_code


def answers(tracking_uri: str) -> bool:
    """Whether the tracking server answers its /health now, and not with a server error (5xx: overloaded, or a
    gateway before it that cannot reach it); always true for a local store."""
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        return health(tracking_uri) < 500
    except requests.RequestException:
        return False


class RunLogger:
    """Logs to one existing run. Create it on rank 0 only.

    With a `buffer` folder, a call the server does not take because it is unreachable (refused, timed out, 5xx
    after MLflow's retries) is kept there (tracking_buffer) instead of failing training; while records wait, every
    call first asks the server's /health and, once it answers without a server error, sends them (oldest first).
    Any other error (bad input) raises.
    """

    def __init__(self, tracking_uri: str, run_id: str, buffer: Path | None = None):
        self.tracking_uri = tracking_uri
        self.client = client(tracking_uri)
        self.run_id = run_id
        self.buffer = None if buffer is None else Buffer(buffer, run_id)
        self._direct = False  # inside an operation: its own calls go straight to the server

    def send(self, op: Callable[..., Any], file: Path | None = None, **args: Any) -> Any:
        """`op(self, **args)` (a @replayable operation; `file` is handed to it as `path`) now, or into the buffer
        while the server is unreachable; returns what `op` returns (None when buffered)."""
        if self.buffer is None or self._direct:
            return self._run(op, args, file)
        if self.flush():
            try:
                return self._run(op, args, file)
            except Exception as err:
                if not unreachable(err):
                    raise
        if not self.buffer.pending():
            log.warning("MLflow at %s does not answer: what run %s logs waits in %s until it does",
                        redact(self.tracking_uri), self.run_id, self.buffer.path)
        self.buffer.append(op_name(op), json.loads(redact(json.dumps(args))), file)  # no credentials on disk
        return None

    def flush(self) -> bool:
        """Send the buffered records, oldest first, if the server answers; True if none are left (or no buffer)."""
        if self.buffer is None or not self.buffer.pending():
            return True
        if not answers(self.tracking_uri):
            return False
        for record in self.buffer.records():
            try:
                self._run(resolve(record.op), record.args, self.buffer.file(record))
            except Exception as err:
                if unreachable(err):
                    return False
                raise ReplayError(f"MLflow at {redact(self.tracking_uri)} refused a record of run {self.run_id} "
                                  f"in {self.buffer.path} ({record.op}): {redact(str(err))}") from err
            self.buffer.drop_first()
        return True

    def _run(self, op: Callable[..., Any], args: dict[str, Any], file: Path | None) -> Any:
        direct, self._direct = self._direct, True
        try:
            return op(self, **args, **({} if file is None else {"path": str(file)}))
        finally:
            self._direct = direct

    def run_name(self) -> str:
        """The run's name; its id while the server is unreachable (plots made meanwhile are titled with it)."""
        try:
            if self._direct or self.flush():
                return self.client.get_run(self.run_id).info.run_name
        except Exception as err:
            if self.buffer is None or self._direct or not unreachable(err):
                raise
        return self.run_id

    def params(self, params: Mapping[str, Any]) -> None:
        items = [[k, redact(str(v))[:MAX_PARAM_LENGTH]] for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.send(log_batch, params=items[i : i + 100])

    def tags(self, tags: Mapping[str, str]) -> None:
        self.send(log_batch, tags=[[k, str(v)] for k, v in tags.items()])

    def metrics_once(self, metrics: Mapping[str, float], step: int) -> None:
        """Log `metrics` at `step` unless they were logged there before (a resumed stage logs each epoch once)."""
        self.send(log_metrics_once, metrics={k: float(v) for k, v in metrics.items()}, step=step, stamp=now_ms())

    def metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for batch in metric_batches(metrics, step, now_ms()):
            self.send(log_batch, metrics=batch)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.send(log_artifact, file=Path(path), folder=folder)

    def end(self, status: str = "FINISHED") -> None:
        self.send(terminate, status=status)

    def text(self, text: str, name: str, folder: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(redact(text))
            self.artifact(path, folder)

    def figure(self, fig: Any, name: str, folder: str = "plots") -> None:
        from oodlab.plots import save_figure

        with tempfile.TemporaryDirectory() as tmp:
            self.artifact(save_figure(fig, Path(tmp) / name), folder)


def now_ms() -> int:
    return mlflow.utils.time.get_current_time_millis()


def metric_batches(metrics: Mapping[str, float], step: int, stamp: int) -> list[list[list[Any]]]:
    """`[key, value, timestamp, step]` rows, at most 1000 per batch (MLflow's limit)."""
    rows = [[k, float(v), stamp, step] for k, v in metrics.items()]
    return [rows[i : i + 1000] for i in range(0, len(rows), 1000)]


# The operations a RunLogger sends (and its buffer replays): JSON arguments only.

@replayable
def log_batch(logger: RunLogger, metrics: Sequence[Sequence[Any]] = (), params: Sequence[Sequence[str]] = (),
              tags: Sequence[Sequence[str]] = ()) -> None:
    logger.client.log_batch(logger.run_id, metrics=[Metric(*m) for m in metrics], params=[Param(*p) for p in params],
                            tags=[RunTag(*t) for t in tags])


@replayable
def log_metrics_once(logger: RunLogger, metrics: Mapping[str, float], step: int, stamp: int) -> None:
    """`metrics` at `step` unless the run has its first key at that step already."""
    logged = logger.client.get_metric_history(logger.run_id, next(iter(metrics))) if metrics else []
    if metrics and not any(m.step == step for m in logged):
        for batch in metric_batches(metrics, step, stamp):
            log_batch(logger, metrics=batch)


@replayable
def log_artifact(logger: RunLogger, path: str, folder: str | None = None) -> None:
    logger.client.log_artifact(logger.run_id, path, folder)


@replayable
def terminate(logger: RunLogger, status: str) -> None:
    logger.client.set_terminated(logger.run_id, status)
