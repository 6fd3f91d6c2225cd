"""oodlab.plots: each figure renders to a real PNG with the expected artists; save_figure is atomic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from oodlab.distributed.artifacts import best_ood_epoch
from oodlab.metrics import roc_points
from oodlab.plots import epoch_curve_figure, histogram_figure, roc_figure, save_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def assert_png_only(path: Path) -> None:
    """`path` is a non-trivial PNG and it is the only file in its folder (no temp file left behind)."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.fixture
def scores() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return rng.normal(1.0, 1.0, 400), {"svhn": rng.normal(0.0, 1.0, 300), "textures": rng.normal(-1.0, 1.0, 200)}


def test_roc_figure(tmp_path: Path, scores) -> None:
    id_scores, ood = scores
    fig = roc_figure("demo/baseline", "energy", {name: roc_points(id_scores, s) for name, s in ood.items()})
    (ax,) = fig.axes
    assert len(ax.lines) == len(ood) + 1  # one curve per OOD set plus the chance diagonal
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0].startswith("svhn (AUROC ") and legend[-1] == "chance"
    assert ax.get_title() == "demo/baseline: ROC of energy (ID positive)"
    assert_png_only(save_figure(fig, tmp_path / "roc_energy.png"))


def test_histogram_figure_uses_shared_bins(tmp_path: Path, scores) -> None:
    id_scores, ood = scores
    fig = histogram_figure("demo/um", "msp", id_scores, ood, bins=30)
    (ax,) = fig.axes
    assert ax.get_title() == "demo/um: msp scores"
    assert len(ax.patches) == 1 + len(ood)  # one filled step outline per distribution
    xs = [np.unique(p.get_xy()[:, 0]) for p in ax.patches]
    assert all(np.array_equal(x, xs[0]) and x.size == 31 for x in xs)
    assert_png_only(save_figure(fig, tmp_path / "hist_msp.png"))


def test_epoch_curve_figure_puts_accuracy_on_second_axis(tmp_path: Path) -> None:
    history = {
        "val fpr95": [(e, 0.6 - 0.02 * e) for e in range(10)],
        "test fpr95": [(e, 0.65 - 0.02 * e) for e in range(10)],
        "id_acc": [(e, 0.8 + 0.01 * e) for e in range(10)],
    }
    marks = {"best OOD (val)": 3, "final": 9}
    fig = epoch_curve_figure("demo/umap", "energy", history, marks)
    ax, ax_acc = fig.axes
    assert "demo/umap" in ax.get_title() and "energy" in ax.get_title()
    assert len(ax.lines) == 2 + len(marks) and len(ax_acc.lines) == 1
    assert ax_acc.get_ylabel() == "accuracy"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["val fpr95", "test fpr95", "best OOD (val) (epoch 3)", "final (epoch 9)", "id_acc"]
    assert_png_only(save_figure(fig, tmp_path / "curves.png"))


def test_epoch_curve_figure_without_accuracy_has_one_axis() -> None:
    fig = epoch_curve_figure("t/train", "msp", {"val fpr95": [(0, 0.5), (1, 0.4)]}, {})
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 1


def test_best_ood_epoch_only_among_epochs_that_kept_id_accuracy() -> None:
    """Epoch 2 rejects OOD data best because it knows nothing yet (10% accuracy): not eligible within 5 points."""
    val_fpr95 = [(1, 60.0), (2, 5.0), (3, 40.0), (4, 30.0), (5, 35.0)]
    id_val_acc = [(1, 80.0), (2, 10.0), (3, 88.0), (4, 86.0), (5, 90.0)]
    assert best_ood_epoch(val_fpr95, id_val_acc, max_acc_drop=5.0) == 4  # epochs 3-5 are within 5 points: 30 wins
    assert best_ood_epoch(val_fpr95, id_val_acc, max_acc_drop=1.0) == 5  # only the most accurate epoch is left
    assert best_ood_epoch(val_fpr95, id_val_acc, max_acc_drop=100.0) == 2  # no bound: plain argmin


def test_save_figure_replaces_and_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "fig.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    assert save_figure(fig, target) == target
    assert_png_only(target)

    class Broken(Figure):
        def savefig(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(Broken(), target)
    assert_png_only(target)  # old file intact, temp file removed


def test_plots_do_not_load_pyplot() -> None:
    """Figures must not register with pyplot's global figure manager (fresh interpreter to be sure)."""
    code = (
        "import sys, numpy as np; from oodlab.plots import histogram_figure;"
        "histogram_figure('r', 'x', np.arange(5.0), {'o': np.arange(3.0)}).savefig(__import__('io').BytesIO());"
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
