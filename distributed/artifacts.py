"""What rank 0 attaches to a stage's MLflow run after its final evaluation."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from oodlab.datapipes.benchmarks import Benchmark
from oodlab.distributed.evaluate import VAL, Evaluation
from oodlab.distributed.tracking import RunLogger
from oodlab.plots import epoch_curve_figure, histogram_figure, roc_figure
from oodlab.report import metrics_csv, metrics_markdown


def log_final_artifacts(log: RunLogger | None, ev: Evaluation | None, bench: Benchmark, select: str,
                        epoch: int | None) -> None:
    """Metrics table (CSV + markdown), ROC curves and score histograms per score, cached scores (npz),
    and for training runs the per-epoch OOD curve with the best-OOD (validation) and final epochs marked."""
    if log is None or ev is None:
        return
    columns = [*bench.ood_test, *bench.groups, "all", VAL]
    log.text(metrics_csv(ev.metrics, ev.id_acc), "metrics.csv")
    log.text(metrics_markdown(ev.metrics, ev.id_acc, columns), "metrics.md")
    for score, per_split in ev.scores.items():
        log.figure(roc_figure(score, ev.roc_curves(score, list(bench.ood_test))), f"roc_{score}.png")
        log.figure(histogram_figure(score, per_split["id_test"], {s: per_split[s] for s in bench.ood_test}),
                   f"hist_{score}.png")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scores.npz"
        np.savez_compressed(path, **{f"{score}/{split}": v for score, d in ev.scores.items() for split, v in d.items()})
        log.artifact(path)
    if epoch is not None:
        log_epoch_curve(log, select)


def log_epoch_curve(log: RunLogger, select: str) -> dict[str, int]:
    """Plot fpr95 (validation and test) and ID accuracy per epoch; mark the best-OOD epoch on validation."""
    keys = {f"{select} fpr95 (OOD val)": f"ood/{select}/{VAL}/fpr95", f"{select} fpr95 (test, all)": f"ood/{select}/all/fpr95",
            "id_acc": "id_acc"}
    history = {label: [(m.step + 1, m.value) for m in sorted(log.client.get_metric_history(log.run_id, key), key=lambda m: m.step)]
               for label, key in keys.items()}
    val = history[f"{select} fpr95 (OOD val)"]
    if not val:
        return {}
    marks = {"best OOD (val)": min(val, key=lambda p: p[1])[0], "final": val[-1][0]}
    log.metrics({"best_ood_epoch": marks["best OOD (val)"]}, step=val[-1][0] - 1)
    log.figure(epoch_curve_figure(history, marks), "epoch_curve.png")
    return marks
