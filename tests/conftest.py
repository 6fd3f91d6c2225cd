"""Shared fixtures: one real local Ray instance, the real demo betons, a sqlite MLflow store per test.

Ray's session files and MLflow's store live in temp folders; nothing touches the home directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU local Ray instance shared by every test that needs one (starting Ray takes seconds)."""
    import ray

    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ["RAY_TMPDIR"] = ray_tmp
    from oodlab.distributed.launch import loopback_only

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp,
             runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}}, **loopback_only())
    yield ray
    ray.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The tiny `digits` benchmark's real .beton files (packaged images), written once per test session."""
    from oodlab.datapipes.benchmarks import get_benchmark
    from oodlab.datapipes.build import build

    root = tmp_path_factory.mktemp("data")
    build(get_benchmark("digits"), root, progress=False)
    return root


def tiny_raw(tmp: Path, data_root: Path) -> dict:
    """A tiny raw config on the digits data: 2 workers, tiny model, sqlite store and checkpoints under `tmp`."""
    return {
        "name": "t",
        "data": {"benchmark": "digits", "root": str(data_root), "batch_size": 64, "eval_batch_size": 256},
        "model": {"name": "resnet_tiny_cifar"},
        "eval": {"scores": ["msp", "energy"], "final_scores": ["msp", "energy", "featnorm"]},
        "ray": {"num_workers": 2, "cpus_per_worker": 1, "storage_path": str(tmp / "runs")},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "test"},
        "stages": {"train": {"epochs": 2, "lr": 0.05}},
    }


@pytest.fixture(scope="session")
def tiny_run(ray_cluster, demo_root, tmp_path_factory):
    """One finished 2-epoch, 2-worker run of `tiny_raw`, shared by the tests that read a run (they must not change
    it): (config path, config, pipeline state)."""
    import yaml

    from oodlab import config
    from oodlab.distributed import pipeline

    tmp = tmp_path_factory.mktemp("tiny-run")
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(tmp, demo_root)))
    cfg = config.load(path)
    return path, cfg, pipeline.run(cfg)


@pytest.fixture
def make_config(tmp_path, demo_root):
    """Build a validated tiny config with the given stages."""
    from oodlab import config

    def make(stages: dict) -> config.Config:
        return config.validate({**tiny_raw(tmp_path, demo_root), "stages": stages}, tmp_path)

    return make
