"""What every fault drill needs: the moment the first checkpoint of a tiny run's stage `train` exists, and the
recovery time (the kill -> the resumed stage training again: the timestamp of its `resumed_after_epoch` metric)."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient

from oodlab import config
from oodlab.distributed import pipeline
from oodlab.distributed.pipeline import PipelineState
from oodlab.distributed.worker import RESUMED


def after_first_checkpoint(cfg: config.Config, timeout_s: float = 300) -> float:
    """Block until epoch 1's metrics are in MLflow (they are logged after its checkpoint); the time then."""
    client, deadline = MlflowClient(cfg.mlflow.tracking_uri), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = PipelineState.load(pipeline.state_path(cfg)).stages.get("train")
        if record is not None and client.get_metric_history(record.run_id, "train/loss"):
            return time.time()
        time.sleep(0.2)
    raise TimeoutError("the first epoch never reached MLflow")


def recovery_seconds(cfg: config.Config, run_id: str, killed_at: float) -> float:
    """Seconds from the kill to the resumed stage training again; the stage resumed once, after epoch 1."""
    resumed = MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(run_id, RESUMED)
    assert [m.value for m in resumed] == [1]  # resumed once, after epoch 1: not from scratch
    return resumed[0].timestamp / 1000 - killed_at
