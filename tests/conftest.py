"""Shared fixtures: one real local Ray instance, the real demo betons, a sqlite MLflow store per test, an S3 server,
and the one-node reference run of the cluster drills.

Ray's session files and MLflow's store live in temp folders; nothing touches the home directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

BUCKET = "oodlab-test"  # the `s3` fixture's bucket


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


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server (its own process on 127.0.0.1) with one bucket, BUCKET; this process's environment points
    pyarrow at it while the module runs (and so does that of the processes it starts)."""
    import boto3
    from servers import free_port, stop, wait_for_http

    from oodlab.storage import filesystem

    port = free_port()
    logs = tmp_path_factory.mktemp("moto") / "server.log"
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=logs.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "oodlab",
           "AWS_SECRET_ACCESS_KEY": "not-a-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "OODLAB_LOCAL_DIR": str(tmp_path_factory.mktemp("local"))}
    before = {k: os.environ.get(k) for k in env}
    try:
        wait_for_http(f"http://127.0.0.1:{port}/moto-api/", server, "moto_server", timeout_s=60)
        os.environ.update(env)
        filesystem.cache_clear()  # pyarrow filesystems opened for another module's server (same bucket name)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        for k, v in before.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        filesystem.cache_clear()
        stop(server)


@pytest.fixture(scope="session")
def unaugmented(tmp_path_factory) -> Path:
    """The digits benchmark without train-time augmentation: FFCV's random flips and crops are not seeded, the
    rest of a run is (data order, initialisation, DDP's sums), so two runs of it give the same numbers."""
    import yaml

    from oodlab.datapipes.benchmarks import BUILTIN_DIR

    spec = yaml.safe_load((BUILTIN_DIR / "digits.yaml").read_text()) | {"augment": "none"}
    path = tmp_path_factory.mktemp("benchmark") / "digits-unaugmented.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="session")
def one_node_run(tmp_path_factory, demo_root, unaugmented, ray_cluster):
    """The reference of the cluster drills: `tiny_raw` on the unaugmented digits on the session's one-node Ray; its
    MLflow stage run. Request it before a test cluster starts (see test_cluster.py)."""
    from drills import stage_run

    from oodlab import config
    from oodlab.distributed import pipeline

    tmp = tmp_path_factory.mktemp("one-node")
    raw = tiny_raw(tmp, demo_root) | {"name": "one-node"}
    raw["data"]["benchmark"] = str(unaugmented)
    cfg = config.validate(raw, tmp)
    pipeline.run(cfg)
    return stage_run(cfg.mlflow.tracking_uri, "one-node")[1]
