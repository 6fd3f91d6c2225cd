"""Run storage under an `s3://` URI, on a real S3-compatible server (moto's, as its own process on 127.0.0.1).

The endpoint and credentials come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as they
would for a real bucket; `oodlab train` passes them to Ray's workers, which write the checkpoints there.
"""

from __future__ import annotations

import os

import pytest
import yaml
from conftest import BUCKET, tiny_raw
from servers import oodlab


def objects(prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", [])
                  if not item["Key"].endswith("/"))  # pyarrow keeps empty folders as "name/" markers


def test_remote_path_reads_writes_lists_and_moves(s3):
    from oodlab.atomic import write_text
    from oodlab.storage import location, move

    folder = location(f"s3://{BUCKET}/unit/a")
    assert not folder.exists()
    write_text(folder / "x_epoch_0000" / "meta.json", '{"epoch": 0}')
    write_text(folder / "x_epoch_0001" / "meta.json", '{"epoch": 1}')
    write_text(folder / "notes.txt", "hi")
    assert folder.is_dir() and (folder / "notes.txt").is_file() and not (folder / "notes.txt").is_dir()
    assert sorted(p.name for p in folder.glob("x_epoch_*")) == ["x_epoch_0000", "x_epoch_0001"]
    assert (folder / "x_epoch_0001" / "meta.json").read_text() == '{"epoch": 1}'
    assert str((folder / "notes.txt").parent) == f"s3://{BUCKET}/unit/a"

    move(folder, folder.with_name("b"))
    assert objects("unit/") == ["unit/b/notes.txt", "unit/b/x_epoch_0000/meta.json", "unit/b/x_epoch_0001/meta.json"]
    (folder.with_name("b") / "notes.txt").unlink()
    assert "unit/b/notes.txt" not in objects("unit/")


def test_storage_uris_are_checked_before_anything_runs(tmp_path):
    from oodlab import config

    for bad, says in [("ftp://host/runs", "unsupported storage scheme 'ftp'"),
                      (f"s3://{BUCKET}/runs?endpoint_override=x", "give the endpoint and credentials in the environment"),
                      ("s3:///runs", "expected s3://BUCKET/PATH")]:
        with pytest.raises(config.ConfigError, match="ray.storage_path") as err:
            config.validate({"ray": {"storage_path": bad}}, tmp_path)
        assert says in str(err.value)
    cfg = config.validate({"ray": {"storage_path": f"s3://{BUCKET}/runs"}}, tmp_path)
    assert config.to_dict(cfg)["ray"]["storage_path"] == f"s3://{BUCKET}/runs"  # not resolved against the folder


def test_train_stores_checkpoints_and_state_under_s3(s3, tmp_path, demo_root):
    """`oodlab train` with ray.storage_path=s3://...: Ray Train's checkpoints, pipeline.json and the next stage's
    init all live in the bucket, and the state reads back from there (what a rerun resumes from); an `init` may
    name a checkpoint under the URI; --restart moves the old state aside in the bucket."""
    from oodlab import config
    from oodlab.datapipes.benchmarks import for_config
    from oodlab.distributed import pipeline

    raw = tiny_raw(tmp_path, demo_root)
    raw["ray"]["storage_path"] = f"s3://{BUCKET}/runs"
    raw["stages"] = {"train": {"epochs": 1, "lr": 0.05}, "final": {"kind": "eval", "init": "train"}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    first = oodlab("train", str(path), cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout
    stored = objects("runs/")
    assert "runs/t/pipeline.json" in stored
    assert {"runs/t.stages/train_epoch_0000/model.pt", "runs/t.stages/train_epoch_0000/train_state.pt",
            "runs/t.stages/final_epoch_0000/meta.json"} <= set(stored), stored
    assert not (tmp_path / "runs").exists()  # nothing went to a local folder instead
    log_line = next(line for line in first.stdout.splitlines() if "Ray's output goes to" in line)
    assert s3["OODLAB_LOCAL_DIR"] in log_line  # the driver's log stays on local disk

    cfg = config.load(path)
    state = pipeline.PipelineState.load(pipeline.state_path(cfg))
    assert state.stages["train"].done and state.stages["train"].checkpoint == f"s3://{BUCKET}/runs/t.stages/train_epoch_0000"
    assert state.stages["final"].metrics == pytest.approx(
        {k: v for k, v in state.stages["train"].metrics.items() if k in state.stages["final"].metrics}, abs=1e-6)

    model = f"s3://{BUCKET}/runs/t.stages/train_epoch_0000/model.pt"
    bench = for_config(cfg)
    pipeline.check_inits(config.validate({**raw, "stages": {"e": {"kind": "eval", "init": model}}}, tmp_path), bench)
    not_weights = {"e": {"kind": "eval", "init": f"s3://{BUCKET}/runs/t/pipeline.json"}}
    with pytest.raises(config.ConfigError, match="stages.e.init: .* is not a checkpoint of weights"):
        pipeline.check_inits(config.validate({**raw, "stages": not_weights}, tmp_path), bench)
    missing = {"e": {"kind": "eval", "init": model.replace("0000", "0007")}}
    with pytest.raises(config.ConfigError, match="stages.e.init: checkpoint .*_0007/model.pt does not exist"):
        pipeline.check_inits(config.validate({**raw, "stages": missing}, tmp_path), bench)

    pipeline.retire(cfg)
    stored = objects("runs/")
    assert not [k for k in stored if k.startswith(("runs/t/pipeline.json", "runs/t.stages/"))]
    assert [k for k in stored if k.startswith("runs/t/replaced-") and k.endswith("/pipeline.json")]


def test_sweep_state_lives_under_s3(s3, tmp_path, demo_root):
    """A sweep's state file and its trials folder go under the URI; a rerun reads the state back, and --restart
    moves the old sweep aside there."""
    from oodlab import config
    from oodlab.tuning import sweep

    raw = {**tiny_raw(tmp_path, demo_root), "name": "sw",
           "search": {"space": {"stages.train.lr": {"dist": "loguniform", "low": 0.01, "high": 0.3}}, "num_samples": 2}}
    raw["ray"]["storage_path"] = f"s3://{BUCKET}/sweeps"
    cfg = config.validate(raw, tmp_path)
    assert sweep.trial_base(cfg)["ray"]["storage_path"] == f"s3://{BUCKET}/sweeps/sw/sweep/trials"
    assert sweep.previous_state(cfg, restart=False) is None
    state = sweep.new_state(cfg, concurrency=1)
    assert objects("sweeps/") == ["sweeps/sw/sweep/sweep.json"]
    assert sweep.previous_state(cfg, restart=False) == state
    assert sweep.previous_state(cfg, restart=True) is None
    assert [k for k in objects("sweeps/") if k.startswith("sweeps/sw/sweep.replaced-") and k.endswith("/sweep.json")]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_prune_keeps_the_newest_checkpoints_of_one_stage(s3, tmp_path, where):
    """checkpoint.keep_last applies per stage: the other stages' checkpoints in the same run folder stay."""
    from oodlab import config
    from oodlab.atomic import write_text
    from oodlab.distributed import checkpoint

    storage = str(tmp_path / "runs") if where == "local" else f"s3://{BUCKET}/prune"
    cfg = config.validate({"name": "p", "ray": {"storage_path": storage}, "checkpoint": {"keep_last": 2}}, tmp_path)
    for name in ["a_epoch_0000", "a_epoch_0001", "a_epoch_0002", "b_epoch_0000"]:
        write_text(checkpoint.run_dir(cfg) / name / checkpoint.META, "{}")
    checkpoint.prune(cfg, "a")
    assert sorted(p.name for p in checkpoint.run_dir(cfg).glob("*_epoch_*")) == \
        ["a_epoch_0001", "a_epoch_0002", "b_epoch_0000"]
