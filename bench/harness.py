"""Shared by bench_train.py and gpu_check.py: synthetic image benchmarks and timed one-stage Ray Train runs.

A synthetic benchmark is what a user's own data looks like to oodlab: JPEG files in class folders, a
benchmark YAML pointing at them, `oodlab.datapipes.build.build` writing the .beton files. Each class is
a fixed random 4x4 colour pattern, upscaled to the image side, plus pixel noise, so a network can learn
it. OOD sets: patterns of classes the model never saw (val) and pure noise (test).

Training speed of the project's own Ray Train loop is read from the `epoch_seconds` metric that rank 0
logs to MLflow for every epoch. With `eval_every` above the epoch count only the last epoch evaluates,
so every other epoch's `epoch_seconds` is training alone.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

PATTERN = 4  # side of the random colour grid that makes a class
NOISE = 24.0  # std of the per-pixel noise, 0..255 scale
OOD_SEED = 1_000_003  # class patterns of OOD images come from here on: classes no ID set has


def class_patterns(first: int, count: int) -> np.ndarray:
    """(count, PATTERN, PATTERN, 3) uint8: the colour grids of classes first .. first + count - 1."""
    return np.stack([np.random.default_rng(first + c).integers(0, 256, (PATTERN, PATTERN, 3), dtype=np.uint8)
                     for c in range(count)])


Job = tuple[Path, Any, tuple[int, ...]]  # file, class pattern (None: pure noise), noise seed


def _write_chunk(jobs: list[Job], side: int, quality: int) -> None:
    """One process's share of the JPEGs, each side x side."""
    for path, pattern, seed in jobs:
        rng = np.random.default_rng(seed)
        if pattern is None:
            base = rng.uniform(0, 255, (side, side, 3))
        else:
            base = np.asarray(Image.fromarray(pattern).resize((side, side), Image.BILINEAR), np.float64)
        pixels = np.clip(base + rng.normal(0, NOISE, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=quality)


def write_jpegs(jobs: list[Job], side: int, workers: int, quality: int = 90) -> None:
    """Write every JPEG, `workers` processes at a time."""
    for folder in {path.parent for path, _, _ in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    if workers <= 1:
        _write_chunk(jobs, side, quality)
        return
    size = math.ceil(len(jobs) / workers)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_chunk, [jobs[i:i + size] for i in range(0, len(jobs), size)],
                      [side] * workers, [quality] * workers))


def class_jobs(folder: Path, per_class: list[int], patterns: np.ndarray, split: int) -> list[Job]:
    """One ImageFolder tree: per_class[c] images of class c in folder/c<c>/, noise seeded by (split, c, i)."""
    digits = len(str(len(per_class) - 1))
    return [(folder / f"c{c:0{digits}d}" / f"{i}.jpg", patterns[c], (split, c, i))
            for c, count in enumerate(per_class) for i in range(count)]


def write_benchmark(folder: Path, name: str, *, classes: int, train: int, test_per_class: int, ood: int, side: int,
                    image_size: int, augment: str, write: dict[str, Any], workers: int = 1) -> Path:
    """Synthetic JPEGs under `folder` and the benchmark YAML describing them; returns the YAML's path.

    `train` images spread evenly over the classes; id_test gets `test_per_class` per class, half of which
    are held out as id_val; ood_val (unseen patterns) and the `noise` test set get `ood` images each.
    """
    patterns = class_patterns(0, classes)
    per_class = [train // classes + (c < train % classes) for c in range(classes)]
    jobs = class_jobs(folder / "train", per_class, patterns, split=1)
    jobs += class_jobs(folder / "test", [test_per_class] * classes, patterns, split=2)
    unseen = class_patterns(OOD_SEED, 16)
    jobs += [(folder / "ood_val" / f"{i}.jpg", unseen[i % len(unseen)], (3, i)) for i in range(ood)]
    jobs += [(folder / "noise" / f"{i}.jpg", None, (4, i)) for i in range(ood)]
    write_jpegs(jobs, side, workers)
    spec = {
        "name": name, "about": f"synthetic {side}px JPEGs, {classes} classes (bench/harness.py)",
        "image_size": image_size, "num_classes": classes, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
        "augment": augment, "eval_crop": 0.875 if augment == "random-resized-crop" else 1.0, "write": write,
        "id": {"train": "train", "test": "test", "val": {"fraction": 0.5, "of": "test"}},
        "ood": {"val": "ood_val", "far": {"noise": "noise"}},
    }
    path = folder / "benchmark.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def build_benchmark(yaml_path: Path, root: Path, workers: int = 1):
    """Every .beton of the benchmark under root/<name>/ (oodlab's own build); the loaded Benchmark."""
    from oodlab.datapipes.benchmarks import get_benchmark
    from oodlab.datapipes.build import build

    build(get_benchmark(str(yaml_path)), root, workers=workers, progress=False)
    return get_benchmark(str(yaml_path), root)


def images_per_epoch(count: int, global_batch: int, world: int) -> int:
    """Images one training epoch steps through: each rank's shard of ceil(count / world) in full batches."""
    per_rank = global_batch // world
    return math.ceil(count / world) // per_rank * per_rank * world


@contextmanager
def private_ray() -> Iterator[None]:
    """A Ray instance of this process alone (its own short temp dir), shut down and removed at the end."""
    import ray

    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_AUTH_MODE")}
    os.environ.update(RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled")
    try:
        yield
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(tmp, ignore_errors=True)


def epoch_seconds(tracking_uri: str, run_id: str) -> list[float]:
    """The `epoch_seconds` rank 0 logged for every epoch of one stage run, in epoch order."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, "epoch_seconds")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def steady_rate(images: int, seconds: list[float]) -> float:
    """Median images/s over the given epochs."""
    return statistics.median(images / s for s in seconds)


def write_section(path: Path, key: str, text: str) -> None:
    """Put `text` into the results file between `<!-- key:start -->` and `<!-- key:end -->` (appended if absent)."""
    import re

    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    current = path.read_text() if path.is_file() else ""
    block = f"{start}\n{text}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    path.write_text(pattern.sub(lambda _: block, current) if pattern.search(current) else f"{current}\n{block}\n")
