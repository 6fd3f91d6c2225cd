"""Sweep overhead: what each Ray Tune trial costs beyond its training epochs.

    python bench/bench_sweep.py [--trials 8] [--epochs 8]

Runs `oodlab tune`'s sweep (`oodlab.tuning.sweep.run`, random search over the learning rate, FIFO) of tiny
trials on the packaged digits benchmark: resnet_tiny_cifar, 2 Ray Train workers of 0.5 CPU per trial, so on
this 2-core machine one trial runs at a time; 8 epochs make a trial of 25-30 s here. Per trial, from
MLflow: its wall time (the trial run's start to end), its training (the sum of rank 0's `epoch_seconds`,
evaluation included), its stage start-up (`stage_startup_seconds`) and the gap since the previous trial
ended (Tune starting the next one). Overhead = wall - training + gap: the stage starting on the worker
group, the final artifacts, the MLflow runs, Tune. The first trial's gap is the sweep's start-up (Ray, the
worker groups, Tune), paid once and shown apart. The last line is `ratio: R`, the median over trials of
overhead / (wall + gap) (the performance issue's goal: at most 0.2 for a 30-second trial).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from harness import epoch_seconds, private_ray
from oodlab import config
from oodlab.report import markdown

ROOT = Path(__file__).resolve().parent.parent


def sweep_config(work: Path, trials: int, epochs: int) -> config.Config:
    raw = {
        "name": "bench-sweep",
        "data": {"benchmark": "digits", "root": str(work / "data"), "batch_size": 64, "eval_batch_size": 256},
        "model": {"name": "resnet_tiny_cifar"},
        "eval": {"scores": ["msp", "energy"], "final_scores": ["msp", "energy"]},
        "ray": {"num_workers": 2, "cpus_per_worker": 1, "storage_path": str(work / "runs")},
        "mlflow": {"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "bench-sweep"},
        "stages": {"train": {"epochs": epochs, "lr": 0.05}},
        "search": {"space": {"stages.train.lr": {"dist": "loguniform", "low": 0.01, "high": 0.3}},
                   "num_samples": trials, "scheduler": "fifo", "cpus_per_trial_worker": 0.5},
    }
    return config.validate(raw, work)


def trial_times(cfg: config.Config, sweep_run_id: str) -> list[dict[str, float]]:
    """Wall, training, start-up and gap seconds of every trial of the sweep, in start order, from MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    rows, ended = [], client.get_run(sweep_run_id).info.start_time
    trials = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep_run_id}'")
    for trial in sorted(trials, key=lambda t: t.info.start_time):
        (stage,) = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")
        rows.append({"trial": trial.data.tags["oodlab.trial"], "gap": (trial.info.start_time - ended) / 1000,
                     "wall": (trial.info.end_time - trial.info.start_time) / 1000,
                     "training": sum(epoch_seconds(cfg.mlflow.tracking_uri, stage.info.run_id)),
                     "startup": stage.data.metrics["stage_startup_seconds"]})
        ended = trial.info.end_time
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8, help="epochs per trial")
    parser.add_argument("--work", type=Path, default=ROOT / ".oodlab" / "bench-sweep", help="scratch folder (emptied)")
    args = parser.parse_args()

    from oodlab import console
    from oodlab.datapipes.benchmarks import get_benchmark
    from oodlab.datapipes.build import build
    from oodlab.tuning import sweep

    shutil.rmtree(args.work, ignore_errors=True)
    build(get_benchmark("digits"), args.work / "data", progress=False)
    cfg = sweep_config(args.work, args.trials, args.epochs)
    print(f"{args.trials} trials x {args.epochs} epochs of resnet_tiny_cifar on digits, 2 workers x 0.5 CPU each; "
          f"Ray's output goes to {args.work / 'ray.log'}", flush=True)
    start = time.perf_counter()
    with private_ray(), console.output_to(args.work / "ray.log"):
        result = sweep.run(cfg)
    sweep_wall = time.perf_counter() - start
    rows = trial_times(cfg, result.parent_run_id)
    startup, rows[0]["gap"] = rows[0]["gap"], 0.0  # the sweep's start-up, paid once
    for r in rows:
        r["overhead"] = r["wall"] - r["training"] + r["gap"]
        r["fraction"] = r["overhead"] / (r["wall"] + r["gap"])
    print(markdown(["trial", "gap before s", "wall s", "training s (epochs)", "overhead s", "overhead / (wall + gap)",
                    "stage start-up s"],
                   [[r["trial"], f"{r['gap']:.1f}", f"{r['wall']:.1f}", f"{r['training']:.1f}", f"{r['overhead']:.1f}",
                     f"{r['fraction']:.2f}", f"{r['startup']:.1f}"] for r in rows]))
    training = sum(r["training"] for r in rows)
    print(f"sweep wall time {sweep_wall:.0f} s for {len(rows)} trials ({training:.0f} s of it training: "
          f"{1 - training / sweep_wall:.2f} overhead in all); sweep start-up before the first trial {startup:.1f} s; "
          f"median trial {statistics.median(r['wall'] for r in rows):.1f} s, "
          f"median overhead {statistics.median(r['overhead'] for r in rows):.1f} s")
    print(f"ratio: {statistics.median(r['fraction'] for r in rows):.2f}")


if __name__ == "__main__":
    main()
