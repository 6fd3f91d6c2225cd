"""End to end at tiny size: real Ray Train (2 workers, gloo, DDP), real FFCV files, a real sqlite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from oodlab.distributed import checkpoint, pipeline
from oodlab.models import create_model

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_two_worker_training_run_is_tracked_in_mlflow(make_config):
    cfg = make_config({"train": {"epochs": 2, "lr": 0.05}})
    state = pipeline.run(cfg)

    record = state.stages["train"]
    assert record.done and Path(record.checkpoint).name == "train_epoch_0001"
    # The checkpoint is a plain timm state dict, loadable weights-only.
    model = create_model("resnet_tiny_cifar", num_classes=10)
    model.load_state_dict(checkpoint.load(checkpoint.model_file(record.checkpoint)))

    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(record.run_id)
    assert run.data.tags["mlflow.parentRunId"] == state.parent_run_id
    assert run.data.tags["oodlab.stage"] == "train" and run.data.tags["oodlab.method"] == "ce"
    assert run.data.params["stage.epochs"] == "2"
    parent = client.get_run(state.parent_run_id)
    assert parent.data.params["model.name"] == "resnet_tiny_cifar"
    assert parent.data.params["ray.num_workers"] == "2"

    history = client.get_metric_history(record.run_id, "ood/energy/all/fpr95")
    assert [m.step for m in history] == [0, 1]
    assert all(0 <= m.value <= 100 for m in history)
    assert [m.step for m in client.get_metric_history(record.run_id, "train/loss")] == [0, 1]
    final = run.data.metrics
    assert 0 <= final["id_acc"] <= 100
    assert {"ood/featnorm/near/auroc", "ood/msp/far/aupr_in", "ood/energy/val/fpr95_oodpos"} <= set(final)

    artifacts = {a.path for a in client.list_artifacts(record.run_id)}
    assert {"metrics.csv", "metrics.md", "scores.npz", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(record.run_id, "plots")}
    assert {"plots/roc_energy.png", "plots/hist_msp.png", "plots/epoch_curve.png"} <= plots
    assert "config.yaml" in {a.path for a in client.list_artifacts(state.parent_run_id)}
    assert run.info.status == "FINISHED"

    # Rerunning the same config resumes: the finished stage is skipped, nothing retrains.
    again = pipeline.run(cfg)
    assert again.stages["train"].run_id == record.run_id
    assert len(client.get_metric_history(record.run_id, "train/loss")) == 2
