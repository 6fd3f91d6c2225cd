"""bench/plain_fmnist.py, the independent reference of the parity bench: it shares no code with oodlab (it imports
none), yet holds out the same training images and builds a model of the same shapes as oodlab's `lenet`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np

from oodlab.datapipes.sources import IdxSource
from oodlab.datapipes.views import held_out_split
from oodlab.models import create_model

PLAIN = Path(__file__).resolve().parents[1] / "bench" / "plain_fmnist.py"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def test_the_plain_loop_imports_nothing_of_oodlab():
    tree = ast.parse(PLAIN.read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert imported and not [m for m in imported if m.split(".")[0] == "oodlab"]
    # and at run time: loading it (and building its model and split) brings no oodlab module in
    check = ("import runpy, sys; ns = runpy.run_path(sys.argv[1]); ns['LeNet'](); ns['held_out'](ns['np'].arange(20) % 2); "
             "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'oodlab'); assert not bad, bad")
    subprocess.run([sys.executable, "-c", check, str(PLAIN)], check=True, cwd="/")


def plain_module() -> dict:
    import runpy

    return runpy.run_path(str(PLAIN))


def test_same_model_shapes_and_same_training_images_as_oodlab():
    plain = plain_module()
    ours = [tuple(p.shape) for p in create_model("lenet", num_classes=10).parameters()]
    assert [tuple(p.shape) for p in plain["LeNet"]().parameters()] == ours
    labels = IdxSource(FMNIST / "train-images-idx3-ubyte.gz").labels
    train, _ = held_out_split(labels, 0.1, len(labels))  # what `oodlab data build fmnist` keeps as id_train
    assert np.array_equal(plain["held_out"](np.asarray(labels)), train) and len(train) == 54_000
