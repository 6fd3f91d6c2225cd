"""The demo benchmark, from real images that ship inside PyPI packages (nothing downloads).

ID: scikit-learn's handwritten digits (1797 8x8 scans, 10 classes), upsampled to 32x32 RGB.
Near-OOD: glyph-sized crops of scikit-image's printed text scans, inverted to the digits' white ink on
black. Far-OOD: crops of scikit-image's texture photos and of its natural photos. OOD validation:
crops of other scikit-image photos, sharing no source image with the test OOD sets.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from oodlab.datapipes import beton
from oodlab.datapipes.benchmarks import get_benchmark
from oodlab.datapipes.sources import ArraySource, ImageSource, to_rgb_uint8

SIZE = 32
RECIPE_VERSION = 1  # bump when anything below changes: cached demo betons are then rewritten

# Which scikit-image pictures feed which OOD set (disjoint by construction).
OOD_PICTURES: dict[str, tuple[str, ...]] = {
    "letters": ("text", "page"),
    "textures": ("brick", "grass", "gravel"),
    "photos": ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"),
    "ood_val": ("camera", "coins", "moon", "clock", "immunohistochemistry", "retina"),
}
OOD_COUNTS = {"letters": 300, "textures": 300, "photos": 300, "ood_val": 200}
# Crop side range as a fraction of the picture's short side; glyph-sized for the letters.
CROP_SCALE = {"letters": (0.12, 0.3), "textures": (0.06, 0.25), "photos": (0.06, 0.3), "ood_val": (0.06, 0.3)}


def ensure_demo_data(root: Path, seed: int = 0) -> list[Path]:
    """Write the demo benchmark's betons under `root` unless current ones exist; return those written."""
    bench = get_benchmark("demo")
    stamp = {"recipe": RECIPE_VERSION, "seed": seed}
    stale = [s for s in bench.splits if not beton.is_current(bench.path(root, s), stamp)]
    if not stale:
        return []
    digits = digits_splits(seed)
    sources: dict[str, Callable[[], ImageSource]] = {
        "id_train": lambda: digits["train"], "id_val": lambda: digits["val"], "id_test": lambda: digits["test"],
    }
    written = []
    for split in stale:
        source = sources[split]() if split in sources else ood_set(split, seed)
        written.append(beton.write(source, bench.path(root, split), stamp=stamp))
    return written


def digits_splits(seed: int = 0) -> dict[str, ArraySource]:
    """Stratified 60/10/30 train/val/test split of the digits, as 32x32 RGB uint8."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.stack([_resize((img * (255 / 16)).astype(np.uint8)) for img in digits.images])
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    train, rest = train_test_split(idx, train_size=0.6, stratify=labels, random_state=seed)
    val, test = train_test_split(rest, train_size=0.25, stratify=labels[rest], random_state=seed)
    classes = [str(d) for d in range(10)]
    return {
        split: ArraySource(images[part], labels[part], name=f"digits-{split}", classes=classes)
        for split, part in (("train", train), ("val", val), ("test", test))
    }


def ood_set(name: str, seed: int = 0) -> ArraySource:
    """Random square crops of the set's pictures, resized to 32x32 RGB, labels -1."""
    import skimage.data

    rng = np.random.default_rng([seed, RECIPE_VERSION, *name.encode()])
    pictures = [to_rgb_uint8(_as_uint8(getattr(skimage.data, p)())) for p in OOD_PICTURES[name]]
    transform: Callable[[np.ndarray], np.ndarray] = (lambda x: 255 - x) if name == "letters" else (lambda x: x)
    lo, hi = CROP_SCALE[name]
    crops = []
    for i in range(OOD_COUNTS[name]):
        picture = pictures[i % len(pictures)]
        h, w = picture.shape[:2]
        side = int(rng.uniform(lo, hi) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crops.append(_resize(transform(picture[y : y + side, x : x + side])))
    return ArraySource(np.stack(crops), None, name=f"demo-{name}")


def _as_uint8(picture: np.ndarray) -> np.ndarray:
    if picture.dtype == bool:
        return picture.astype(np.uint8) * 255
    return picture


def _resize(image: np.ndarray) -> np.ndarray:
    """Bilinear resize to SIZE x SIZE, always returning HxWx3 uint8."""
    pil = Image.fromarray(to_rgb_uint8(image))
    return np.asarray(pil.resize((SIZE, SIZE), Image.BILINEAR), dtype=np.uint8)
