"""MLflow lost mid-run: a real `mlflow server` (sqlite store in a temp folder) that the tests stop with SIGTERM and
start again on the same port and store, or that answers server errors (500, then 503) for a while through a proxy.
What the server could not take waits in the run's buffer on disk and reaches it once, in order, when it returns;
if it never does during a training run, `oodlab mlflow-upload` sends it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_raw
from drills import after_first_checkpoint
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from servers import ErrorProxy, free_port, oodlab, stop, wait_for_http

from oodlab import config
from oodlab.cli import main
from oodlab.distributed import checkpoint, pipeline, tracking
from oodlab.distributed.group import GroupClient
from oodlab.distributed.tracking_buffer import Buffer


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with its store and artifacts in `folder`; stop() and start() keep port and store."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
               "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        with (self.folder / "server.log").open("a") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_http(f"{self.url}/health", self.process, "mlflow server")

    def stop(self) -> None:
        """SIGTERM its process group; return once every process of it is gone (the port is free again)."""
        stop(self.process)
        for _ in range(60):
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
        os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    """The steps a metric was logged at, in the order it was logged."""
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def test_a_lost_server_gets_every_record_once_and_in_order_when_it_returns(server, tmp_path):
    client = MlflowClient(server.url)
    run_id = tracking.start_run(server.url, "outage", "unit", {})
    folder = tmp_path / "mlflow-buffer"
    log = tracking.RunLogger(server.url, run_id, folder)
    log.params({"lr": 0.1})
    for epoch in range(2):
        log.metrics_once({"train/loss": 1.0 / (epoch + 1)}, step=epoch)
        log.metrics({"lr": 0.1 - epoch / 100}, step=epoch)
    with pytest.raises(MlflowException, match="lr"):  # bad input is refused, not buffered
        log.params({"lr": 0.2})
    assert not Buffer(folder, run_id).pending()

    server.stop()
    for epoch in range(2, 4):
        log.metrics_once({"train/loss": 1.0 / (epoch + 1)}, step=epoch)
        log.metrics({"lr": 0.1 - epoch / 100}, step=epoch)
    log.metrics_once({"train/loss": 0.0}, step=3)  # a resumed epoch: logged once, whatever the server says later
    log.text("written while the server was away", "notes.txt")
    log.tags({"phase": "outage"})
    records = Buffer(folder, run_id).records()
    assert [r.op.rpartition(":")[2] for r in records] == ["log_metrics_once", "log_batch"] * 2 + \
        ["log_metrics_once", "log_artifact", "log_batch"]
    assert (Buffer(folder, run_id).files / records[5].file).read_text() == "written while the server was away"
    sent_twice = tmp_path / "copy"  # the buffer as a process that died after sending, before dropping, left it
    shutil.copytree(folder, sent_twice)

    server.start()
    log.metrics_once({"train/loss": 0.2}, step=4)
    assert not Buffer(folder, run_id).pending() and not any(folder.iterdir())
    shutil.rmtree(folder)
    shutil.copytree(sent_twice, folder)
    assert tracking.RunLogger(server.url, run_id, folder).flush()
    tracking.end_run(server.url, run_id, buffer=folder)

    assert steps(client, run_id, "train/loss") == [0, 1, 2, 3, 4]
    assert [m.value for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)] == \
        pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert steps(client, run_id, "lr") == [0, 1, 2, 3]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["phase"] == "outage" and run.data.params["lr"] == "0.1"
    notes = Path(client.download_artifacts(run_id, "notes.txt", str(tmp_path)))
    assert notes.read_text() == "written while the server was away"
    assert not Buffer(folder, run_id).pending()


def test_training_goes_on_without_the_server_and_one_command_uploads_the_rest(server, ray_cluster, demo_root,
                                                                              tmp_path, capsys, monkeypatch):
    raw = tiny_raw(tmp_path, demo_root) | {"name": "outage", "mlflow": {"tracking_uri": server.url,
                                                                       "experiment": "outage"}}
    raw["ray"] |= {"num_workers": 1}
    path = tmp_path / "outage.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = config.load(path)

    submit = GroupClient.submit

    def submit_without_server(*args):  # the server goes away for good once the stage's run exists
        server.stop()
        return submit(*args)

    monkeypatch.setattr(GroupClient, "submit", submit_without_server)
    state = pipeline.run(cfg)
    record = state.stages["train"]
    assert record.done and checkpoint.model_file(record.checkpoint).is_file()
    assert "oodlab mlflow-upload" in capsys.readouterr().out
    waiting = tracking.buffered(cfg)
    assert set(waiting) == {record.run_id, state.parent_run_id}

    server.start()
    client = MlflowClient(server.url)
    assert client.get_metric_history(record.run_id, "train/loss") == []  # everything waited on disk
    assert client.get_run(record.run_id).info.status == "RUNNING"
    upload = oodlab("mlflow-upload", str(path), cwd=tmp_path, env=os.environ)
    assert upload.returncode == 0, upload.stdout[-3000:]
    assert f"sent {sum(waiting.values())} records of 2 runs" in upload.stdout
    assert tracking.buffered(cfg) == {} and not any(tracking.buffer_folder(cfg).iterdir())

    run, parent = client.get_run(record.run_id), client.get_run(state.parent_run_id)
    assert run.info.status == parent.info.status == "FINISHED"
    assert steps(client, record.run_id, "train/loss") == steps(client, record.run_id, "lr") == [0, 1]
    for key, value in record.metrics.items():  # the last epoch's metrics, as the checkpoint has them
        assert steps(client, record.run_id, key) in ([0, 1], [1]), key
        assert run.data.metrics[key] == pytest.approx(value), key
    assert "best_ood_epoch" in run.data.metrics and "train/id_acc" in parent.data.metrics
    assert {"metrics.csv", "scores.npz", "plots"} <= {a.path for a in client.list_artifacts(record.run_id)}
    assert "plots/epoch_curve.png" in {a.path for a in client.list_artifacts(record.run_id, "plots")}
    assert "report.html" in {a.path for a in client.list_artifacts(state.parent_run_id)}
    assert run.inputs.dataset_inputs
    experiment = client.get_experiment_by_name("outage").experiment_id
    models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{record.run_id}'")
    assert len(models) == 1

    assert main(["mlflow-upload", str(path)]) == 0 and "nothing to upload" in capsys.readouterr().out


def metric_points(tracking_uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every (step, value) a run logged, per metric, in step order; machine readings (system/) left out."""
    client = MlflowClient(tracking_uri)
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def test_a_server_answering_500_then_503_mid_run_loses_and_duplicates_no_metric_point(server, tiny_run, demo_root,
                                                                                       tmp_path):
    """After epoch 1's metrics, the proxy answers 500 to 4 API requests (all of MLflow's tries of one call; /health
    stays up, as when the server's store fails), then 503 to 3 requests, /health included (a gateway that lost
    the server). The run buffers what failed, replays it, and logs every metric point of the session's tiny run
    exactly once. MLflow's system-metrics monitor is spared: its samples are not records (they are dropped, not
    buffered), and its retries would take the errors meant for the run's records."""
    proxy = ErrorProxy(server.url)
    raw = tiny_raw(tmp_path, demo_root) | {"name": "errors", "mlflow": {"tracking_uri": proxy.url, "experiment": "errors"}}
    cfg = config.validate(raw, tmp_path)

    def arm() -> None:
        after_first_checkpoint(cfg)
        proxy.fail([(500, 4), (503, 3)], spare=lambda method, path, body: path.endswith("/runs/get")
                   or b'"system/' in body)

    armed = threading.Thread(target=arm, daemon=True)
    armed.start()
    try:
        state = pipeline.run(cfg)
        armed.join()
    finally:
        proxy.shutdown()
        proxy.server_close()
    refused = {status: sum(n for (s, _, _), n in proxy.answered.items() if s == status) for status in (500, 503)}
    assert not proxy.phases and refused == {500: 4, 503: 3}, proxy.answered
    assert tracking.buffered(cfg) == {}
    client = MlflowClient(server.url)
    record, reference = state.stages["train"], tiny_run[2]
    assert {client.get_run(r).info.status for r in (record.run_id, state.parent_run_id)} == {"FINISHED"}
    ref_uri = tiny_run[1].mlflow.tracking_uri
    for run_id, ref_id in [(record.run_id, reference.stages["train"].run_id), (state.parent_run_id, reference.parent_run_id)]:
        points, expected = metric_points(server.url, run_id), metric_points(ref_uri, ref_id)
        assert points.keys() == expected.keys()
        for key, logged in points.items():
            assert [step for step, _ in logged] == [step for step, _ in expected[key]], key  # each step once
            if not key.endswith("_seconds"):
                assert [v for _, v in logged] == pytest.approx([v for _, v in expected[key]], abs=1e-6), key
    stage_points = sum(map(len, metric_points(server.url, record.run_id).values()))
    print(f"\nMLflow errors answered mid-run: {dict(proxy.answered)}; all {stage_points} metric points of the stage "
          "run there, each once")
