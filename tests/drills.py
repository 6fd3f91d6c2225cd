"""What every fault drill needs: the moment the first checkpoint of a tiny run's stage `train` exists, the
recovery time (the kill -> the resumed stage training again: the timestamp of its `resumed_after_epoch` metric),
and the checks that a drilled run ended as the uninterrupted one (conftest's tiny run, EPOCHS epochs; or, on a
cluster, conftest's one-node run: its MLflow stage run)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from oodlab import config
from oodlab.distributed import checkpoint, pipeline
from oodlab.distributed.pipeline import PipelineState
from oodlab.distributed.worker import RESUMED

EPOCHS = 2  # of conftest's tiny run


def after_first_checkpoint(cfg: config.Config, timeout_s: float = 300) -> float:
    """Block until epoch 1's metrics are in MLflow (they are logged after its checkpoint); the time then."""
    client, deadline = MlflowClient(cfg.mlflow.tracking_uri), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = PipelineState.load(pipeline.state_path(cfg)).stages.get("train")
        if record is not None and client.get_metric_history(record.run_id, "train/loss"):
            return time.time()
        time.sleep(0.2)
    raise TimeoutError("the first epoch never reached MLflow")


@contextmanager
def worker_killed_after_first_checkpoint(cfg: config.Config) -> Iterator[list[float]]:
    """While the block runs `cfg`'s pipeline, SIGKILL one Ray Train worker once epoch 1 is checkpointed; the block gets
    the list the kill's time goes into."""
    killed: list[float] = []

    def kill_one_worker() -> None:
        killed.append(after_first_checkpoint(cfg))
        # this test's Ray instance's workers: descendants of this process (not another Ray's on the machine)
        workers = [p for p in psutil.Process().children(recursive=True) if "ray::RayTrainWorker" in command(p)]
        os.kill(workers[-1].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    yield killed
    killer.join()


def command(process: psutil.Process) -> str:
    """A process's command line ("" once it has exited)."""
    try:
        return " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return ""


def recovery_seconds(cfg: config.Config, run_id: str, killed_at: float) -> float:
    """Seconds from the kill to the resumed stage training again; the stage resumed once, after epoch 1."""
    resumed = MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(run_id, RESUMED)
    assert [m.value for m in resumed] == [1]  # resumed once, after epoch 1: not from scratch
    return resumed[0].timestamp / 1000 - killed_at


def final(cfg: config.Config) -> tuple[dict[str, torch.Tensor], dict[str, float], str]:
    """The stage's last weights, its final metrics (wall times left out) and its MLflow run id."""
    record = PipelineState.load(pipeline.state_path(cfg)).stages["train"]
    weights = checkpoint.load(checkpoint.model_file(record.checkpoint))
    return weights, {k: v for k, v in record.metrics.items() if "seconds" not in k}, record.run_id


def assert_same_as_reference(cfg: config.Config, reference: config.Config) -> str:
    """Same weights and metrics as the reference run, each epoch logged once, runs FINISHED; the stage run id."""
    weights, metrics, run_id = final(cfg)
    ref_weights, ref_metrics, _ = final(reference)
    assert weights.keys() == ref_weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(value, ref_weights[key], rtol=0, atol=1e-6, msg=key)
    assert metrics.keys() == ref_metrics.keys()
    assert metrics == pytest.approx(ref_metrics, rel=0, abs=1e-6)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    for key in ("train/loss", "id_acc", "ood/energy/all/auroc"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(EPOCHS)), key
    parent = PipelineState.load(pipeline.state_path(cfg)).parent_run_id
    assert {client.get_run(r).info.status for r in (run_id, parent)} == {"FINISHED"}
    return run_id


def stage_run(tracking_uri: str, pipeline_name: str):
    """(client, the MLflow run) of the one stage of the pipeline named `pipeline_name` in the experiment "test"."""
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id],
                              filter_string=f"tags.`oodlab.pipeline` = '{pipeline_name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def learned(metrics: dict[str, float]) -> dict[str, float]:
    """A run's training and evaluation numbers, without its timings, machine readings and resume marks."""
    return {k: v for k, v in metrics.items()
            if not k.startswith("system/") and not k.endswith("_seconds") and k != RESUMED}
