"""A real MLflow tracking server over HTTP: infra/mlflow/serve.sh with basic auth, its runs in PostgreSQL (Debian's
server, initdb + pg_ctl in a temp folder) and its artifacts in a local folder behind the server.

`oodlab train` and a sweep of two concurrent trials run on a Ray cluster whose processes never saw MLflow's
settings: the config names no tracking URI, so MLFLOW_TRACKING_URI from the environment is used, and the
credentials reach the workers only through the runtime_env. Everything is read back through MlflowClient.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import tiny_raw
from mlflow.tracking import MlflowClient
from servers import LOOPBACK_RAY, free_port, local_ray_cluster, oodlab, stop, wait_for_http

from oodlab import config
from oodlab.distributed import tracking

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SERVE = Path(__file__).parent.parent / "infra" / "mlflow" / "serve.sh"
DB_PASSWORD = secrets.token_hex(12)
ADMIN_PASSWORD = f"admin-{secrets.token_hex(12)}"

def as_postgres(*cmd: str) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)


@pytest.fixture(scope="module")
def postgres() -> str:
    """A PostgreSQL server on 127.0.0.1 with a password-protected database `mlflow`; its URI (SQLAlchemy form)."""
    if not (PG_BIN / "initdb").is_file():
        pytest.skip("needs Debian's postgresql (scripts/setup.sh installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))  # outside pytest's root-only folders: `postgres` reads it
    (tmp / "pw").write_text(DB_PASSWORD)
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
        shutil.chown(tmp / "pw", "postgres")
    port = free_port()
    subprocess.run(as_postgres(str(PG_BIN / "initdb"), "-D", str(tmp / "data"), "-U", "oodlab", "-E", "UTF8",
                               "--auth=scram-sha-256", f"--pwfile={tmp / 'pw'}"), check=True, capture_output=True)
    subprocess.run(as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(tmp / "data"), "-l", str(tmp / "server.log"), "-w",
                               "-o", f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1", "start"),
                   check=True, capture_output=True)
    try:
        subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "oodlab", "mlflow"],
                       env={**os.environ, "PGPASSWORD": DB_PASSWORD}, check=True, capture_output=True)
        yield f"postgresql+psycopg2://oodlab:{DB_PASSWORD}@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(tmp / "data"), "-m", "fast", "stop"),
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory) -> str:
    """infra/mlflow/serve.sh on PostgreSQL with 2 workers; its URL."""
    store = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"MLFLOW_BACKEND_STORE_URI": postgres, "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}
    with (store / "server.log").open("w") as log:
        proc = subprocess.Popen(["bash", str(SERVE), "--dir", str(store), "--port", str(port), "--workers", "2"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc, "serve.sh", timeout_s=600)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def ray_nodes():
    """A Ray cluster of 4 CPUs (room for 2 trials of 2-worker runs) that never saw MLflow's settings."""
    with local_ray_cluster(cpus=4) as cluster:
        yield cluster


@pytest.fixture
def client(server, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    return MlflowClient(server)


def user_env(server: str) -> dict[str, str]:
    """The submitting user's environment: the server and its credentials, as MLflow reads them."""
    return {**os.environ, **LOOPBACK_RAY, "MLFLOW_TRACKING_URI": server, "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}


def write_config(tmp: Path, data_root: Path, ray_address: str, name: str, **extra) -> Path:
    raw = tiny_raw(tmp, data_root) | {"name": name, "mlflow": {"experiment": "server"}} | extra  # no tracking_uri
    raw["ray"] |= {"address": ray_address}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_server_refuses_anonymous_clients(server):
    with pytest.raises(Exception, match="401|not authenticated|Unauthorized"):
        MlflowClient(server).search_experiments()


def test_a_training_run_logs_everything_over_http(server, ray_nodes, client, demo_root, tmp_path):
    path = write_config(tmp_path, demo_root, ray_nodes.address, "http-run")
    run = oodlab("train", str(path), cwd=tmp_path, env=user_env(server))
    assert run.returncode == 0, run.stdout[-5000:]
    assert ADMIN_PASSWORD not in run.stdout

    experiment = client.get_experiment_by_name("server")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied: the server stores the files
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`oodlab.pipeline` = 'http-run'")
    stage = runs[0]
    parent = client.get_run(stage.data.tags["mlflow.parentRunId"])
    assert len(runs) == 1 and stage.info.status == parent.info.status == "FINISHED"
    assert parent.data.params["mlflow.tracking_uri"] == server and parent.data.params["model.name"] == "resnet_tiny_cifar"
    assert ADMIN_PASSWORD not in str(parent.data.params)
    assert stage.data.params["stage.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(stage.info.run_id, "train/loss")] == [0, 1]
    assert 0 <= stage.data.metrics["id_acc"] <= 100 and "ood/energy/all/fpr95" in stage.data.metrics
    assert len(set(stage.data.tags["ray.node_ids"].split(","))) == 1

    artifacts = {a.path for a in client.list_artifacts(stage.info.run_id)}
    assert {"metrics.csv", "metrics.md", "scores.npz", "plots"} <= artifacts
    table = Path(client.download_artifacts(stage.info.run_id, "metrics.csv", str(tmp_path)))
    assert table.read_text().startswith("score,set,metric,percent")
    config_yaml = Path(client.download_artifacts(parent.info.run_id, "config.yaml", str(tmp_path)))
    assert yaml.safe_load(config_yaml.read_text())["mlflow"]["tracking_uri"] == server


def test_a_sweep_of_two_concurrent_trials_logs_over_http(server, ray_nodes, client, demo_root, tmp_path):
    search = {"space": {"stages.train.lr": {"dist": "grid", "values": [0.02, 0.05]}}, "num_samples": 1,
              "scheduler": "fifo", "metric": "ood/energy/val/auroc", "mode": "max", "cpus_per_trial_worker": 0.5}
    path = write_config(tmp_path, demo_root, ray_nodes.address, "http-sweep", search=search)
    run = oodlab("tune", str(path), "stages.train.epochs=1", cwd=tmp_path, env=user_env(server))
    assert run.returncode == 0, run.stdout[-5000:]
    assert ADMIN_PASSWORD not in run.stdout

    experiment = client.get_experiment_by_name("server")
    sweeps = client.search_runs([experiment.experiment_id], filter_string="tags.`oodlab.sweep` = 'http-sweep' "
                                "and tags.`oodlab.kind` = 'sweep'")
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    sweep = sweeps[0]
    assert sweep.data.params["sweep.max_concurrent_trials"] == "2"
    trials = client.search_runs([experiment.experiment_id], filter_string="tags.`oodlab.kind` = 'trial' and "
                                f"tags.`mlflow.parentRunId` = '{sweep.info.run_id}'")
    assert len(trials) == 2 and {t.info.status for t in trials} == {"FINISHED"}
    assert {t.data.params["stages.train.lr"] for t in trials} == {"0.02", "0.05"}
    assert {"trials.csv", "trials.md", "best_config.yaml"} <= {a.path for a in client.list_artifacts(sweep.info.run_id)}


def test_without_a_tracking_uri_the_environment_names_the_server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert config.validate({}, tmp_path).mlflow.tracking_uri == "http://mlflow:5000"
    assert config.validate({"mlflow": {"tracking_uri": None}}, tmp_path).mlflow.tracking_uri == "http://mlflow:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert config.validate({}, tmp_path).mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"


def test_credentials_in_uris_are_masked_in_params_and_artifacts(tmp_path):
    assert tracking.redact("postgresql+psycopg2://u:pw@db:5432/m and https://t0k@h/x?token=abc&n=1") == \
        "postgresql+psycopg2://***@db:5432/m and https://***@h/x?token=***&n=1"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run(uri, "redact", "r", {})
    logger = tracking.RunLogger(uri, run_id)
    logger.params({"mlflow.tracking_uri": "http://alice:s3cret@mlflow:5000"})
    logger.text("tracking_uri: http://alice:s3cret@mlflow:5000\n", "config.yaml")
    client = MlflowClient(uri)
    assert client.get_run(run_id).data.params["mlflow.tracking_uri"] == "http://***@mlflow:5000"
    assert "s3cret" not in Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
