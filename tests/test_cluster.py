"""oodlab on a real two-node Ray cluster on this machine (tests/local_ray_cluster.py: 127.0.0.1, token auth on).

`oodlab submit --follow` from another working directory trains one DDP model with a worker on each node, and
its metrics equal the same run on one node, also when the node of one of the two workers is lost mid-stage (all
its processes SIGKILLed) and another node joins; `oodlab jobs list | logs | stop`; a bad config is refused before
any network; Ray's upload limit; every worker checks the data root on its node. The cluster runs in its own process
group, apart from the session's local Ray that this process is connected to. The one-node reference run (conftest's
`one_node_run`) trains on that local Ray before the cluster starts: Ray Train's placement-group cleaner asks the
newest Ray instance on the machine whether its controller lives (see local_ray_cluster.py), and would tear down a
run on the older one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray
import requests
import yaml
from conftest import tiny_raw
from drills import after_first_checkpoint, learned, recovery_seconds, stage_run
from ray._private.runtime_env import packaging
from servers import RayCluster, local_ray_cluster, oodlab

from oodlab import config
from oodlab.cli import main
from oodlab.distributed.worker import check_data_root

TOKEN = secrets.token_hex(16)  # the cluster's Ray auth token
MLFLOW_PASSWORD = f"pw-{secrets.token_hex(8)}"  # travels to the job; must never be printed


@dataclass
class LocalCluster:
    address: str  # the job server (dashboard)
    node_ids: list[str]
    env: dict[str, str] = field(repr=False)  # a client's environment: the token, MLflow credentials
    nodes: RayCluster = field(repr=False)  # removes and adds worker nodes

    def job(self, job_id: str, what: str = "") -> dict | str:
        """The job server's REST API, read with the token: the job's details, or (`what="logs"`) its logs."""
        url = f"{self.address}/api/jobs/{job_id}" + (f"/{what}" if what else "")
        response = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        response.raise_for_status()
        return response.json()["logs"] if what == "logs" else response.json()


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of one CPU and one `train_slot` each; the head runs the dashboard and job server."""
    with local_ray_cluster(nodes=2, resources={"train_slot": 1}, dashboard=True, token=TOKEN) as ray_nodes:
        client_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
                      "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD}
        yield LocalCluster(ray_nodes.dashboard, ray_nodes.node_ids, client_env, ray_nodes)


def write_config(tmp: Path, data_root: Path, name: str, benchmark: Path | None = None, **ray_fields) -> Path:
    raw = tiny_raw(tmp, data_root) | {"name": name}
    raw["ray"] |= ray_fields
    raw["data"] |= {"benchmark": str(benchmark)} if benchmark else {}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def submitted_id(out: str) -> str:
    return re.search(r"submitted job (\S+) to", out).group(1)


def test_submit_follow_trains_one_model_with_a_worker_on_each_node(one_node_run, cluster, demo_root, unaugmented,
                                                                    tmp_path):
    path = write_config(tmp_path, demo_root, "two-node", unaugmented, resources_per_worker={"train_slot": 1})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = oodlab("submit", str(path), "--address", cluster.address, "--follow", cwd=elsewhere, env=cluster.env)
    transcript = run.stdout
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

    assert len(set(one_node_run.data.tags["ray.node_ids"].split(","))) == 1
    measured, expected = learned(stage.data.metrics), learned(one_node_run.data.metrics)
    assert len(expected) > 50 and measured == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_jobs_list_logs_and_stop(cluster, demo_root, tmp_path):
    path = write_config(tmp_path, demo_root, "long")
    submitted = oodlab("submit", str(path), "stages.train.epochs=50", "--address", cluster.address,
                       cwd=tmp_path, env=cluster.env)
    assert submitted.returncode == 0, submitted.stdout[-3000:]
    job_id = submitted_id(submitted.stdout)
    assert f"oodlab jobs stop {job_id} --address {cluster.address}" in submitted.stdout
    deadline = time.monotonic() + 300
    while "[train] starting" not in cluster.job(job_id, "logs"):  # the driver is about to start the workers
        assert cluster.job(job_id)["status"] in ("PENDING", "RUNNING") and time.monotonic() < deadline
        time.sleep(1)

    stopped = oodlab("jobs", "stop", job_id, "--address", cluster.address, cwd=tmp_path, env=cluster.env)
    assert stopped.returncode == 0 and stopped.stdout.strip().endswith(f"job {job_id}: STOPPED"), stopped.stdout[-3000:]
    assert cluster.job(job_id)["status"] == "STOPPED"
    listed = oodlab("jobs", "list", "--address", cluster.address, cwd=tmp_path, env=cluster.env)
    row = next(line for line in listed.stdout.splitlines() if job_id in line)
    assert "STOPPED" in row and "oodlab.cli train oodlab-job.yaml" in row
    logs = oodlab("jobs", "logs", job_id, "--address", cluster.address, cwd=tmp_path, env=cluster.env)
    assert logs.returncode == 0 and "[train] starting" in logs.stdout

    without_token = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)}
    refused = oodlab("jobs", "list", "--address", cluster.address, cwd=tmp_path, env=without_token)
    assert refused.returncode == 1 and "auth" in refused.stdout.lower(), refused.stdout[-2000:]


def test_a_worker_node_lost_mid_stage_and_one_added_back_resumes_exactly(one_node_run, cluster, demo_root, unaugmented,
                                                                        tmp_path):
    """The drill: every process of the newest node (one worker) SIGKILLed after the first checkpoint, a node added;
    Ray Train restarts the worker group on it and the job ends with the one-node run's numbers."""
    path = write_config(tmp_path, demo_root, "node-drill", unaugmented, resources_per_worker={"train_slot": 1})
    cfg = config.load(path)
    submitted = oodlab("submit", str(path), "--address", cluster.address, cwd=tmp_path, env=cluster.env)
    assert submitted.returncode == 0, submitted.stdout[-3000:]
    job_id = submitted_id(submitted.stdout)
    try:
        removed_at = after_first_checkpoint(cfg, timeout_s=600)
    except TimeoutError:
        pytest.fail(f"job {job_id} is {cluster.job(job_id)['status']}, no epoch logged:\n{cluster.job(job_id, 'logs')[-5000:]}")
    removed = cluster.nodes.remove_node()
    added = cluster.nodes.add_node()
    deadline = time.monotonic() + 600
    while (status := cluster.job(job_id)["status"]) in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, cluster.job(job_id, "logs")[-5000:]
        time.sleep(2)
    assert status == "SUCCEEDED", cluster.job(job_id, "logs")[-5000:]

    client, stage = stage_run(cfg.mlflow.tracking_uri, "node-drill")
    assert {stage.info.status, client.get_run(stage.data.tags["mlflow.parentRunId"]).info.status} == {"FINISHED"}
    for key in ("train/loss", "id_acc"):
        assert [m.step for m in client.get_metric_history(stage.info.run_id, key)] == [0, 1], key  # each epoch once
    nodes = stage.data.tags["ray.node_ids"].split(",")  # the resumed worker group's nodes
    assert removed not in nodes and set(nodes) == {cluster.node_ids[0], added}
    assert learned(stage.data.metrics) == pytest.approx(learned(one_node_run.data.metrics), rel=1e-5, abs=1e-6)
    print(f"\nnode lost: recovery {recovery_seconds(cfg, stage.info.run_id, removed_at):.1f} s (kill -> training again)")


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


def test_the_cluster_launcher_file_matches_the_autoscaler_schema_of_the_installed_ray():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    launcher = yaml.safe_load((Path(__file__).parent.parent / "infra" / "ray-cluster.yaml").read_text())
    jsonschema.validate(launcher, schema)
    assert any("infra/mlflow/serve.sh" in c for c in launcher["head_start_ray_commands"])
