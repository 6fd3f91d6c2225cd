"""Drill: the head node is lost. A two-node cluster (tests/local_ray_cluster.py: a head and a worker node, a training
worker on each) runs a job from `oodlab submit`; after its first checkpoint every process of the cluster, head and
job driver included, is SIGKILLed. A new cluster starts and the same config is submitted again: the run resumes
from the checkpoint in its storage (a shared folder, or a bucket under s3:// on the moto server), logs every epoch
once and ends with the one-node run's metrics (conftest's `one_node_run`, to the cluster tests' tolerance).
"""

from __future__ import annotations

import os
import time

import pytest
import yaml
from conftest import BUCKET, tiny_raw
from drills import after_first_checkpoint, learned, recovery_seconds, stage_run
from servers import local_ray_cluster, oodlab

from oodlab import config


@pytest.mark.parametrize("storage", ["shared folder", "s3"])
def test_a_run_whose_whole_cluster_was_lost_resumes_when_submitted_to_a_new_one(storage, one_node_run, demo_root,
                                                                                unaugmented, tmp_path, request):
    name = f"head-lost-{storage.split()[0]}"
    raw = tiny_raw(tmp_path, demo_root) | {"name": name}
    raw["data"]["benchmark"] = str(unaugmented)
    raw["ray"]["resources_per_worker"] = {"train_slot": 1}  # one training worker on each node
    if storage == "s3":
        request.getfixturevalue("s3")  # the server, and its endpoint in this environment (the job gets it too)
        raw["ray"]["storage_path"] = f"s3://{BUCKET}/head-lost"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = config.load(path)

    with local_ray_cluster(nodes=2, resources={"train_slot": 1}, dashboard=True) as first:
        job = oodlab("submit", str(path), "--address", first.dashboard, cwd=tmp_path, env=os.environ)
        assert job.returncode == 0, job.stdout[-3000:]
        after_first_checkpoint(cfg, timeout_s=600)
        first.kill()
        killed_at = time.time()

    with local_ray_cluster(nodes=2, resources={"train_slot": 1}, dashboard=True) as second:
        rerun = oodlab("submit", str(path), "--address", second.dashboard, "--follow", cwd=tmp_path, env=os.environ)
        assert rerun.returncode == 0, rerun.stdout[-5000:]

    client, stage = stage_run(cfg.mlflow.tracking_uri, name)
    assert {stage.info.status, client.get_run(stage.data.tags["mlflow.parentRunId"]).info.status} == {"FINISHED"}
    for key in ("train/loss", "id_acc", "ood/energy/all/auroc"):
        assert [m.step for m in client.get_metric_history(stage.info.run_id, key)] == [0, 1], key  # each epoch once
    assert set(stage.data.tags["ray.node_ids"].split(",")) == set(second.node_ids)  # finished on the new cluster
    assert learned(stage.data.metrics) == pytest.approx(learned(one_node_run.data.metrics), rel=1e-5, abs=1e-6)
    # (recovery_seconds checks that the stage resumed once, after epoch 1: not from scratch)
    print(f"\nhead lost ({storage}): recovery {recovery_seconds(cfg, stage.info.run_id, killed_at):.1f} s "
          "(kill -> a new cluster started, the job submitted again and training again)")
