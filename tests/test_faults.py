"""Fault drills with real processes and real signals, exact resume, and --restart.

The session's tiny run (2 epochs, 2 workers, digits data) is the reference. The same config then runs with one
Ray Train worker SIGKILLed after the first checkpoint (Ray Train restarts the worker group), then with --restart,
and with the `oodlab train` driver SIGKILLed after the first checkpoint, then the same command again; and a run with
outlier exposure (a second loader) against its own uninterrupted reference. Each must
end with the reference's weights and metrics (to 1e-6), every epoch logged to MLflow exactly once and its runs
FINISHED. The recovery time (kill -> the resumed stage training again: the timestamp of its
`resumed_after_epoch` metric) is printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import tiny_raw
from drills import (EPOCHS, after_first_checkpoint, assert_same_as_reference, final, recovery_seconds,
                    worker_killed_after_first_checkpoint)
from mlflow.tracking import MlflowClient
from servers import LOOPBACK_RAY

from oodlab import config
from oodlab.distributed import checkpoint, pipeline
from oodlab.distributed.pipeline import PipelineState
from oodlab.distributed.worker import RESUMED



def raw_config(tmp: Path, data_root: Path) -> dict:
    """The config of the session's tiny run (conftest), under `tmp`."""
    raw = tiny_raw(tmp, data_root)
    assert raw["stages"]["train"]["epochs"] == EPOCHS
    return raw


@pytest.fixture(scope="module")
def reference(tiny_run) -> config.Config:
    """The uninterrupted run: the session's tiny run."""
    return tiny_run[1]


def test_sigkill_of_a_train_worker_resumes_exactly_and_restart_trains_anew(reference, demo_root, tmp_path):
    cfg = config.validate(raw_config(tmp_path, demo_root), tmp_path)
    with worker_killed_after_first_checkpoint(cfg) as killed:
        pipeline.run(cfg)  # ray.max_failures defaults to 1
    run_id = assert_same_as_reference(cfg, reference)
    print(f"\nworker SIGKILL: recovery {recovery_seconds(cfg, run_id, killed[0]):.1f} s (kill -> training again)")

    pipeline.run(cfg, restart=True)
    new_run = assert_same_as_reference(cfg, reference)  # trained from scratch again, to the same weights
    assert new_run != run_id and not MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(new_run, RESUMED)
    moved = list((cfg.ray.storage_path / cfg.name).glob("replaced-*"))
    assert len(moved) == 1 and {p.name for p in moved[0].iterdir()} == {"pipeline.json", checkpoint.run_dir(cfg).name}


@pytest.mark.usefixtures("ray_cluster")
def test_sigkill_of_a_worker_during_outlier_exposure_resumes_exactly(demo_root, tmp_path):
    """With `oe` each step also draws a batch from a second, sharded loader (the benchmark's outliers): a worker
    killed after the first checkpoint still ends with the weights and metrics of an uninterrupted run."""
    def oe_config(folder: Path) -> config.Config:
        raw = raw_config(folder, demo_root)
        raw["stages"]["train"]["oe"] = {"weight": 0.5}
        return config.validate(raw, folder)

    reference = oe_config(tmp_path / "reference")
    pipeline.run(reference)
    cfg = oe_config(tmp_path / "killed")
    with worker_killed_after_first_checkpoint(cfg) as killed:
        pipeline.run(cfg)
    run_id = assert_same_as_reference(cfg, reference)
    assert final(cfg)[1]["train/oe_term"] > 0
    print(f"\nworker SIGKILL under OE: recovery {recovery_seconds(cfg, run_id, killed[0]):.1f} s")


def test_sigkill_of_the_train_driver_then_rerun_resumes_exactly(reference, demo_root, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw_config(tmp_path, demo_root)))
    cfg = config.load(path)
    env = {**os.environ, **LOOPBACK_RAY, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rk", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)  # each command starts its own Ray instance, as a user's would
    command = [sys.executable, "-m", "oodlab.cli", "train", str(path)]
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = after_first_checkpoint(cfg)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    run_id = assert_same_as_reference(cfg, reference)
    print(f"\ndriver SIGKILL: recovery {recovery_seconds(cfg, run_id, killed_at):.1f} s (kill -> rerun training again)")


def test_a_nan_loss_stops_the_stage_at_that_step_without_a_checkpoint(ray_cluster, demo_root, tmp_path, capsys):
    from oodlab.cli import main

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw_config(tmp_path, demo_root)))
    assert main(["train", str(path), "stages.train.lr=1e30"]) == 1  # the weights overflow within a few steps
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (Ray's own lines come before it)
    assert last.startswith("oodlab: error: stage train: the loss is not finite (nan or inf) at epoch 1, step")
    cfg = config.load(path, ["stages.train.lr=1e30"])
    assert not checkpoint.newest_first(cfg, "train")
    state = PipelineState.load(pipeline.state_path(cfg))
    client = MlflowClient(cfg.mlflow.tracking_uri)
    assert {client.get_run(r).info.status for r in (state.parent_run_id, state.stages["train"].run_id)} == {"FAILED"}
