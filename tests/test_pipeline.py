"""End to end at tiny size: real Ray Train (2 workers, gloo, DDP), real FFCV files, a real sqlite MLflow store,
the `oodlab eval` command, and a real MLflow server started by `oodlab ui`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from oodlab.cli import main
from oodlab.datapipes.benchmarks import get_benchmark
from oodlab.distributed import checkpoint, pipeline
from oodlab.models import create_model
from oodlab.scores import available_scores

pytestmark = pytest.mark.usefixtures("ray_cluster")
ALL_SCORES = available_scores()


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The session's tiny 2-epoch, 2-worker training run (conftest); its config saved as YAML."""
    return tiny_run


def test_training_run_is_tracked_in_mlflow(trained):
    _, cfg, state = trained
    record = state.stages["train"]
    assert record.done and Path(record.checkpoint).name == "train_epoch_0001"
    model = create_model("resnet_tiny_cifar", num_classes=10)  # a plain timm state dict, loaded weights-only
    model.load_state_dict(checkpoint.load(checkpoint.model_file(record.checkpoint)))

    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(record.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == state.parent_run_id
    assert run.data.tags["oodlab.stage"] == "train" and run.data.tags["oodlab.method"] == "ce"
    assert run.data.params["stage.epochs"] == "2"
    parent = client.get_run(state.parent_run_id)
    assert parent.data.params["model.name"] == "resnet_tiny_cifar" and parent.data.params["ray.num_workers"] == "2"

    history = client.get_metric_history(record.run_id, "ood/energy/all/fpr95")
    assert [m.step for m in history] == [0, 1] and all(0 <= m.value <= 100 for m in history)
    assert [m.step for m in client.get_metric_history(record.run_id, "train/loss")] == [0, 1]
    final = run.data.metrics
    assert 0 <= final["id_acc"] <= 100
    assert {"ood/featnorm/near/auroc", "ood/msp/far/aupr_in", "ood/energy/val/fpr95_oodpos"} <= set(final)

    artifacts = {a.path for a in client.list_artifacts(record.run_id)}
    assert {"metrics.csv", "metrics.md", "scores.npz", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(record.run_id, "plots")}
    assert {"plots/roc_energy.png", "plots/hist_msp.png", "plots/epoch_curve.png"} <= plots
    assert "config.yaml" in {a.path for a in client.list_artifacts(state.parent_run_id)}


def test_mlflow_holds_what_a_user_compares(trained):
    """Model-training experiment with the `oodlab ui` view; on the stage run: datasets, the final model at its last
    epoch (loadable, with the run's metrics linked), per-node system metrics; on the pipeline run: the stage's
    headline numbers and report.html."""
    import mlflow

    _, cfg, state = trained
    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("test")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    saved = json.loads(experiment.tags["mlflow.sharedViewState.oodlab"])  # a saved view, as MLflow's Views menu lists
    view = json.loads(saved["state"])
    assert saved["name"] == "Models compared (oodlab)" and saved["createdAt"] == experiment.creation_time
    assert view["orderByKey"] == "metrics.`ood/energy/all/auroc`" and "metrics.`id_acc`" in view["selectedColumns"]
    assert view["searchFilter"] == "metrics.`id_acc` >= 0"  # the stage runs: one row per model
    link = f"(#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=oodlab)"
    assert experiment.tags["mlflow.note.content"].startswith(f"**[Compare the trained models]{link}**")

    run = client.get_run(state.stages["train"].run_id)
    bench = get_benchmark("digits")
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {f"digits/{split}" for split in bench.files}  # the outliers too
    manifest = Path(f"{bench.path(cfg.data.root, 'id_train')}.json").read_bytes()
    assert inputs["digits/id_train"].dataset.digest == hashlib.sha256(manifest).hexdigest()[:16]
    assert {t.key: t.value for t in inputs["digits/id_train"].tags}["mlflow.data.context"] == "train"

    (output,) = run.outputs.model_outputs
    assert output.step == 1  # the last epoch
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    logged = mlflow.get_logged_model(output.model_id)
    assert {m.key: m.value for m in logged.metrics}["id_acc"] == run.data.metrics["id_acc"]
    logits = mlflow.pytorch.load_model(f"models:/{output.model_id}")(torch.zeros(1, 3, 32, 32))
    assert tuple(logits.shape) == (1, 10)

    node = run.data.tags["ray.node_id.rank0"][:8]
    system = {f"system/{node}/cpu_utilization_percentage", f"system/{node}/system_memory_usage_megabytes"}
    assert system <= set(run.data.metrics)
    assert 1 <= run.data.metrics["best_ood_epoch"] <= 2

    parent = client.get_run(state.parent_run_id)
    assert parent.data.metrics["train/id_acc"] == run.data.metrics["id_acc"]
    headline = {f"train/energy/{g}/{m}" for g in ("near", "far", "all") for m in ("auroc", "fpr95")}
    assert headline <= set(parent.data.metrics)
    report = Path(client.download_artifacts(state.parent_run_id, "report.html")).read_text()
    assert "t: stages compared" in report and "Score featnorm" in report
    assert report.count("data:image/png;base64,") == 3  # the stage's ROC, histogram and per-epoch curve


def test_rerun_resumes_instead_of_retraining(trained):
    _, cfg, state = trained
    again = pipeline.run(cfg)
    assert again.stages["train"].run_id == state.stages["train"].run_id
    history = MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(state.stages["train"].run_id, "train/loss")
    assert len(history) == 2


def test_eval_command_prints_every_score(trained, capsys):
    path, cfg, state = trained
    assert main(["eval", str(path), "--checkpoint", state.stages["train"].checkpoint,
                 "--scores", ",".join(ALL_SCORES)]) == 0
    table = capsys.readouterr().out.split("ID accuracy", 1)[1]
    head, *rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()
                   if line.startswith("| ") and "---" not in line]
    assert head == ["set", "group", "floor", *(f"{s} auroc" for s in ALL_SCORES), *(f"{s} fpr95" for s in ALL_SCORES)]
    bench = get_benchmark(cfg.data.benchmark)
    assert [r[0] for r in rows] == [*bench.groups["near"], "near", *bench.groups["far"], "far", "all", "val"]
    assert all(len(r) == len(head) and all(c not in ("", "-") for c in r) for r in rows)  # every score on every set
    # The saved model reproduces what training logged for it (rank 0's BatchNorm statistics, fp32).
    evaluated = pipeline.PipelineState.load(state.path.parent.with_name("t-eval") / state.path.name).stages["eval"].metrics
    logged = state.stages["train"].metrics
    shared = [k for k in logged if k == "id_acc" or k.startswith(("ood/msp/", "ood/energy/", "ood/featnorm/"))]
    assert len(shared) > 50 and {k: evaluated[k] for k in shared} == pytest.approx({k: logged[k] for k in shared},
                                                                                rel=0, abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"{}")


def test_ui_serves_the_run_and_its_metric_history(trained):
    path, cfg, state = trained
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "oodlab.cli", "ui", str(path), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow ui did not come up"
                time.sleep(1)
        experiment = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=test")["experiment"]
        runs = _get(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        assert {r["info"]["run_id"] for r in runs} >= {state.parent_run_id, state.stages["train"].run_id}
        run_id = state.stages["train"].run_id
        history = _get(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=id_acc")["metrics"]
        assert [m["step"] for m in history] == [0, 1]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


LISTENERS = """
import json
import psutil
from oodlab.config import RayConfig
from oodlab.distributed.launch import ensure_ray
ensure_ray(RayConfig())
ips = {c.laddr.ip for p in psutil.Process().children(recursive=True) if p.name() in ("gcs_server", "raylet")
       for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
print(json.dumps(sorted(ips)))
"""


def test_a_local_ray_instance_listens_on_127_0_0_1_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths have a length limit
    out = subprocess.run([sys.executable, "-c", LISTENERS], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    listening = json.loads(out.stdout.strip().splitlines()[-1])
    assert listening and all(ip.removeprefix("::ffff:") == "127.0.0.1" for ip in listening), listening
