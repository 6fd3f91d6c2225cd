"""Ray Tune sweeps: space conversion and checks, the objective, trial concurrency, and two real tiny sweeps.

The real sweeps run once per module, each as `oodlab tune` in a subprocess interrupted after its first trial
ends (the random one by SIGKILL, the Optuna one by SIGINT, as Ctrl-C), then resumed in this process; 2 workers
x 0.5 CPU on the 2-CPU test cluster: random search (4 trials: 2 grid values x 2 samples, ASHA, 2 epochs) and
Optuna TPE (3 trials, ASHA, 1-2 epochs on one schedule). The tests read what they left behind in Ray Tune's
experiment folders and the sqlite MLflow stores.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import tiny_raw
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from oodlab import cli, config
from oodlab.config import ConfigError
from oodlab.distributed.worker import RESUMED
from oodlab.datapipes.benchmarks import get_benchmark
from oodlab.tuning import objective, resources, space, summary

TEST_KEY = re.compile(r"^(id_acc|ood/[^/]+/(?!val/)[^/]+/[^/]+)$")  # ID test accuracy, any OOD test set or group


def base_raw(tmp: Path, data_root: Path, search: dict | None = None, stages: dict | None = None) -> dict:
    return {
        **tiny_raw(tmp, data_root),
        "name": "tiny",
        "stages": stages or {"train": {"epochs": 2, "lr": 0.05, "background": {"weight": 0.1}}},
        "search": search or {
            "space": {"stages.train.lr": {"dist": "loguniform", "low": 0.01, "high": 0.3},
                      "stages.train.background.select": {"dist": "grid", "values": ["lowest", "topk"]}},
            "num_samples": 2, "scheduler": "asha", "cpus_per_trial_worker": 0.5},
    }


def with_space(tmp_path: Path, dims: dict, **stages) -> config.Config:
    return config.validate(base_raw(tmp_path, tmp_path / "data", {"space": dims}, stages or None), tmp_path)


# -- space -------------------------------------------------------------------------------------------------
def test_each_distribution_becomes_the_tune_domain_with_its_bounds():
    dims = {"a": config.Dist(dist="uniform", low=0.1, high=0.2), "b": config.Dist(dist="loguniform", low=1e-4, high=1e-1),
            "c": config.Dist(dist="randint", low=1, high=3), "d": config.Dist(dist="choice", values=["x", "y"]),
            "e": config.Dist(dist="grid", values=[1, 2, 3])}
    tuned = space.to_tune(dims)
    rng = np.random.default_rng(0)
    a, b, c, d = (np.asarray(tuned[k].sample(size=2000, random_state=rng)) for k in "abcd")
    assert 0.1 <= a.min() and a.max() <= 0.2
    assert 1e-4 <= b.min() and b.max() <= 1e-1 and np.median(np.log10(b)) == pytest.approx(-2.5, abs=0.15)  # log scale
    assert set(c.tolist()) == {1, 2, 3}  # randint includes `high`
    assert set(d.tolist()) == {"x", "y"}
    assert tuned["e"] == {"grid_search": [1, 2, 3]}


def test_grid_dimensions_multiply_the_trial_count_and_optuna_refuses_them(tmp_path):
    cfg = with_space(tmp_path, {"stages.train.lr": {"dist": "loguniform", "low": 0.01, "high": 0.1},
                                "stages.train.background.select": {"dist": "grid", "values": ["lowest", "topk"]},
                                "stages.train.epochs": {"dist": "grid", "values": [1, 2, 3]}},
                     train={"epochs": 2, "schedule_epochs": 3, "background": {"weight": 0.1}})
    assert space.expected_trials(cfg.search) == 4 * 2 * 3  # num_samples x grid points
    with pytest.raises(ConfigError, match="grid dimensions .* need searcher: random"):
        config.validate(base_raw(tmp_path, tmp_path, {"space": {"stages.train.lr": {"dist": "grid", "values": [0.1]}},
                                                      "searcher": "optuna"}), tmp_path)
    with pytest.raises(ValueError, match="randint: low and high must be whole numbers"):
        config.Dist(dist="randint", low=1.5, high=3)


def test_sampled_values_round_trip_through_override_text(tmp_path):
    assert space.overrides({"stages.train.lr": np.float64(1e-5), "stages.train.background.select": "topk",
                            "stages.train.epochs": np.int64(3)}) == [
        "stages.train.lr=1.0e-05", "stages.train.background.select=topk", "stages.train.epochs=3"]
    raw = config.to_dict(with_space(tmp_path, {"stages.train.lr": {"dist": "uniform", "low": 0.1, "high": 0.2}}))
    cfg = space.sampled_config(raw, {"stages.train.lr": 1e-5, "stages.train.epochs": 3})
    assert cfg.stages["train"].lr == 1e-5 and cfg.stages["train"].epochs == 3


@pytest.mark.parametrize("key, dist, message", [
    ("stages.trian.lr", {"dist": "uniform", "low": 0.01, "high": 0.1}, "'stages' has no 'trian'; did you mean 'train'"),
    ("stages.train.background.wieght", {"dist": "uniform", "low": 0.01, "high": 0.1}, "did you mean 'weight'"),
    ("stages.train.mask.mask_ratio", {"dist": "uniform", "low": 0.1, "high": 0.3}, "'stages.train.mask' is not set"),
    ("ray.num_workers", {"dist": "choice", "values": [1, 2]}, "'ray.num_workers' cannot be searched"),
    ("stages.train.momentum", {"dist": "uniform", "low": 0.5, "high": 1.0},
     r"search.space.stages.train.momentum: the value 1.0 gives an invalid config"),
    ("stages.train.background.select", {"dist": "choice", "values": ["lowest", "median"]}, "the value 'median'"),
])
def test_check_space_names_the_bad_key_before_ray_starts(tmp_path, key, dist, message):
    cfg = with_space(tmp_path, {key: dist})
    with pytest.raises(ConfigError, match=message):
        space.check_space(cfg)


def test_oodlab_tune_reports_a_bad_space_without_starting_ray(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(base_raw(tmp_path, tmp_path / "data")))
    assert cli.main(["tune", str(path), "search.space={stages.trian.lr: {dist: uniform, low: 0.01, high: 0.1}}"]) == 2
    assert "'stages.trian.lr' is not a setting of this config" in capsys.readouterr().err
    raw = base_raw(tmp_path, tmp_path / "data")
    del raw["search"]
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["tune", str(path)]) == 2
    assert "no search section" in capsys.readouterr().err


# -- objective ---------------------------------------------------------------------------------------------
def test_the_validation_view_drops_every_test_metric():
    metrics = {"id_acc": 90.0, "id_val_acc": 89.0, "ood/energy/val/fpr95": 30.0, "ood/energy/all/fpr95": 20.0,
               "ood/energy/letters/auroc": 80.0, "ood/msp/near/fpr95": 40.0, "train/loss": 1.2, "lr": 0.1,
               "epoch_seconds": 3.0, "forget_threshold": 0.2, "something_new": 1.0}
    assert objective.validation_view(metrics) == {"id_val_acc": 89.0, "ood/energy/val/fpr95": 30.0, "train/loss": 1.2,
                                                  "lr": 0.1, "epoch_seconds": 3.0}


@pytest.mark.parametrize("mode, value, acc, expected", [
    ("min", 30.0, 89.5, 30.0),  # drop 0.5 <= 1: the metric itself
    ("min", 30.0, 87.0, 102.0),  # drop 3: 2 points over the bound -> worse than any admissible fpr95
    ("max", 70.0, 87.0, -2.0),  # auroc: below any admissible value
])
def test_the_objective_penalises_an_id_accuracy_drop_beyond_the_bound(mode, value, acc, expected):
    search = config.SearchConfig(space={}, metric=f"ood/energy/val/{'fpr95' if mode == 'min' else 'auroc'}", mode=mode,
                                 max_id_acc_drop=1.0)
    assert objective.objective({search.metric: value, "id_val_acc": acc}, search, reference=90.0) == expected
    unbounded = search.model_copy(update={"max_id_acc_drop": None})
    assert objective.objective({search.metric: value, "id_val_acc": acc}, unbounded, reference=None) == value


def test_the_starting_accuracy_comes_from_the_checkpoint_meta(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="has no id_val_acc"):
        objective.reference_accuracy(tmp_path / "model.pt")
    (tmp_path / "meta.json").write_text(json.dumps({"stage": "b", "epoch": 9, "metrics": {"id_val_acc": 93.5}}))
    assert objective.reference_accuracy(tmp_path / "model.pt") == 93.5
    cfg = with_space(tmp_path, {"stages.train.lr": {"dist": "uniform", "low": 0.01, "high": 0.1}})
    bounded = cfg.model_copy(update={"search": cfg.search.model_copy(update={"max_id_acc_drop": 1.0})})
    with pytest.raises(ConfigError, match="trains from scratch"):
        objective.check_objective(bounded)
    unevaluated = cfg.model_copy(update={"search": cfg.search.model_copy(update={"metric": "ood/knn/val/fpr95"})})
    with pytest.raises(ConfigError, match="score 'knn' is not in eval.scores"):
        objective.check_objective(unevaluated)


@pytest.mark.parametrize("search, read", [
    ({"metric": "id_val_acc", "mode": "max"}, {"id_val": "the objective id_val_acc"}),
    ({"metric": "ood/knn/val/auroc", "mode": "max", "max_id_acc_drop": 1.0},
     {"ood_val": "the objective ood/knn/val/auroc (OOD side)",
      "id_val": "the objective ood/knn/val/auroc (ID side); id_val_acc (the 1-point bound)",
      "id_train": "fitting the knn score"}),
    ({"metric": "ood/react/val/fpr95", "mode": "min"},
     {"ood_val": "the objective ood/react/val/fpr95 (OOD side)",
      "id_val": "the objective ood/react/val/fpr95 (ID side); fitting the react score"}),
])
def test_the_selection_statement_lists_what_the_search_reads_and_no_test_set(tmp_path, search, read):
    raw = base_raw(tmp_path, tmp_path / "data", {"space": {"stages.train.lr": {"dist": "uniform", "low": 0.01,
                                                                                "high": 0.1}}} | search)
    cfg = config.validate(raw, tmp_path)
    sentence, rows = summary.selection(cfg)
    bench = get_benchmark(cfg.data.benchmark)
    assert rows == [[split, why, str(bench.path(cfg.data.root, split))] for split, why in read.items()]
    chosen_on = " and ".join(s for s in read if s != "id_train")
    assert sentence.startswith(f"Which data chooses the winner: {chosen_on} of benchmark {cfg.data.benchmark}, "
                               f"through {search['metric']} ({search['mode']}) only")


# -- resources ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cluster, ray_cfg, cpw, fits", [
    ({"CPU": 2.0}, {"num_workers": 2, "cpus_per_worker": 1}, 0.5, 1),  # this machine: 1 + 2 x 0.5 = 2 CPUs
    ({"CPU": 8.0}, {"num_workers": 2, "cpus_per_worker": 1}, None, 2),  # 1 + 2 x 1 = 3 -> 2 trials
    ({"CPU": 256.0, "GPU": 16.0}, {"num_workers": 8, "cpus_per_worker": 8, "use_gpu": True}, None, 2),  # GPU-bound
    ({"CPU": 40.0, "GPU": 16.0}, {"num_workers": 8, "cpus_per_worker": 4, "use_gpu": True}, None, 1),  # CPU-bound
])
def test_concurrent_trials_fit_driver_and_workers_together(tmp_path, cluster, ray_cfg, cpw, fits):
    raw = base_raw(tmp_path, tmp_path, {"space": {"stages.train.lr": {"dist": "uniform", "low": 0.01, "high": 0.1}},
                                        "cpus_per_trial_worker": cpw})
    raw["ray"] |= ray_cfg
    assert resources.max_concurrent_trials(cluster, config.validate(raw, tmp_path)) == fits


def test_a_trial_that_cannot_fit_is_refused_with_the_fix(tmp_path):
    cfg = with_space(tmp_path, {"stages.train.lr": {"dist": "uniform", "low": 0.01, "high": 0.1}})  # 1 + 2 x 1 CPU
    with pytest.raises(ConfigError, match=r"one trial needs 3 CPU .* lower search.cpus_per_trial_worker"):
        resources.max_concurrent_trials({"CPU": 2.0}, cfg)


# -- searchers and schedulers ------------------------------------------------------------------------------
def test_optuna_and_random_searchers_sample_the_space_within_the_concurrency_limit(tmp_path):
    from ray.tune.search import BasicVariantGenerator

    from oodlab.tuning import sweep

    dims = {"stages.train.lr": {"dist": "loguniform", "low": 0.01, "high": 0.1},
            "stages.train.background.select": {"dist": "choice", "values": ["lowest", "topk"]}}
    raw = base_raw(tmp_path, tmp_path, {"space": dims, "searcher": "optuna"})
    optuna = sweep.searcher(config.validate(raw, tmp_path), concurrency=2)
    assert optuna.set_search_properties("objective", "min", space.to_tune(config.validate(raw, tmp_path).search.space))
    first, second, third = (optuna.suggest(f"t{i}") for i in range(3))
    for point in (first, second):
        assert 0.01 <= point["stages.train.lr"] <= 0.1 and point["stages.train.background.select"] in ("lowest", "topk")
    assert third is None  # two trials running: the limiter holds the third back
    raw["search"]["searcher"] = "random"
    assert isinstance(sweep.searcher(config.validate(raw, tmp_path), concurrency=2), BasicVariantGenerator)


@pytest.mark.parametrize("scheduler, epochs, space_epochs, kind, last", [
    ("asha", 2, None, "AsyncHyperBandScheduler", 2),
    ("asha", 1, None, "FIFOScheduler", 1),  # one epoch: nothing to stop early
    ("fifo", 6, None, "FIFOScheduler", 6),
    ("asha", 6, {"dist": "randint", "low": 5, "high": 20}, "AsyncHyperBandScheduler", 20),  # schedule on 20 epochs
    ("fifo", 6, {"dist": "choice", "values": [4, 8]}, "FIFOScheduler", 8),
])
def test_asha_runs_on_the_tuned_stage_epochs(tmp_path, scheduler, epochs, space_epochs, kind, last):
    from oodlab.tuning import sweep

    dims = {"stages.train.lr": {"dist": "loguniform", "low": 0.01, "high": 0.1}}
    stage = {"epochs": epochs, "background": {"weight": 0.1}}
    if space_epochs:
        dims["stages.train.epochs"] = space_epochs
        stage["schedule_epochs"] = 20 if scheduler == "asha" else None
    raw = base_raw(tmp_path, tmp_path, {"space": dims, "scheduler": scheduler}, {"train": stage})
    cfg = config.validate(raw, tmp_path)
    assert sweep.max_epochs(cfg) == last and type(sweep.scheduler(cfg)).__name__ == kind


def test_shipped_sweep_configs_validate(tmp_path):
    root = Path(__file__).resolve().parent.parent / "configs"
    demo = config.load(root / "demo_sweep.yaml")
    space.check_space(demo)
    objective.check_objective(demo)
    assert space.expected_trials(demo.search) == 4
    start = tmp_path / "baseline"
    start.mkdir()
    (start / "model.pt").write_bytes(b"")
    (start / "meta.json").write_text(json.dumps({"stage": "baseline", "epoch": 89, "metrics": {"id_val_acc": 76.1}}))
    init = str(start / "model.pt")
    big = config.load(root / "imagenet1k_resnet50_sweep.yaml", [f"stages.estimate.init={init}", f"stages.um.init={init}"])
    space.check_space(big)
    objective.check_objective(big)
    assert resources.per_trial(big) == {"CPU": 65.0, "GPU": 8.0}
    assert objective.tuned_stage(big) == "um"


def test_a_rerun_with_another_config_is_refused_and_restart_moves_the_old_sweep_aside(tmp_path):
    from oodlab.tuning import sweep

    cfg = with_space(tmp_path, {"stages.train.lr": {"dist": "uniform", "low": 0.01, "high": 0.1}})
    assert sweep.previous_state(cfg, restart=False) is None
    first = sweep.new_state(cfg, concurrency=1)
    assert sweep.previous_state(cfg, restart=False) == first  # a rerun resumes it
    edited = config.validate(base_raw(tmp_path, tmp_path / "data", {"space": {"stages.train.lr": {
        "dist": "uniform", "low": 0.01, "high": 0.2}}}), tmp_path)
    with pytest.raises(ConfigError, match=r"another config \(differs in: search.space.stages.train.lr.high\)"):
        sweep.previous_state(edited, restart=False)
    assert sweep.previous_state(edited, restart=True) is None
    client = MlflowClient(cfg.mlflow.tracking_uri)
    assert client.get_run(first.parent_run_id).info.status == "KILLED"
    assert client.get_run(first.parent_run_id).data.tags["oodlab.kind"] == "sweep"
    assert [p.name.startswith("sweep.replaced-") for p in sweep.sweep_folder(cfg).parent.iterdir()].count(True) == 1


# -- the real sweeps ---------------------------------------------------------------------------------------
def interrupted_then_resumed(ray_cluster, tmp: Path, raw: dict, sig: signal.Signals) -> SimpleNamespace:
    """`oodlab tune` interrupted by `sig` after its first trial ended, then resumed here; wall times kept.

    SIGINT is a user's Ctrl-C. SIGKILL is the driver's machine lost: it comes once Tune's experiment state has
    been saved after that trial ended (Tune saves it every 10 s or more) and the next trial has checkpointed an
    epoch of its stage, so the rerun must continue both the sweep and that stage.
    Tune's experiment folder as the interrupt left it is copied to `interrupted`, to compare with the end.
    """
    from oodlab.tuning import sweep

    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = config.load(path)
    experiment = sweep.sweep_folder(cfg) / "tune"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "oodlab.cli", "tune", str(path)], cwd=tmp, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines, ended_before, interrupted_at = [], [], None
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"\[sweep\] (\S+) (finished|stopped early)", line)
        if found and interrupted_at is None:
            ended_before.append(found.group(1))
            if sig == signal.SIGKILL:
                saved_after(experiment, time.time())
                running_stage_checkpointed(cfg.mlflow.tracking_uri)
            interrupted_at = time.time()
            proc.send_signal(sig)
    first_rc = proc.wait(timeout=120)
    first_seconds = time.monotonic() - start
    shutil.copytree(experiment, tmp / "interrupted")
    start = time.monotonic()
    result = sweep.run(cfg)
    resumed_seconds = time.monotonic() - start
    start = time.monotonic()
    again = sweep.run(cfg)
    print(f"\n{cfg.search.searcher} sweep: {first_seconds:.0f} s until {sig.name} + {resumed_seconds:.0f} s "
          f"resumed; rerun of the finished sweep {time.monotonic() - start:.0f} s\n"
          + summary.text(result, cfg, path, []), flush=True)
    return SimpleNamespace(cfg=cfg, path=path, signal=sig, first_rc=first_rc, first_output="".join(lines),
                           ended_before=ended_before, interrupted_at=interrupted_at, result=result, again=again,
                           client=MlflowClient(cfg.mlflow.tracking_uri), experiment=experiment,
                           interrupted=tmp / "interrupted")


def running_stage_checkpointed(tracking_uri: str, timeout_s: float = 300) -> None:
    """Block until a running stage has logged an epoch (its metrics come after its checkpoint)."""
    client, deadline = MlflowClient(tracking_uri), time.monotonic() + timeout_s
    running = "attributes.status = 'RUNNING' and tags.`oodlab.stage` = 'train'"
    while not any(client.get_metric_history(run.info.run_id, "train/loss")
                  for run in client.search_runs([client.get_experiment_by_name("test").experiment_id], running)):
        assert time.monotonic() < deadline, f"no running stage logged an epoch within {timeout_s} s"
        time.sleep(0.2)


def saved_after(experiment: Path, moment: float, timeout_s: float = 120) -> None:
    """Block until Tune's experiment state in `experiment` was written after `moment` (and a second more)."""
    deadline = time.monotonic() + timeout_s
    while max((p.stat().st_mtime for p in experiment.glob("experiment_state-*.json")), default=0) <= moment:
        assert time.monotonic() < deadline, f"Tune saved no experiment state in {experiment} for {timeout_s} s"
        time.sleep(0.2)
    time.sleep(1)  # the searcher's state is written beside it


@pytest.fixture(scope="module")
def tiny_sweep(ray_cluster, demo_root, tmp_path_factory):
    """Random search with ASHA: 2 grid values x 2 samples of the learning rate, 2 epochs; its driver SIGKILLed."""
    tmp = tmp_path_factory.mktemp("sweep")
    return interrupted_then_resumed(ray_cluster, tmp, base_raw(tmp, demo_root), signal.SIGKILL)


@pytest.fixture(scope="module")
def optuna_sweep(ray_cluster, demo_root, tmp_path_factory):
    """Optuna (TPE) with ASHA: 3 trials over the learning rate and the epoch count (1 or 2) on one 4-epoch schedule."""
    tmp = tmp_path_factory.mktemp("optuna")
    search = {"space": {"stages.train.lr": {"dist": "loguniform", "low": 0.01, "high": 0.3},
                        "stages.train.epochs": {"dist": "randint", "low": 1, "high": 2}},
              "num_samples": 3, "searcher": "optuna", "scheduler": "asha", "cpus_per_trial_worker": 0.5}
    stages = {"train": {"epochs": 2, "schedule_epochs": 4, "lr": 0.05}}
    return interrupted_then_resumed(ray_cluster, tmp, base_raw(tmp, demo_root, search, stages), signal.SIGINT)


def stage_run(client: MlflowClient, trial_id: str) -> Run:
    """The MLflow run of a trial's (only) stage."""
    trial = client.search_runs([client.get_experiment_by_name("test").experiment_id],
                               f"tags.`oodlab.trial` = '{trial_id}'")[0]
    (stage,) = client.search_runs([trial.info.experiment_id], f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")
    return stage


def test_tiny_sweep_leaves_a_parent_run_with_four_trial_runs(tiny_sweep):
    cfg, result, client = tiny_sweep.cfg, tiny_sweep.result, tiny_sweep.client
    assert not result.interrupted and result.ended == 4
    assert all(r.status in ("done", "stopped") for r in result.rows)
    assert sorted(r.params["stages.train.background.select"] for r in result.rows) == ["lowest", "lowest", "topk", "topk"]
    assert all(r.epochs in (1, 2) for r in result.rows) and any(r.status == "done" for r in result.rows)

    experiment = client.get_experiment_by_name("test").experiment_id
    sweeps = client.search_runs([experiment], "tags.`oodlab.kind` = 'sweep'")
    assert [s.info.run_id for s in sweeps] == [result.parent_run_id]
    parent = sweeps[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.max_concurrent_trials"] == "1"  # 2 CPUs / (1 driver + 2 x 0.5 workers)
    trials = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(trials) == 4 and {t.data.tags["oodlab.kind"] for t in trials} == {"trial"}
    by_trial = {t.data.tags["oodlab.trial"]: t for t in trials}
    assert set(by_trial) == {r.trial_id for r in result.rows}
    for row in result.rows:
        run = by_trial[row.trial_id]
        # The sampled values are params of the trial run (the trial's whole config is logged as params).
        assert float(run.data.params["stages.train.lr"]) == row.params["stages.train.lr"]
        assert run.data.params["stages.train.background.select"] == row.params["stages.train.background.select"]
        assert run.info.status == ("FINISHED" if row.status == "done" else "KILLED")
        (stage,) = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        losses = client.get_metric_history(stage.info.run_id, "train/loss")
        assert sorted(m.step for m in losses) == list(range(row.epochs))  # per-epoch metrics, each epoch once
        assert stage.data.metrics["ood/energy/val/fpr95"] == pytest.approx(row.metric)
        # It ran on the sweep's worker group, a Ray Train run kept for all the trials (one at a time here).
        assert stage.data.tags["ray.train_run"] == "tiny.worker-group-0"

    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"best_config.yaml", "trials.csv", "trials.md", "config.yaml", "plots"} <= artifacts
    assert [a.path for a in client.list_artifacts(result.parent_run_id, "plots")] == ["plots/objective.png"]
    local = Path(client.download_artifacts(result.parent_run_id, "best_config.yaml"))
    best = config.load(local)  # a valid config that `oodlab train` can run
    assert best.name == "tiny-best" and best.search is None
    assert best.stages["train"].lr == result.best.params["stages.train.lr"]
    assert best.stages["train"].background.select == result.best.params["stages.train.background.select"]
    assert parent.data.tags["oodlab.best_trial"] == result.best.trial_id
    table = Path(client.download_artifacts(result.parent_run_id, "trials.csv")).read_text().splitlines()
    assert len(table) == 5 and table[0] == ",".join(["trial", "status", "epochs", *cfg.search.space, "objective",
                                                       cfg.search.metric, "id_val_acc"])
    # The best trial's final metrics, test sets included, are read after the sweep from its MLflow runs.
    assert {"id_acc", "ood/energy/near/fpr95", "ood/energy/far/fpr95"} <= set(result.best_runs["train"])


@pytest.mark.parametrize("which", ["tiny_sweep", "optuna_sweep"])
def test_interrupted_sweep_resumes_without_rerunning_ended_trials(request, which):
    swept = request.getfixturevalue(which)
    if swept.signal == signal.SIGINT:
        assert swept.first_rc == 130, swept.first_output[-3000:]
        assert "Interrupted: rerun the same command to resume" in swept.first_output
    else:
        assert swept.first_rc == -signal.SIGKILL
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(swept.experiment))
    (ended,) = swept.ended_before
    history = analysis.trial_dataframes  # every result Tune received, by trial id
    # Tune kept the results of the trial that ended before the interrupt and did not run it again.
    assert history[ended]["timestamp"].max() <= swept.interrupted_at
    assert history[ended]["training_iteration"].tolist() == list(range(1, len(history[ended]) + 1))
    assert len(history) == swept.result.expected == swept.result.ended
    # A trial cut mid-stage continued its stage from its last checkpoint, in the same MLflow run; none is left open.
    experiment = swept.client.get_experiment_by_name("test").experiment_id
    assert swept.client.search_runs([experiment], "attributes.status = 'RUNNING'") == []
    for row in swept.result.rows:
        stage = stage_run(swept.client, row.trial_id).info.run_id
        before = [m.step for m in swept.client.get_metric_history(stage, "train/loss")
                  if m.timestamp / 1000 <= swept.interrupted_at]
        if row.trial_id != ended and row.status == "done" and before:  # (a trial ASHA stopped is not resumed)
            resumed = [m.value for m in swept.client.get_metric_history(stage, RESUMED)]
            assert resumed == [max(before) + 1], (row.trial_id, before, resumed)
    # Rerunning a finished sweep restores it: same rows, same parent run, nothing new in MLflow.
    again = swept.again
    assert again.parent_run_id == swept.result.parent_run_id
    assert [(r.trial_id, r.objective) for r in again.rows] == [(r.trial_id, r.objective) for r in swept.result.rows]


def test_optuna_sweep_continues_its_study_and_keeps_one_schedule(optuna_sweep):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    result, experiment = optuna_sweep.result, optuna_sweep.experiment
    assert [p.name for p in experiment.glob("basic-variant-state-*")] == []  # not the random searcher

    def study(folder: Path) -> optuna.Study:
        searcher = OptunaSearch()
        searcher.restore_from_dir(str(folder))  # Tune's saved searcher state (searcher-state-*.pkl)
        return searcher._ot_study  # Ray exposes the study only as this attribute

    before, after = study(optuna_sweep.interrupted), study(experiment)
    assert isinstance(after.sampler, optuna.samplers.TPESampler)
    # Optuna chose every trial's values, and learned the objective Tune received for each.
    told = {(t.params["stages.train.lr"], t.params["stages.train.epochs"]): t.value for t in after.trials}
    assert told == {(r.params["stages.train.lr"], r.params["stages.train.epochs"]): r.objective for r in result.rows}
    # The resumed sweep continued the interrupted study rather than starting a new one: the trials Optuna had
    # asked for before the interrupt are the same trials (number, values, start time) in the final study.
    asked = [(t.number, t.params, t.datetime_start) for t in before.trials]
    assert 1 <= len(asked) < len(after.trials) == 3
    assert [(t.number, t.params, t.datetime_start) for t in after.trials[:len(asked)]] == asked
    # Every trial followed the same 4-epoch cosine schedule (stages.train.schedule_epochs), longer than any
    # trial's own epochs (1 or 2): the learning rate after epoch e is lr * (1 + cos(pi * e / 4)) / 2.
    for row in result.rows:
        history = optuna_sweep.client.get_metric_history(stage_run(optuna_sweep.client, row.trial_id).info.run_id, "lr")
        lrs = [m.value for m in sorted(history, key=lambda m: m.step)]
        base = row.params["stages.train.lr"]
        assert lrs == pytest.approx([base * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(1, row.epochs + 1)],
                                    rel=1e-4)


@pytest.mark.parametrize("which", ["tiny_sweep", "optuna_sweep"])
def test_the_summary_says_which_data_chose_the_winner_before_its_test_numbers(request, which):
    swept = request.getfixturevalue(which)
    cfg, result = swept.cfg, swept.result
    out = summary.text(result, cfg, swept.path, [])
    bench = get_benchmark(cfg.data.benchmark)
    stated = out.index(f"Which data chooses the winner: ood_val and id_val of benchmark {cfg.data.benchmark}, through "
                       f"ood/energy/val/fpr95 (min) only; its test sets (id_test, {', '.join(bench.ood_test)}) are "
                       "read after the choice:")
    for split, side in (("ood_val", "OOD"), ("id_val", "ID")):
        row = f"| {split} | the objective ood/energy/val/fpr95 ({side} side) | {bench.path(cfg.data.root, split)} |"
        assert stated < out.index(row) < out.index(f"Best trial {result.best.trial_id}")


def test_test_ood_data_cannot_change_which_trial_wins(tiny_sweep):
    from ray.tune import ExperimentAnalysis

    cfg, result, client = tiny_sweep.cfg, tiny_sweep.result, tiny_sweep.client
    # 1. Nothing Tune received (every epoch of every trial) names a test set; the workers did compute them.
    analysis = ExperimentAnalysis(str(tiny_sweep.experiment))
    seen = set().union(*(df.columns for df in analysis.trial_dataframes.values()))
    assert not [k for k in seen if TEST_KEY.match(k)] and {"objective", "ood/energy/val/fpr95", "id_val_acc"} <= seen
    final = {row.trial_id: stage_run(client, row.trial_id).data.metrics for row in result.rows}
    assert all(any(TEST_KEY.match(k) for k in metrics) for metrics in final.values())

    # 2. The winner computed from the full metrics through the sweep's own path (view -> objective -> best)
    #    is the sweep's winner, and stays it under arbitrary changes of every test metric.
    epochs = {r.trial_id: r.epochs for r in result.rows}

    def winner(metrics_by_trial: dict[str, dict[str, float]], epochs_by_trial: dict[str, int]) -> str:
        rows = []
        for row in result.rows:
            view = objective.validation_view(metrics_by_trial[row.trial_id])
            view |= {"objective": objective.objective(view, cfg.search, None),
                     "training_iteration": epochs_by_trial[row.trial_id]}
            rows.append(summary.trial_row(row.trial_id, row.params, view, False, cfg.stages["train"].epochs,
                                          cfg.search.metric))
        return summary.pick_best(rows, cfg.search.mode).trial_id

    assert winner(final, epochs) == result.best.trial_id
    rng = np.random.default_rng(0)
    for _ in range(20):
        scrambled = {t: {k: (rng.uniform(0, 100) if TEST_KEY.match(k) else v) for k, v in m.items()}
                     for t, m in final.items()}
        assert winner(scrambled, epochs) == result.best.trial_id
    # The check has teeth: the same computation follows the validation metric (all trials taken as complete,
    # so that any of them can win).
    complete = dict.fromkeys(epochs, cfg.stages["train"].epochs)
    for row in result.rows:
        favoured = {t: dict(m) for t, m in final.items()}
        favoured[row.trial_id]["ood/energy/val/fpr95"] = -1.0
        assert winner(favoured, complete) == row.trial_id
