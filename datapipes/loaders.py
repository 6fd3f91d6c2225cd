"""FFCV loaders for a benchmark's splits: a train pipeline and an eval pipeline, CPU or GPU.

On CPU, NormalizeImage runs in numba before ToTensor (after it, FFCV 1.0.2's Loader spins forever;
see the platform notes). On GPU, uint8 images travel to the device and are normalised there, as in
the ffcv-imagenet recipe. With `distributed=True` each Ray Train worker reads its own shard: rank r
gets samples r, r + world, ... (FFCV emulates DistributedSampler, padding the last round).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice, ToTensor, ToTorchImage

from oodlab.datapipes.benchmarks import Benchmark


ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM, "sequential": OrderOption.SEQUENTIAL}


@dataclass(frozen=True)
class LoaderSpec:
    """How to read one split; `batch_size` is per worker.

    Training: augment=True, order random, drop_last=True. Evaluation (the default): center crop,
    sequential, every sample once (plus DistributedSampler's padding of the last round).
    """

    path: Path
    batch_size: int
    augment: bool = False
    order: str = "sequential"  # random | quasi_random | sequential
    drop_last: bool = False
    distributed: bool = False
    threads: int = 1
    os_cache: bool = True
    device: torch.device = torch.device("cpu")
    channels_last: bool = False
    seed: int = 0
    indices: tuple[int, ...] | None = None  # read only these samples

    @classmethod
    def for_training(cls, path: Path, batch_size: int, order: str = "random", **kw) -> LoaderSpec:
        return cls(path, batch_size, augment=True, order=order, drop_last=True, **kw)


def build_loader(bench: Benchmark, spec: LoaderSpec) -> Loader:
    """An FFCV Loader yielding (images float32 NCHW normalised, labels int64) on `spec.device`."""
    if not spec.path.is_file():
        raise FileNotFoundError(f"{spec.path}: no such .beton; see `oodlab data write`")
    return Loader(
        str(spec.path),
        batch_size=spec.batch_size,
        num_workers=spec.threads,
        order=ORDERS[spec.order],
        os_cache=spec.os_cache,
        drop_last=spec.drop_last,
        distributed=spec.distributed,
        seed=spec.seed,
        indices=None if spec.indices is None else list(spec.indices),
        pipelines={"image": image_pipeline(bench, spec), "label": label_pipeline(spec)},
        batches_ahead=2,
    )


def image_pipeline(bench: Benchmark, spec: LoaderSpec) -> list:
    size = bench.image_size
    if not spec.augment:
        decode = [CenterCropRGBImageDecoder((size, size), ratio=bench.eval_crop_ratio)]
    elif bench.train_crop == "rrc":
        decode = [RandomResizedCropRGBImageDecoder((size, size)), RandomHorizontalFlip()]
    else:
        decode = [SimpleRGBImageDecoder(), RandomHorizontalFlip(), RandomTranslate(padding=4)]
    mean, std = np.array(bench.mean) * 255, np.array(bench.std) * 255
    if spec.device.type == "cuda":
        return [*decode, ToTensor(), ToDevice(spec.device, non_blocking=True),
                ToTorchImage(channels_last=spec.channels_last), NormalizeImage(mean, std, np.float32)]
    return [*decode, NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage(channels_last=spec.channels_last)]


def label_pipeline(spec: LoaderSpec) -> list:
    ops = [IntDecoder(), ToTensor(), Squeeze()]
    return [*ops, ToDevice(spec.device, non_blocking=True)] if spec.device.type == "cuda" else ops
