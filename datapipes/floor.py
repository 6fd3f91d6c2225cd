"""The pixel floor of an OOD set: how well simple statistics of its stored pixels, with no network, tell it from
the ID test set.

For each statistic of `STATISTICS` (one number per image), the AUROC of ID test against the set is taken in
whichever direction is higher, so 50 means the statistic cannot tell them apart and 100 that it separates them
completely; the floor is the best of them. It is a reference, not a filter: border brightness alone separates
Fashion-MNIST from MNIST almost perfectly. A network's AUROC far *below* the floor means the network fails on a
change of format that a one-line statistic sees (bright full-frame inputs get large logits from a ReLU network
trained on objects on black); a floor near 50 means the set differs from ID in meaning only.

`oodlab data build` writes `<root>/<name>/pixel_floor.json`: for every OOD set (test sets and the OOD
validation split) `{"group": ..., "images": N, "auroc": A, "statistic": S, "by_statistic": {...},
"built_from": ...}`, AUROC in percent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oodlab.atomic import write_text
from oodlab.datapipes.sources import ImageSource
from oodlab.datapipes.views import square
from oodlab.metrics import ood_metrics

VERSION = 1  # bump when the statistics change: floors built before are then computed again
SAMPLES = 5000  # images per set (evenly spaced) the statistics are taken over
NEAR_BLACK = 25  # pixel values at or below this (about 10% of 255) count as near-black
VAL_GROUP = "val"  # the group recorded for the OOD validation split


def _border(image: np.ndarray) -> np.ndarray:
    width = max(1, round(image.shape[0] / 14))  # 2 px of a 28 px image
    return np.concatenate([image[:width].ravel(), image[-width:].ravel(), image[width:-width, :width].ravel(),
                           image[width:-width, -width:].ravel()])


STATISTICS: dict[str, Callable[[np.ndarray], float]] = {  # image (H, W, 3) uint8 -> one number
    "mean brightness": lambda image: float(image.mean()),
    "border brightness": lambda image: float(_border(image).mean()),
    "near-black fraction": lambda image: float((image <= NEAR_BLACK).mean()),
    "pixel std": lambda image: float(image.std()),
}


def statistics(source: ImageSource, size: int, samples: int = SAMPLES) -> dict[str, np.ndarray]:
    """Every statistic of up to `samples` evenly spaced images of `source`, each brought to size x size first."""
    picks = np.unique(np.linspace(0, len(source) - 1, min(samples, len(source))).round().astype(int))
    images = (square(source.load(int(i)), size) for i in picks)
    values = np.array([[stat(image) for stat in STATISTICS.values()] for image in images])
    return {name: values[:, k] for k, name in enumerate(STATISTICS)}


def floor(id_stats: Mapping[str, np.ndarray], ood_stats: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The best direction-free AUROC (percent) over the statistics, which statistic gives it, and each one's."""
    by_stat = {}
    for name in STATISTICS:
        auroc = ood_metrics(id_stats[name], ood_stats[name])["auroc"]
        by_stat[name] = round(100 * max(auroc, 1 - auroc), 2)
    best = max(by_stat, key=by_stat.get)
    return {"auroc": by_stat[best], "statistic": best, "by_statistic": by_stat}


def stamp_hash(stamp: Any) -> str:
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]


def is_current(path: Path, stamps: Mapping[str, str]) -> bool:
    """Whether `path` records a floor for exactly the sets of `stamps` (set -> stamp hash), each built from it."""
    try:
        found = json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return {s: r.get("built_from") for s, r in found.items()} == dict(stamps)


def write(path: Path, id_test: ImageSource, sets: Mapping[str, tuple[str, ImageSource]], size: int,
          stamps: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Compute every set's floor against `id_test` (`sets`: name -> (group, source)) and write them atomically."""
    id_stats = statistics(id_test, size)
    floors = {name: {"group": group, "images": len(source), **floor(id_stats, statistics(source, size)),
                     "built_from": stamps[name]} for name, (group, source) in sets.items()}
    write_text(path, json.dumps(floors, indent=1))
    return floors


def read(path: Path) -> dict[str, dict[str, Any]]:
    """The floors a build wrote ({} when the file is missing, e.g. betons built before floors existed)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}


def columns(floors: Mapping[str, Mapping[str, Any]], groups: Mapping[str, list[str]], all_sets: list[str]) -> dict[str, float]:
    """Floors by table column: every set's, each group's and `all`'s as the equal-weight mean of their sets' floors
    (as the metrics are averaged), and `val` (the OOD validation split's); empty when no floors were built."""
    if not floors:
        return {}
    out = {name: f["auroc"] for name, f in floors.items() if f["group"] != VAL_GROUP}
    for name, members in {**groups, "all": all_sets}.items():
        if members and all(m in out for m in members):
            out[name] = float(np.mean([out[m] for m in members]))
    out.update({VAL_GROUP: f["auroc"] for f in floors.values() if f["group"] == VAL_GROUP})
    return out


def metrics(by_column: Mapping[str, float]) -> dict[str, float]:
    """The floors as MLflow metrics: `floor/<set|group|all|val>/auroc` (percent)."""
    return {f"floor/{name}/auroc": value for name, value in by_column.items()}
