"""Parity: `oodlab train` (2 Ray workers, FFCV, DDP) against a plain single-process PyTorch loop, on the same model,
data and recipe: the published LeNet-style CNN on Fashion-MNIST, MNIST as OOD.

    python bench/parity_fmnist.py [--seeds 0 1 2] [--results bench/RESULTS.md]

The recipe is configs/fmnist_lenet.yaml's baseline stage (epochs, learning rate, momentum, weight decay, batch size,
kNN bank size); the plain loop is bench/plain_fmnist.py, which imports nothing from oodlab and gets the recipe as
arguments. Each side runs as its own process, per seed, timed as a whole (interpreter, imports, data, training,
evaluation; for oodlab also Ray's start). Prints per seed and mean +- std the test accuracy and the MNIST AUROC of
msp, maxlogit, energy, mahalanobis and knn, the published line and MNIST's pixel floor beside them, writes the table
into RESULTS.md between the parity_fmnist markers, and ends with exactly

    parity: acc_diff X auroc_diff Y time_ratio Z

(oodlab minus plain, mean over seeds, in points: test accuracy and MSP AUROC; time_ratio: oodlab's wall time over
the plain loop's, summed over seeds). Goal: |acc_diff| <= 0.5, |auroc_diff| <= 3, time_ratio <= 1.1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from harness import write_section

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "fmnist_lenet.yaml"
SCORES = ["msp", "maxlogit", "energy", "mahalanobis", "knn"]
PUBLISHED = {"msp": "77.3 (FSSD README, LeNet-style CNN)",
             "mahalanobis": "99.6 in FSSD's README, tuned on MNIST itself (our protocol forbids it)"}


def recipe(config: Path) -> dict:
    """The baseline stage's recipe as the plain loop's arguments."""
    cfg = yaml.safe_load(config.read_text())
    stage = cfg["stages"]["baseline"]
    return {"epochs": stage["epochs"], "lr": stage["lr"], "momentum": stage.get("momentum", 0.9),
            "nesterov": int(stage.get("nesterov", True)), "weight-decay": stage.get("weight_decay", 1e-4),
            "batch-size": cfg["data"]["batch_size"], "bank-size": cfg["eval"]["knn_bank_size"]}


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_plain(seed: int, args: dict, out: Path) -> dict:
    file = out / f"plain-{seed}.json"
    flags = [f"--{k}={v}" for k, v in args.items()]
    seconds = timed([sys.executable, str(ROOT / "bench" / "plain_fmnist.py"), f"--seed={seed}", *flags, f"--json={file}"])
    result = json.loads(file.read_text())
    return {"id_acc": result["id_acc"], **{s: result[f"mnist_auroc/{s}"] for s in SCORES}, "seconds": seconds}


def run_oodlab(seed: int, out: Path) -> dict:
    name = f"parity-s{seed}"
    overrides = [f"seed={seed}", f"name={name}", f"ray.storage_path={out / 'runs'}",
                 f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}"]
    oodlab = Path(sys.executable).with_name("oodlab")
    seconds = timed([str(oodlab), "train", str(CONFIG), *overrides])
    state = json.loads((out / "runs" / name / "pipeline.json").read_text())
    metrics = state["stages"]["baseline"]["metrics"]
    return {"id_acc": metrics["id_acc"], **{s: metrics[f"ood/{s}/mnist/auroc"] for s in SCORES}, "seconds": seconds}


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.2f} +- {np.std(values):.2f}"


def table(plain: list[dict], ours: list[dict], seeds: list[int], floor: str) -> str:
    keys = ["id_acc", *SCORES, "seconds"]
    head = ["", "seed", "id_acc", *(f"MNIST AUROC {s}" for s in SCORES), "wall s"]
    rows = [[side, str(seed), *(f"{r[k]:.2f}" for k in keys)]
            for side, results in (("plain", plain), ("oodlab", ours)) for seed, r in zip(seeds, results)]
    rows += [[side, "mean +- std", *(mean_std([r[k] for r in results]) for k in keys)]
             for side, results in (("plain", plain), ("oodlab", ours))]
    rows.append(["oodlab - plain", "paired mean +- std", *(mean_std([o[k] - p[k] for o, p in zip(ours, plain)])
                                                          for k in keys)])
    rows.append(["published", "", "", *(PUBLISHED.get(s, "") for s in SCORES), ""])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + f"\n\nMNIST's pixel floor (no-network pixel statistics vs Fashion-MNIST test): {floor}."


def pixel_floor(data_root: Path) -> str:
    floors = json.loads((data_root / "fmnist" / "pixel_floor.json").read_text())
    return f"{floors['mnist']['auroc']:.1f} ({floors['mnist']['statistic']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = parser.parse_args()
    data_root = ROOT / yaml.safe_load(CONFIG.read_text())["data"]["root"]
    oodlab = Path(sys.executable).with_name("oodlab")
    subprocess.run([str(oodlab), "data", "build", "fmnist", "--out", str(data_root)], check=True,
                   stdout=subprocess.DEVNULL)
    plain, ours = [], []
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        for seed in args.seeds:  # back to back, so both sides see the same machine
            plain.append(run_plain(seed, recipe(CONFIG), Path(tmp)))
            ours.append(run_oodlab(seed, Path(tmp)))
            print(f"seed {seed}: plain {plain[-1]}\n        oodlab {ours[-1]}", flush=True)
    text = (f"## Parity: oodlab vs a plain PyTorch loop (`bench/parity_fmnist.py`)\n\n"
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, seeds {args.seeds}, load average "
            f"{os.getloadavg()[0]:.1f}; recipe: configs/fmnist_lenet.yaml's baseline ({recipe(CONFIG)}); plain: "
            "bench/plain_fmnist.py, one process, 2 threads; oodlab: `oodlab train`, 2 Ray workers x 1 CPU, FFCV, DDP "
            "(gloo). Percent; wall seconds of each whole process.\n\n" + table(plain, ours, args.seeds,
                                                                                  pixel_floor(data_root)))
    write_section(args.results, "parity_fmnist", text)
    print(text)
    acc = np.mean([o["id_acc"] - p["id_acc"] for o, p in zip(ours, plain)])
    auroc = np.mean([o["msp"] - p["msp"] for o, p in zip(ours, plain)])
    ratio = sum(o["seconds"] for o in ours) / sum(p["seconds"] for p in plain)
    print(f"parity: acc_diff {acc:.2f} auroc_diff {auroc:.2f} time_ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
