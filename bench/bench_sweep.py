"""Sweep overhead: what each Ray Tune trial costs beyond its training epochs.

    python bench/bench_sweep.py [--trials 8] [--epochs 2]

Runs `oodlab tune`'s sweep (`oodlab.tuning.sweep.run`, random search over the learning rate, FIFO) of tiny
trials on the packaged digits benchmark: resnet_tiny_cifar, 2 Ray Train workers of 0.5 CPU per trial, so on
this 2-core machine one trial runs at a time. Per trial, from MLflow: its wall time (the trial run's start to
end), its training (the sum of rank 0's `epoch_seconds`, evaluation included) and its stage start-up
(`stage_startup_seconds`). Overhead = wall - training: the trial's Ray Train run starting, the final
artifacts and the MLflow runs. The last line is `ratio: R`, the median over trials of overhead / wall
(the performance issue's goal: at most 0.2 for a 30-second trial).
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
    """Wall, training and start-up seconds of every trial of the sweep, from its MLflow runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    rows = []
    for trial in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sweep_run_id}'"):
        (stage,) = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")
        wall = (trial.info.end_time - trial.info.start_time) / 1000
        training = sum(epoch_seconds(cfg.mlflow.tracking_uri, stage.info.run_id))
        rows.append({"trial": trial.data.tags["oodlab.trial"], "wall": wall, "training": training,
                     "startup": stage.data.metrics["stage_startup_seconds"]})
    return sorted(rows, key=lambda r: r["trial"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial")
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
    fractions = [(r["wall"] - r["training"]) / r["wall"] for r in rows]
    print(markdown(["trial", "wall s", "training s (epochs)", "overhead s", "overhead / wall", "stage start-up s"],
                   [[r["trial"], f"{r['wall']:.1f}", f"{r['training']:.1f}", f"{r['wall'] - r['training']:.1f}",
                     f"{f:.2f}", f"{r['startup']:.1f}"] for r, f in zip(rows, fractions)]))
    print(f"sweep wall time {sweep_wall:.0f} s for {len(rows)} trials; median trial {statistics.median(r['wall'] for r in rows):.1f} s, "
          f"median overhead {statistics.median(r['wall'] - r['training'] for r in rows):.1f} s")
    print(f"ratio: {statistics.median(fractions):.2f}")


if __name__ == "__main__":
    main()
