"""FFCV loaders and the torch fallback: same samples, correct augmentations, exact sharding under Ray Train.

FFCV JIT-compiles every pipeline (1-7 s here): loaders are built once per module and reused.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from oodlab.datapipes import beton
from oodlab.datapipes.benchmarks import Benchmark, get_benchmark
from oodlab.datapipes.loaders import LoaderSpec, build_loader, cpu_budget, normalize_table
from oodlab.datapipes.sources import ArraySource
from oodlab.datapipes.torch_loader import TorchLoader

N = 37  # odd, not a multiple of the batch size: partial last batches and sharding padding
BATCH = 8
DEMO = get_benchmark("digits")  # 32x32, CIFAR mean/std, pad-crop training
IMAGENET = get_benchmark("imagenet1k")
RRC = replace(IMAGENET, spec=IMAGENET.spec.model_copy(update={"image_size": 16}))  # ImageNet's pipelines, small


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """The same 32x32 random images with labels = sample index, as a raw .beton and as an .npz source."""
    folder = tmp_path_factory.mktemp("loaders")
    images = np.random.default_rng(1).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    np.savez(folder / "set.npz", images=images, labels=np.arange(N))
    path = beton.write(ArraySource(images, np.arange(N)), folder / "set.beton", progress=False)
    return path, folder / "set.npz", images


def batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


def normalised(images: np.ndarray, bench: Benchmark) -> torch.Tensor:
    """NHWC uint8 -> NCHW float32 through the loaders' lookup table."""
    return torch.from_numpy(normalize_table(bench)[images, np.arange(3)]).permute(0, 3, 1, 2)


def test_fallback_gives_the_same_samples_as_ffcv_in_sequential_order(cifar_like):
    path, npz, images = cifar_like
    for indices in (None, (30, 2, 11, 5, 36)):
        ffcv = build_loader(DEMO, LoaderSpec(path, BATCH, indices=indices))
        fallback = build_loader(DEMO, LoaderSpec(npz, BATCH, indices=indices, threads=2))
        assert isinstance(fallback, TorchLoader) and not isinstance(ffcv, TorchLoader)
        x, y = batches(ffcv)
        x2, y2 = batches(fallback)
        assert len(ffcv) == len(fallback) and list(ffcv.indices) == list(fallback.indices)
        assert x.dtype == x2.dtype == torch.float32 and y.dtype == y2.dtype == torch.int64
        expected = np.arange(N) if indices is None else np.array(indices)
        assert y.tolist() == y2.tolist() == expected.tolist()
        assert torch.equal(x, x2)  # raw-written images: bit-identical
        assert torch.equal(x, normalised(images[expected], DEMO))


def test_eval_center_crop_and_resize_match_between_loaders(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (5, 40, 60, 3), dtype=np.uint8)
    source = ArraySource(images, np.arange(5))
    path = beton.write(source, tmp_path / "r.beton", progress=False)
    x, _ = batches(build_loader(RRC, LoaderSpec(path, 2)))
    x2, _ = batches(TorchLoader(RRC, LoaderSpec(path, 2), source))
    assert x.shape == (5, 3, 16, 16) and torch.equal(x, x2)  # crop 35x35 of the centre, INTER_AREA to 16x16


def shifted_flipped(image: np.ndarray) -> list[np.ndarray]:
    """Every pad-4 translation of the image and of its mirror, zero-filled (what pad-crop + flip can give)."""
    out = []
    for candidate in (image, image[:, ::-1]):
        padded = np.pad(candidate, ((4, 4), (4, 4), (0, 0)))
        out += [padded[dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
    return out


def assert_pad_crops(x: torch.Tensor, y: torch.Tensor, images: np.ndarray) -> None:
    for got, label in zip(x, y.tolist()):
        options = normalised(np.stack(shifted_flipped(images[label])), DEMO)
        assert any(torch.equal(got, o) for o in options), f"sample {label} is no flip + shift of its image"


def test_training_pad_crop_flip_order_and_channels_last(cifar_like):
    path, npz, images = cifar_like
    spec = LoaderSpec.for_training(path, BATCH, channels_last=True, seed=3)
    ffcv, fallback = build_loader(DEMO, spec), build_loader(DEMO, LoaderSpec.for_training(npz, BATCH, seed=3))
    assert len(ffcv) == len(fallback) == N // BATCH  # drop_last
    orders = []
    for _ in range(2):
        (x, y), (x2, y2) = batches(ffcv), batches(fallback)
        assert x.is_contiguous(memory_format=torch.channels_last) and x.shape == (32, 3, 32, 32)
        assert y.tolist() == y2.tolist() and len(set(y.tolist())) == 32  # same permutation, no repeats
        assert_pad_crops(x, y, images)
        assert_pad_crops(x2, y2, images)
        assert not torch.equal(x, normalised(images[y.numpy()], DEMO))  # some sample was moved or mirrored
        orders.append(y.tolist())
    assert orders[0] != orders[1]  # a new permutation every epoch
    assert orders[0] == np.random.default_rng(3).permutation(N)[:32].tolist()


def test_augmentations_are_a_function_of_seed_epoch_and_sample(cifar_like):
    """Flips and shifts replay exactly: a loader set to epoch 2 gives what a fresh one gives on its third
    epoch, whatever the thread count (a resumed run augments as the interrupted one would have)."""
    path = cifar_like[0]

    def epochs(count: int, first: int = 0, threads: int = 1, seed: int = 3) -> list[torch.Tensor]:
        loader = build_loader(DEMO, LoaderSpec.for_training(path, BATCH, seed=seed, threads=threads))
        loader.next_epoch = first
        return [batches(loader)[0] for _ in range(count)]

    three = epochs(3)
    assert torch.equal(epochs(1, first=2)[0], three[2])
    assert all(torch.equal(a, b) for a, b in zip(epochs(3, threads=2), three))
    assert not torch.equal(three[0], three[1]) and not torch.equal(epochs(1, seed=4)[0], three[0])


def test_random_resized_crop_training(tmp_path):
    colours = np.arange(6) * 40
    images = np.broadcast_to(colours[:, None, None, None], (6, 30, 50, 3)).astype(np.uint8)
    source = ArraySource(images, np.arange(6))
    path = beton.write(source, tmp_path / "c.beton", progress=False)
    spec = LoaderSpec.for_training(path, 3)
    for loader in (build_loader(RRC, spec), TorchLoader(RRC, spec, source)):
        x, y = batches(loader)
        assert x.shape == (6, 3, 16, 16)
        for got, label in zip(x, y.tolist()):  # any crop of a flat image, resized, is that flat image
            assert torch.equal(got, normalised(images[label, :16, :16][None], RRC)[0])


def test_loader_spec_checks_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="order"):
        LoaderSpec(tmp_path / "a.beton", 8, order="shuffled")
    with pytest.raises(ValueError, match="quasi_random"):
        LoaderSpec(tmp_path / "a.beton", 8, order="quasi_random", distributed=True)
    with pytest.raises(FileNotFoundError, match="oodlab data"):
        build_loader(DEMO, LoaderSpec(tmp_path / "a.beton", 8))
    assert cpu_budget(1) == 1 and 1 <= cpu_budget(1000) <= len(os.sched_getaffinity(0))


# ---------------------------------------------------------------- 2 Ray Train workers

WORLD, SHARD_N = 2, 101  # 101 samples: shards of 51, DistributedSampler pads one sample
TRAIN_EPOCHS = 2


def observe_shards(config: dict) -> None:
    """Ray Train worker: read every loader distributed, write what this rank saw to <out>/<rank>.json."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    path, table = Path(config["beton"]), normalize_table(DEMO)
    evaluation = build_loader(DEMO, LoaderSpec(path, BATCH, distributed=True, threads=4))
    x, y = batches(evaluation)
    seen = {
        "eval": y.tolist(),
        "eval_pixels_match": bool(torch.equal(x[:, 0, 0, 0], torch.from_numpy(table[y.numpy(), 0]))),
        "budget": cpu_budget(4), "loader_threads": evaluation.num_workers, "numba_threads": numba.get_num_threads(),
        "fallback_eval": batches(build_loader(DEMO, LoaderSpec(config["npz"], BATCH, distributed=True)))[1].tolist(),
    }
    train = build_loader(DEMO, LoaderSpec.for_training(path, BATCH, distributed=True, threads=4, seed=5))
    seen["train_batches"], seen["train"] = len(train), []
    for _ in range(TRAIN_EPOCHS):
        x, y = batches(train)
        seen["train"].append(y.tolist())
        seen["train_pixels_match"] = bool(torch.equal(x[:, 0, 16, 16], torch.from_numpy(table[y.numpy(), 0])))
    Path(config["out"], f"{rank}.json").write_text(json.dumps(seen))
    ray.train.report({"rank": rank})


@pytest.mark.timeout(300)
def test_distributed_loaders_cover_every_sample_once_across_two_ray_workers(ray_cluster, tmp_path):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    images = np.broadcast_to((np.arange(SHARD_N) % 256).astype(np.uint8)[:, None, None, None], (SHARD_N, 32, 32, 3))
    np.savez(tmp_path / "s.npz", images=images, labels=np.arange(SHARD_N))
    source = ArraySource(np.ascontiguousarray(images), np.arange(SHARD_N))
    path = beton.write(source, tmp_path / "s.beton", progress=False)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    TorchTrainer(
        observe_shards,
        train_loop_config={"beton": str(path), "npz": str(tmp_path / "s.npz"), "out": str(tmp_path)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=WORLD, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="shards", storage_path=str(tmp_path / "runs")),
    ).fit()
    seen = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(WORLD)]

    # Evaluation: rank r reads r, r + 2, ... and the padding; dropping it leaves every sample exactly once.
    padded = list(range(SHARD_N)) + list(range(-SHARD_N % WORLD))
    kept = []
    for rank, s in enumerate(seen):
        assert s["eval"] == padded[rank::WORLD] == s["fallback_eval"]
        assert s["eval_pixels_match"] and s["train_pixels_match"]
        kept += s["eval"][: len(range(rank, SHARD_N, WORLD))]
    assert sorted(kept) == list(range(SHARD_N))

    # Training: equal full batches on every rank (DDP steps together), DistributedSampler's shuffled shards
    # with drop_last: each rank drops the last 51 % 8 = 3 samples of its shard, different ones each epoch.
    per_rank = (SHARD_N + 1) // WORLD // BATCH
    for epoch in range(TRAIN_EPOCHS):
        union = []
        for rank, s in enumerate(seen):
            sampler = DistributedSampler(range(SHARD_N), num_replicas=WORLD, rank=rank, shuffle=True, seed=5)
            sampler.set_epoch(epoch)
            assert s["train_batches"] == per_rank and s["train"][epoch] == list(sampler)[: per_rank * BATCH]
            union += s["train"][epoch]
        assert len(union) - len(set(union)) <= -SHARD_N % WORLD  # only the padding may repeat
    assert seen[0]["train"][0] != seen[0]["train"][1]

    # Threads: Ray gave each worker 1 CPU, so FFCV's numba pool is capped at 1 although 4 were asked for;
    # the driver (Ray initialised, no assignment) keeps its own CPU count.
    assert all(s["budget"] == s["loader_threads"] == s["numba_threads"] == 1 for s in seen)
    assert cpu_budget(4) == min(4, len(os.sched_getaffinity(0)), numba.config.NUMBA_NUM_THREADS)
