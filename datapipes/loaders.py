"""Loaders for a benchmark's splits: FFCV for .beton files, a plain torch DataLoader for anything else.

Both yield `(images, labels)`: images float32 NCHW (channels-last memory if asked), normalised with the
benchmark's mean/std; labels int64 (-1 for OOD sets); on `spec.device`. Both expose `indices` (every
sample id of the file before sharding), `len(loader)` (batches per epoch on this worker) and a fresh
epoch on every `iter()`.

Pipelines. Train (the benchmark's `augment`): random-resized crop + flip (ImageNet), pad-4 random crop +
flip (CIFAR), flip only, or none. Flips and pad-crops draw from (seed, epoch, sample) (`SeededFlipTranslate`,
like the fallback), so training is reproducible and resumes exactly; FFCV's random-resized crop draws
from numba's per-thread generators, which cannot be seeded or saved: ImageNet-style runs are not bit-exact.
Eval: center crop of `eval_crop_ratio` of the shorter side, resized to the ID resolution (ImageNet:
224/256, i.e. Resize 256 + CenterCrop 224; CIFAR: the whole 32x32 image). Normalisation is a numba
lookup table before ToTensor on every device: after ToTensor FFCV 1.0.2's Loader spins forever on CPU
(platform notes), and FFCV's GPU NormalizeImage needs cupy. It writes NCHW directly (`NormalizeCHW`),
or NHWC memory viewed as NCHW with channels_last. A GPU receives normalised float32.

Order and sharding. `order` is sequential, random (a permutation per epoch from `seed + epoch`) or
quasi_random (FFCV's page-friendly shuffle; not with distributed; the fallback treats it as random).
With `distributed=True` each Ray Train worker reads the shard torch's DistributedSampler gives its
rank: rank r gets positions r, r + world, ... of the (per-epoch shuffled) order, padded by repeating
the first samples so every rank has ceil(N / world).
Evaluation (drop_last=False) therefore sees every sample once plus that padding: a rank keeps its
first len(range(rank, N, world)) samples to drop it. Training (drop_last=True) gives every rank the
same number of full batches (so DDP ranks step together); per epoch each rank drops the last
ceil(N / world) % batch_size samples of its shard, different ones every epoch as the order reshuffles.

Threads. FFCV's `num_workers` is a thread count, not processes: at construction and on every iter()
FFCV 1.0.2 calls numba.set_num_threads(n) and torch.set_num_threads(n) (so the process's torch compute
threads follow it too). `spec.threads` is capped by `cpu_budget()`: the CPUs Ray assigned to this
worker when running inside Ray (fractional CPUs count as 1), else the process's CPU affinity, and
numba's pool size (NUMBA_NUM_THREADS); tests/test_loaders.py checks the cap inside Ray Train workers.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numba
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage

from oodlab.datapipes.benchmarks import Benchmark
from oodlab.datapipes.ops import NormalizeCHW, SeededFlipTranslate

if TYPE_CHECKING:
    from oodlab.datapipes.torch_loader import TorchLoader

ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM, "sequential": OrderOption.SEQUENTIAL}
PAD = 4  # pad-crop translation for CIFAR-style training
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


@dataclass(frozen=True)
class LoaderSpec:
    """How to read one split; `batch_size` is per worker (the global batch divided by the world size).

    `path`: a .beton (FFCV) or any source `open_source` reads (torch fallback; `ood=True` reads it as an
    unlabeled OOD set). Training: augment=True, order random, drop_last=True. Evaluation (the default):
    center crop, sequential, every sample once (plus DistributedSampler's padding of the last round).
    """

    path: Path
    batch_size: int
    augment: bool = False
    order: str = "sequential"  # random | quasi_random | sequential
    drop_last: bool = False
    distributed: bool = False
    threads: int = 1  # FFCV: numba threads (capped by cpu_budget()); fallback: DataLoader worker processes
    os_cache: bool = True  # FFCV: read through the OS page cache (mmap) instead of FFCV's own process cache
    device: torch.device = torch.device("cpu")
    channels_last: bool = False
    seed: int = 0
    indices: tuple[int, ...] | None = None  # read only these samples
    ood: bool = False  # torch fallback only: labels -1, flat image folders allowed

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "device", torch.device(self.device))
        if self.order not in ORDERS:
            raise ValueError(f"order: {self.order!r}; use one of {', '.join(ORDERS)}")
        if self.order == "quasi_random" and self.distributed:
            raise ValueError("order: quasi_random is not available with distributed=True (FFCV); use random")
        if self.batch_size < 1 or self.threads < 1:
            raise ValueError(f"batch_size ({self.batch_size}) and threads ({self.threads}) must be at least 1")

    @classmethod
    def for_training(cls, path: Path, batch_size: int, order: str = "random", **kw) -> LoaderSpec:
        return cls(path, batch_size, augment=True, order=order, drop_last=True, **kw)

    @property
    def is_beton(self) -> bool:
        return self.path.suffix == ".beton"


def build_loader(bench: Benchmark, spec: LoaderSpec) -> SeededLoader | TorchLoader:
    """FFCV Loader for a .beton, else the torch DataLoader fallback over `open_source(spec.path)`."""
    if not spec.is_beton:
        from oodlab.datapipes.sources import open_source
        from oodlab.datapipes.torch_loader import TorchLoader

        return TorchLoader(bench, spec, open_source(spec.path, ood=spec.ood))
    if not spec.path.is_file():
        raise FileNotFoundError(f"{spec.path}: no such .beton; see `oodlab data write` / `oodlab data benchmark`")
    pipeline = image_pipeline(bench, spec)
    return SeededLoader(
        [op for op in pipeline if isinstance(op, SeededFlipTranslate)],
        str(spec.path),
        batch_size=spec.batch_size,
        num_workers=cpu_budget(spec.threads),
        order=ORDERS[spec.order],
        os_cache=spec.os_cache,
        drop_last=spec.drop_last,
        distributed=spec.distributed,
        seed=spec.seed,
        indices=None if spec.indices is None else list(spec.indices),
        pipelines={"image": pipeline, "label": label_pipeline(spec)},
        batches_ahead=2,
    )


class SeededLoader(Loader):
    """FFCV's Loader that tells its seeded augmentations which epoch each iter() reads (FFCV counts epochs in
    `next_epoch`; a resumed run sets it)."""

    def __init__(self, augmentations: list[SeededFlipTranslate], *args, **kwargs):
        self.augmentations = augmentations
        super().__init__(*args, **kwargs)

    def __iter__(self):
        for op in self.augmentations:
            op.epoch[0] = self.next_epoch
        return super().__iter__()


def cpu_budget(requested: int) -> int:
    """`requested` threads, capped by this process's CPUs (Ray's assignment inside a Ray worker) and numba's pool."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ray = sys.modules.get("ray")  # only a process that imported Ray can be a Ray worker (a driver has no assignment)
    if ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        assigned = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if assigned:
            cpus = min(cpus, max(1, math.floor(assigned)))
    return max(1, min(requested, cpus, numba.config.NUMBA_NUM_THREADS))


def pixel_stats(bench: Benchmark) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std on the 0..255 pixel scale, float64 (what NormalizeImage and the fallback both use)."""
    if bench.mean is None or bench.std is None:
        raise ValueError(f"benchmark {bench.name}: no pixel mean/std; build its files first ({bench.build_command(Path('ROOT'))}) "
                         "and load it with get_benchmark(ref, root), or give mean and std in its YAML")
    return np.array(bench.mean) * 255, np.array(bench.std) * 255


def normalize_table(bench: Benchmark) -> np.ndarray:
    """(256, 3) float32 lookup table uint8 -> normalised value, computed exactly as FFCV's NormalizeImage."""
    mean, std = pixel_stats(bench)
    return ((np.arange(256)[:, None] - mean[None, :]) / std[None, :]).astype(np.float32)


def image_pipeline(bench: Benchmark, spec: LoaderSpec) -> list:
    size = (bench.image_size, bench.image_size)
    if not spec.augment or bench.augment == "none":
        decode = [CenterCropRGBImageDecoder(size, ratio=bench.eval_crop_ratio)]
    elif bench.augment == "random-resized-crop":
        decode = [RandomResizedCropRGBImageDecoder(size, scale=RRC_SCALE, ratio=RRC_RATIO),
                  SeededFlipTranslate(0, spec.seed)]
    else:  # flip, pad-crop: any stored size is first brought to the ID resolution (identity for 32x32 CIFAR)
        pad = PAD if bench.augment == "pad-crop" else 0
        decode = [CenterCropRGBImageDecoder(size, ratio=1.0), SeededFlipTranslate(pad, spec.seed)]
    if spec.channels_last:  # NHWC memory viewed as NCHW: no copy
        ops = [*decode, NormalizeImage(*pixel_stats(bench), np.float32), ToTensor(), ToTorchImage(channels_last=True)]
    else:
        ops = [*decode, NormalizeCHW(normalize_table(bench)), ToTensor()]
    return [*ops, ToDevice(spec.device, non_blocking=True)] if spec.device.type == "cuda" else ops


def label_pipeline(spec: LoaderSpec) -> list:
    ops = [IntDecoder(), ToTensor(), Squeeze(1)]  # (B, 1) -> (B,), also for a last batch of 1
    return [*ops, ToDevice(spec.device, non_blocking=True)] if spec.device.type == "cuda" else ops
