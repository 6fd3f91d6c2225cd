"""The plain torch DataLoader fallback: the FFCV loader's contract over any ImageSource (no .beton needed).

Same outputs, same sample order and sharding (the traversal orders of FFCV 1.0.2 reproduced: torch's
DistributedSampler when distributed, `default_rng(seed + epoch).permutation` for random order), same
crop geometry and normalisation table. Eval output equals the FFCV loader's exactly for raw-written
images already at the ID resolution; other images differ only by the decoder (PIL vs libjpeg-turbo)
and resize implementation (OpenCV INTER_AREA in both, possibly different builds). Augmentations draw
from a generator seeded by (seed, epoch, sample), so worker processes never share random streams.
`spec.threads` worker processes decode in parallel (threads=1: decode in the calling process).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from oodlab.datapipes.benchmarks import Benchmark
from oodlab.datapipes.loaders import PAD, RRC_RATIO, RRC_SCALE, LoaderSpec, normalize_table
from oodlab.datapipes.sources import ImageSource


def center_crop_box(height: int, width: int, ratio: float) -> tuple[int, int, int, int]:
    """(top, left, h, w) of FFCV's center crop: a square of int(ratio * shorter side)."""
    side = int(ratio * min(height, width))
    return (height - side) // 2, (width - side) // 2, side, side


def random_crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop (torchvision / FFCV recipe: 10 tries, then a center fallback)."""
    area, log_ratio = height * width, np.log(RRC_RATIO)
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        aspect = np.exp(rng.uniform(*log_ratio))
        w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(RRC_RATIO):
        w, h = width, int(round(width / min(RRC_RATIO)))
    elif in_ratio > max(RRC_RATIO):
        w, h = int(round(height * max(RRC_RATIO))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    top, left, h, w = box
    crop = image[top : top + h, left : left + w]
    if crop.shape[:2] == (size, size):
        return np.ascontiguousarray(crop)
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def translate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shift by up to PAD pixels each way, filling with zeros (FFCV's RandomTranslate)."""
    h, w = image.shape[:2]
    padded = np.zeros((h + 2 * PAD, w + 2 * PAD, 3), dtype=image.dtype)
    padded[PAD : PAD + h, PAD : PAD + w] = image
    y, x = rng.integers(0, 2 * PAD + 1, size=2)
    return padded[y : y + h, x : x + w]


class SampleTransform:
    """HxWx3 uint8 -> normalised float32 CHW tensor, with the train or eval pipeline of `bench`."""

    def __init__(self, bench: Benchmark, augment: bool, seed: int):
        self.bench, self.augment, self.seed = bench, augment, seed
        self.table = normalize_table(bench)

    def __call__(self, image: np.ndarray, index: int, epoch: int) -> torch.Tensor:
        size = self.bench.image_size
        h, w = image.shape[:2]
        augment = self.bench.augment if self.augment else "none"
        if augment == "none":
            image = crop_resize(image, center_crop_box(h, w, self.bench.eval_crop_ratio), size)
        else:
            rng = np.random.default_rng([self.seed, epoch, index])
            rrc = augment == "random-resized-crop"
            image = crop_resize(image, random_crop_box(h, w, rng) if rrc else center_crop_box(h, w, 1.0), size)
            if rng.random() < 0.5:
                image = image[:, ::-1]
            if augment == "pad-crop":
                image = translate(image, rng)
        normalised = self.table[image, np.arange(3)]  # (H, W, 3) float32
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


class TransformedSource(torch.utils.data.Dataset):
    def __init__(self, source: ImageSource, transform: SampleTransform):
        self.source, self.transform = source, transform
        self.epoch = 0  # set before each epoch; worker processes are started per epoch and copy it

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.source[index]
        return self.transform(image, index, self.epoch), label


class TorchLoader:
    """torch DataLoader over an ImageSource with the FFCV loader's interface (see oodlab.datapipes.loaders)."""

    def __init__(self, bench: Benchmark, spec: LoaderSpec, source: ImageSource):
        self.spec, self.source = spec, source
        self.batch_size = spec.batch_size
        self.indices = np.arange(len(source)) if spec.indices is None else np.asarray(spec.indices)
        self.dataset = TransformedSource(source, SampleTransform(bench, spec.augment, spec.seed))
        self.next_epoch = 0
        if spec.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                raise ValueError("distributed=True needs an initialised torch.distributed process group (Ray Train)")
            shuffle = spec.order != "sequential"
            self.sampler = DistributedSampler(self.indices, shuffle=shuffle, seed=spec.seed, drop_last=False)

    def order(self, epoch: int) -> np.ndarray:
        """Sample ids this worker reads in `epoch`, before dropping a last partial batch."""
        if self.spec.distributed:
            self.sampler.set_epoch(epoch)
            return self.indices[np.array(list(self.sampler), dtype=np.int64)]
        if self.spec.order == "sequential":
            return self.indices
        return np.random.default_rng(self.spec.seed + epoch).permutation(self.indices)

    def __len__(self) -> int:
        n = len(self.order(0))
        return n // self.batch_size if self.spec.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
        self.dataset.epoch = epoch
        order = self.order(epoch)[: len(self) * self.batch_size]
        cuda = self.spec.device.type == "cuda"
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=order.tolist(),
                            num_workers=self.spec.threads if self.spec.threads > 1 else 0, pin_memory=cuda)
        memory = torch.channels_last if self.spec.channels_last else torch.contiguous_format
        for images, labels in loader:
            images = images.contiguous(memory_format=memory)
            yield images.to(self.spec.device, non_blocking=cuda), labels.long().to(self.spec.device, non_blocking=cuda)
