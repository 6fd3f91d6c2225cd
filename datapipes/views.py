"""Views of an ImageSource: a subset of its samples, its images resized to a square or padded, a held-out split,
several sources one after another."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from oodlab.datapipes.sources import ImageSource


class SubsetSource(ImageSource):
    """The samples `indices` of `inner`, in that order."""

    def __init__(self, inner: ImageSource, indices: np.ndarray, name: str):
        self.inner, self.indices = inner, np.asarray(indices, dtype=np.int64)
        super().__init__(name, inner.classes, inner.labels[self.indices], inner.skipped)

    def load(self, index: int) -> np.ndarray:
        return self.inner.load(int(self.indices[index]))


class SquareSource(ImageSource):
    """`inner`'s images resized so the shorter side is `size` (bilinear, antialiased), center-cropped to size x size.

    This is the OpenOOD/torchvision `Resize(size) + CenterCrop(size)` that brings OOD sets to the ID
    resolution; images already size x size pass through untouched (CIFAR, SVHN stay exact).
    """

    def __init__(self, inner: ImageSource, size: int):
        self.inner, self.size = inner, size
        super().__init__(inner.name, inner.classes, inner.labels, inner.skipped)

    def load(self, index: int) -> np.ndarray:
        return square(self.inner.load(index), self.size)


def square(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def held_out_split(labels: np.ndarray, fraction: float, cap_per_class: int,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) index arrays: per class min(cap, ceil(fraction * count)) samples go to val.

    Deterministic for a given seed and label array; both index arrays are sorted.
    """
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = min(cap_per_class, math.ceil(fraction * len(members)))
        val.append(rng.permutation(members)[:take])
    val_idx = np.sort(np.concatenate(val)) if val else np.array([], dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


class GraySource(ImageSource):
    """`inner`'s images as grayscale (ITU-R 601 luma, PIL's "L"), repeated over 3 channels."""

    def __init__(self, inner: ImageSource):
        self.inner = inner
        super().__init__(inner.name, inner.classes, inner.labels, inner.skipped)

    def load(self, index: int) -> np.ndarray:
        luma = np.asarray(Image.fromarray(self.inner.load(index)).convert("L"))
        return np.ascontiguousarray(np.repeat(luma[:, :, None], 3, axis=2))


def keep_labels(source: ImageSource, labels: list[int]) -> ImageSource:
    """The samples whose label is in `labels`, relabelled 0..len(labels)-1 in that order (classes follow)."""
    mapping = {old: new for new, old in enumerate(labels)}
    indices = np.flatnonzero(np.isin(source.labels, labels))
    subset = SubsetSource(source, indices, source.name)
    subset.labels = np.array([mapping[int(v)] for v in subset.labels], dtype=np.int64)
    subset.classes = [source.classes[old] if old < len(source.classes) else str(old) for old in labels]
    return subset


def first_of_shuffle(source: ImageSource, limit: int, seed: int = 0) -> ImageSource:
    """A deterministic subset of `limit` samples: the first of a seeded permutation, kept in file order."""
    if limit >= len(source):
        return source
    indices = np.sort(np.random.default_rng(seed).permutation(len(source))[:limit])
    return SubsetSource(source, indices, source.name)


class PadSource(ImageSource):
    """`inner`'s images with a black border of `fraction` x their longer side on each side (an object brought to
    the middle of a dark frame, as MNIST's 20 px digits sit in 28 px)."""

    def __init__(self, inner: ImageSource, fraction: float):
        self.inner, self.fraction = inner, fraction
        super().__init__(inner.name, inner.classes, inner.labels, inner.skipped)

    def load(self, index: int) -> np.ndarray:
        image = self.inner.load(index)
        border = round(self.fraction * max(image.shape[:2]))
        return np.pad(image, ((border, border), (border, border), (0, 0)))


class ConcatSource(ImageSource):
    """The samples of `parts`, one source after another (unlabeled: for OOD sets drawn from several sources)."""

    def __init__(self, parts: list[ImageSource], name: str):
        self.parts = parts
        self.offsets = np.cumsum([0, *(len(p) for p in parts)])
        super().__init__(name, [], np.full(int(self.offsets[-1]), -1), [s for p in parts for s in p.skipped])

    def load(self, index: int) -> np.ndarray:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part].load(index - int(self.offsets[part]))
