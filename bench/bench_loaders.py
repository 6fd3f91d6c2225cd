"""Images/s of the FFCV loader vs torchvision ImageFolder + DataLoader on the same real JPEG photos.

Run (oodlab installed, e.g. `pip install -e .`): python bench/bench_loaders.py --images 2000 --workers 2 --rounds 3
Both loaders run the same training pipeline (random-resized crop, horizontal flip, normalise; output
float32 NCHW) with the same batch size and number of workers (FFCV: numba threads; torchvision:
DataLoader processes). Epochs alternate between the loaders so machine noise hits both; the
reported rate is the median epoch. Target: FFCV >= 3x torchvision at 224 px.
The photos are random crops of scikit-image's bundled pictures, resized to 256x256 and saved as
JPEG quality 90 (nothing downloads); the .beton stores them as JPEG quality 90 too.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
CLASSES = 10
SIDE = 256


def make_jpeg_folder(root: Path, count: int, seed: int = 0) -> Path:
    """`count` 256x256 JPEGs (random crops of real photos) in an ImageFolder tree of 10 class folders."""
    import skimage.data

    rng = np.random.default_rng(seed)
    pictures = [getattr(skimage.data, name)() for name in PHOTOS]
    for i in range(count):
        picture = pictures[i % len(pictures)]
        h, w = picture.shape[:2]
        side = int(rng.uniform(0.3, 0.9) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(picture[y : y + side, x : x + side]).resize((SIDE, SIDE), Image.BILINEAR)
        folder = root / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def epoch_rate(loader: Iterable) -> float:
    """Images per second over one full pass (the last batch is awaited before the clock stops)."""
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def ffcv_bench(size: int):
    from dataclasses import replace

    from oodlab.datapipes.benchmarks import get_benchmark

    imagenet = get_benchmark("imagenet1k")  # its pipelines (random-resized crop, flip) at `size`
    return replace(imagenet, spec=imagenet.spec.model_copy(update={"image_size": size}), num_classes=CLASSES)


def ffcv_loader(path: Path, size: int, batch: int, workers: int):
    from oodlab.datapipes.loaders import LoaderSpec, build_loader

    return build_loader(ffcv_bench(size), LoaderSpec.for_training(path, batch, threads=workers))


def fallback_loader(folder: Path, size: int, batch: int, workers: int):
    """oodlab's torch DataLoader fallback (PIL decode, FFCV's crop geometry) over the JPEG folder."""
    from oodlab.datapipes.loaders import LoaderSpec, build_loader

    return build_loader(ffcv_bench(size), LoaderSpec.for_training(folder, batch, threads=workers))


def torchvision_loader(folder: Path, size: int, batch: int, workers: int):
    from torchvision import datasets, transforms

    from oodlab.datapipes.benchmarks import get_benchmark

    imagenet = get_benchmark("imagenet1k")
    pipeline = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(imagenet.mean, imagenet.std)])
    dataset = datasets.ImageFolder(str(folder), transform=pipeline)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers)


def compare(loaders: dict[str, Callable[[], Iterable]], rounds: int) -> dict[str, list[float]]:
    """Images/s of every epoch per loader, after one warm-up epoch each (FFCV compiles its pipeline there)."""
    built = {name: make() for name, make in loaders.items()}
    for loader in built.values():
        epoch_rate(loader)
    rates: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(rounds):
        for name, loader in built.items():
            rates[name].append(epoch_rate(loader))
    return rates


def summary(rates: list[float]) -> str:
    return f"{statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    args = parser.parse_args()

    from oodlab.datapipes import beton
    from oodlab.datapipes.sources import ImageFolderSource

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpeg_folder(Path(tmp) / "jpegs", args.images)
        path = beton.write(ImageFolderSource(folder), Path(tmp) / "jpegs.beton",
                           beton.ImageOptions("jpg", jpeg_quality=90), workers=args.workers, progress=False)
        print(f"{args.images} JPEGs {SIDE}x{SIDE}, batch {args.batch}, {args.workers} workers, "
              f"median (min-max) of {args.rounds} epochs\n")
        print("| size | torchvision ImageFolder + DataLoader img/s | oodlab torch fallback img/s | FFCV img/s "
              "| FFCV / torchvision |\n|---|---|---|---|---|")
        for size in args.sizes:
            rates = compare({
                "torchvision": lambda: torchvision_loader(folder, size, args.batch, args.workers),
                "fallback": lambda: fallback_loader(folder, size, args.batch, args.workers),
                "ffcv": lambda: ffcv_loader(path, size, args.batch, args.workers),
            }, args.rounds)
            ratio = statistics.median(rates["ffcv"]) / statistics.median(rates["torchvision"])
            cells = " | ".join(summary(rates[name]) for name in ("torchvision", "fallback", "ffcv"))
            print(f"| {size} | {cells} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
