"""Figures for OOD evaluation: ROC curves, score histograms, per-epoch curves; atomic PNG saving.

Figures are built on matplotlib's object API with the Agg canvas (no pyplot, no global state);
every function returns a Figure titled with the run and the score it shows, and the caller saves it
with `save_figure` (or embeds `png_bytes`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from oodlab.atomic import atomic_path


def _new_figure(figsize: tuple[float, float] = (6.0, 4.5)) -> Figure:
    """A Figure bound to an Agg canvas, independent of pyplot's figure manager."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def roc_figure(run: str, score_name: str, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """ROC curves (fpr, tpr with ID positive, e.g. from `metrics.roc_points`) of one score, one per OOD set."""
    fig = _new_figure()
    ax = fig.add_subplot()
    for set_name, (fpr, tpr) in curves.items():
        auroc = float(np.trapezoid(tpr, fpr))
        ax.plot(fpr, tpr, label=f"{set_name} (AUROC {100 * auroc:.2f}%)")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="chance")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.005),
        xlabel="FPR: fraction of OOD accepted as ID",
        ylabel="TPR: fraction of ID accepted",
        title=f"{run}: ROC of {score_name} (ID positive)",
    )
    ax.legend(loc="lower right", fontsize="small")
    return fig


def histogram_figure(
    run: str, score_name: str, id_scores: np.ndarray, ood_scores: dict[str, np.ndarray], bins: int = 100
) -> Figure:
    """Overlaid density histograms of one score on shared bins: ID against each OOD set."""
    id_scores = np.asarray(id_scores)
    ood_scores = {name: np.asarray(s) for name, s in ood_scores.items()}
    edges = np.histogram_bin_edges(np.concatenate([id_scores, *ood_scores.values()]), bins=bins)
    fig = _new_figure()
    ax = fig.add_subplot()
    for name, scores in [("ID", id_scores), *ood_scores.items()]:
        ax.hist(scores, bins=edges, density=True, histtype="stepfilled", alpha=0.4, label=f"{name} (n={scores.size})")
    ax.set(xlabel=f"{score_name} (higher = more in-distribution)", ylabel="density", title=f"{run}: {score_name} scores")
    ax.legend(fontsize="small")
    return fig


def epoch_curve_figure(run: str, score_name: str, history: dict[str, list[tuple[int, float]]],
                       marks: dict[str, int]) -> Figure:
    """Per-epoch curves of (epoch, value) pairs of a run's OOD metrics for one score; keys containing "acc" go on
    a second y-axis.

    `marks` draws a labelled vertical line per named epoch, e.g. {"best OOD (val)": 3, "final": 9}.
    """
    fig = _new_figure((7.0, 5.0))
    ax = fig.add_subplot()
    acc_keys = [key for key in history if "acc" in key]
    ax_acc = ax.twinx() if acc_keys else None
    colors = iter(f"C{i}" for i in range(len(history) + len(marks)))
    for key, points in history.items():
        epochs, values = zip(*points) if points else ((), ())
        target = ax_acc if key in acc_keys else ax
        target.plot(epochs, values, marker=".", color=next(colors), label=key)
    for label, epoch in marks.items():
        ax.axvline(epoch, linestyle=":", color=next(colors), label=f"{label} (epoch {epoch})")
    ax.set(xlabel="epoch", ylabel="metric", title=f"{run}: {score_name} OOD metrics and ID accuracy per epoch")
    handles, labels = ax.get_legend_handles_labels()
    if ax_acc is not None:
        ax_acc.set_ylabel("accuracy")
        acc_handles, acc_labels = ax_acc.get_legend_handles_labels()
        handles, labels = handles + acc_handles, labels + acc_labels
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize="small")
    return fig


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write `fig` as PNG to `path` atomically (temp file in the same folder, then os.replace)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
