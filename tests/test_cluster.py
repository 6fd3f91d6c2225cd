"""oodlab on a real two-node Ray cluster on this machine (tests/local_ray_cluster.py: 127.0.0.1, token auth on).

`oodlab submit --follow` from another working directory trains one DDP model with a worker on each node, and
its metrics equal the same run on one node; `oodlab jobs list | logs | stop`; a bad config is refused before any
network; Ray's upload limit; every worker checks the data root on its node. The cluster runs in its own process
group, apart from the session's local Ray that this process is connected to.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray
import requests
import yaml
from conftest import tiny_raw
from mlflow.tracking import MlflowClient
from ray._private.runtime_env import packaging
from servers import free_port, oodlab, stop

from oodlab import config
from oodlab.cli import main
from oodlab.distributed import pipeline
from oodlab.distributed.worker import check_data_root

HELPER = Path(__file__).parent / "local_ray_cluster.py"
TOKEN = secrets.token_hex(16)  # the cluster's Ray auth token
MLFLOW_PASSWORD = f"pw-{secrets.token_hex(8)}"  # travels to the job; must never be printed


@dataclass
class LocalCluster:
    address: str  # the job server (dashboard)
    node_ids: list[str]
    env: dict[str, str] = field(repr=False)  # a client's environment: the token, MLflow credentials

    def job(self, job_id: str, what: str = "") -> dict | str:
        """The job server's REST API, read with the token: the job's details, or (`what="logs"`) its logs."""
        url = f"{self.address}/api/jobs/{job_id}" + (f"/{what}" if what else "")
        response = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        response.raise_for_status()
        return response.json()["logs"] if what == "logs" else response.json()


@pytest.fixture(scope="module")
def cluster():
    tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}  # only a job's env brings them
    env |= {"RAY_TMPDIR": str(tmp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": TOKEN, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with (tmp / "cluster.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, str(HELPER), "--nodes", "2", "--dashboard-port", str(port),
                                 "--resources", json.dumps({"train_slot": 1})],
                                env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        ready = proc.stdout.readline().split()
        assert ready[:1] == ["READY"], f"the cluster did not start:\n{(tmp / 'cluster.log').read_text()[-3000:]}"
        client_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
                      "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD}
        yield LocalCluster(f"http://127.0.0.1:{port}", ready[2:], client_env)
    finally:
        stop(proc, timeout_s=60)
        shutil.rmtree(tmp, ignore_errors=True)


def write_config(tmp: Path, data_root: Path, name: str, **ray_fields) -> Path:
    raw = tiny_raw(tmp, data_root) | {"name": name}
    raw["ray"] |= ray_fields
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def submitted_id(out: str) -> str:
    return re.search(r"submitted job (\S+) to", out).group(1)


def stage_run(tracking_uri: str, pipeline_name: str):
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id],
                              filter_string=f"tags.`oodlab.pipeline` = '{pipeline_name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def test_submit_follow_trains_one_model_with_a_worker_on_each_node(cluster, demo_root, tmp_path, ray_cluster):
    path = write_config(tmp_path, demo_root, "two-node", resources_per_worker={"train_slot": 1})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = oodlab("submit", str(path), "--address", cluster.address, "--follow", cwd=elsewhere, env=cluster.env)
    transcript = run.stdout + run.stderr
    print(transcript)
    assert run.returncode == 0, transcript[-5000:]
    job_id = submitted_id(transcript)
    assert transcript.rstrip().endswith(f"job {job_id}: SUCCEEDED")
    assert "[train] starting" in transcript and "epoch 2/2" in transcript
    assert TOKEN not in transcript and MLFLOW_PASSWORD not in transcript
    job = cluster.job(job_id)
    assert job["status"] == "SUCCEEDED" and job["entrypoint"] == "python -m oodlab.cli train oodlab-job.yaml"
    assert job["runtime_env"]["env_vars"]["MLFLOW_TRACKING_PASSWORD"] == MLFLOW_PASSWORD  # through the runtime_env

    cfg = config.load(path)
    client, stage = stage_run(cfg.mlflow.tracking_uri, "two-node")
    assert stage.info.status == "FINISHED"
    assert client.get_run(stage.data.tags["mlflow.parentRunId"]).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(stage.info.run_id, "train/loss")] == [0, 1]
    assert {"metrics.csv", "scores.npz", "plots"} <= {a.path for a in client.list_artifacts(stage.info.run_id)}
    nodes = stage.data.tags["ray.node_ids"].split(",")
    assert len(nodes) == 2 and set(nodes) == set(cluster.node_ids)  # rank 0 and rank 1 on different nodes
    assert [stage.data.tags["ray.node_id.rank0"], stage.data.tags["ray.node_id.rank1"]] == nodes

    # the same run on one node: the session's local Ray, in this process
    one = tmp_path / "one-node"
    one.mkdir()
    single = config.validate(tiny_raw(one, demo_root) | {"name": "one-node"}, one)
    pipeline.run(single)
    _, reference = stage_run(single.mlflow.tracking_uri, "one-node")
    assert len(set(reference.data.tags["ray.node_ids"].split(","))) == 1
    measured = {k: v for k, v in stage.data.metrics.items() if k != "epoch_seconds"}
    expected = {k: v for k, v in reference.data.metrics.items() if k != "epoch_seconds"}
    assert measured == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_jobs_list_logs_and_stop(cluster, demo_root, tmp_path):
    path = write_config(tmp_path, demo_root, "long")
    submitted = oodlab("submit", str(path), "stages.train.epochs=50", "--address", cluster.address,
                       cwd=tmp_path, env=cluster.env)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted_id(submitted.stdout)
    assert f"oodlab jobs stop {job_id} --address {cluster.address}" in submitted.stdout
    deadline = time.monotonic() + 300
    while "[train] starting" not in cluster.job(job_id, "logs"):  # the driver is about to start the workers
        assert cluster.job(job_id)["status"] in ("PENDING", "RUNNING") and time.monotonic() < deadline
        time.sleep(1)

    stopped = oodlab("jobs", "stop", job_id, "--address", cluster.address, cwd=tmp_path, env=cluster.env)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"job {job_id}: STOPPED", stopped.stderr[-3000:]
    assert cluster.job(job_id)["status"] == "STOPPED"
    listed = oodlab("jobs", "list", "--address", cluster.address, cwd=tmp_path, env=cluster.env)
    row = next(line for line in listed.stdout.splitlines() if job_id in line)
    assert "STOPPED" in row and "oodlab.cli train oodlab-job.yaml" in row
    logs = oodlab("jobs", "logs", job_id, "--address", cluster.address, cwd=tmp_path, env=cluster.env)
    assert logs.returncode == 0 and "[train] starting" in logs.stdout

    without_token = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)}
    refused = oodlab("jobs", "list", "--address", cluster.address, cwd=tmp_path, env=without_token)
    assert refused.returncode == 1 and "auth" in refused.stderr.lower(), refused.stderr[-2000:]


def test_bad_configs_and_oversized_projects_are_refused_before_any_network(demo_root, tmp_path, capsys, monkeypatch):
    with socket.socket() as listener:  # a job server that never answers: no connection may reach it
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
        path = write_config(tmp_path, demo_root, "local-checks")

        assert main(["submit", str(path), "stages.train.lr=fast", "--address", address]) == 2
        assert "stages.train.lr" in capsys.readouterr().err
        assert main(["submit", str(path), "data.root=betons", "mlflow.tracking_uri=sqlite:///runs.db",
                     "--address", address]) == 2
        err = capsys.readouterr().err
        assert "data.root: betons is relative" in err and "mlflow.tracking_uri: sqlite:///runs.db is a relative" in err
        assert main(["submit", str(path), "--tune", "--address", address]) == 2
        assert "search: this config has no search section" in capsys.readouterr().err

        monkeypatch.setattr(packaging, "GCS_STORAGE_MAX_SIZE", 64 * 1024)  # Ray's limit, as RAY_max_grpc_message_size sets it
        assert main(["submit", str(path), "--address", address]) == 2
        err = capsys.readouterr().err
        assert "over Ray's upload limit of 0.1 MiB" in err and re.search(r"MiB  tests\n", err)

        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_every_worker_checks_the_data_root_on_its_own_node(ray_cluster, tmp_path):
    check = ray.remote(check_data_root)
    node = ray.get(check.remote(tmp_path))
    assert node in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(check.remote(tmp_path / "missing"))
    assert f"data.root {tmp_path / 'missing'} does not exist on Ray node {node}" in str(err.value)
