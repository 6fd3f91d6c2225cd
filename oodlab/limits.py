"""The largest sizes and counts oodlab accepts: far above any real use, low enough that a typo or a hostile file
is refused in moments instead of running the machine out of memory.

Each bound is checked before any work starts (pydantic validates configs and benchmark YAMLs; readers check file
headers before they decode), and its message gives the arithmetic: what the value asked for would take.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, Field

MAX_IMAGE_SIZE = 4096  # image_size, --square: ImageNet trains at 224-512 px
MAX_IMAGE_SIDE = 8192  # write.max_resolution, --max-resolution: the longest side stored
MAX_IMAGE_PIXELS = 8192 * 8192  # one image read from disk, from its header (decoded: 192 MiB as RGB)
MAX_BATCH = 1 << 20  # data.batch_size, data.eval_batch_size: published ImageNet batches stop near 2^16
MAX_WORKER_BATCH_BYTES = 64 << 30  # one worker's batch of float32 images at the benchmark's image_size
MAX_WORKERS = 4096  # ray.num_workers: one per GPU, 512 nodes of 8
MAX_THREADS = 256  # data.loader_threads, writer processes (--workers), --threads
MAX_CPUS = 1024  # ray.cpus_per_worker
MAX_EPOCHS = 100_000  # epochs, schedule_epochs, eval_every, warmup_epochs, keep_last
MAX_CLASSES = 1_000_000  # num_classes, topk, labels (ImageNet-21k has 21,841 classes)
MAX_KNN_BANK = 1 << 25  # eval.knn_bank_size: 33.5 million features
KNN_FEATURE_DIM = 2048  # a ResNet-50's pooled features: the example in knn_bank_size's message
MAX_SAMPLES = (1 << 31) - 1  # subset sizes (limit, cap_per_class) and FFCV's sample ids
MAX_CROPS_BYTES = 8 << 30  # crops held in memory while a benchmark builds
MAX_TRIALS = 100_000  # search.num_samples
MAX_FAILURES = 1000  # ray.max_failures
MAX_SEED = 2**62  # |seed|: torch takes 64-bit seeds, and each rank adds its rank
MAX_NAME = 100  # characters of a config, stage, benchmark or set name (they name folders and files)


def number(value: int | float) -> str:
    """A number with thousands separators; one too long to print (Python refuses 4300 digits) as its size."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"a number of {value.bit_length()} bits"
    return f"{value:,}"


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def image_bytes(side: int, channels: int = 3, itemsize: int = 1) -> int:
    return side * side * channels * itemsize


def batch_cost(batch: int, side: int = 224) -> str:
    return (f"a batch of {batch:,} float32 images at {side} px takes {human_bytes(batch * image_bytes(side, itemsize=4))} "
            f"({batch:,} x 3 x {side} x {side} x 4 bytes)")


def image_cost(side: int) -> str:
    return f"one {side}x{side} RGB image takes {human_bytes(image_bytes(side))} ({side} x {side} x 3 bytes)"


def bank_cost(count: int) -> str:
    return (f"{count:,} features of {KNN_FEATURE_DIM} floats (a ResNet-50's) take "
            f"{human_bytes(count * KNN_FEATURE_DIM * 4)} on every worker")


def at_most(limit: int, what: str, cost: Callable[[int], str] | None = None) -> AfterValidator:
    """A pydantic check: the number is at most `limit`, else a message with `cost(value)` (what it would take)."""

    def check(value: Any) -> Any:
        if value > limit:
            why = f": {cost(value)}" if cost and value < 2**64 else ""
            raise ValueError(f"{number(value)} is more than the {limit:,} {what} oodlab accepts{why}; is it a typo?")
        return value

    return AfterValidator(check)


def count(limit: int, what: str, cost: Callable[[int], str] | None = None, low: int = 1) -> Any:
    """An int type in low..limit (limit checked with `at_most`)."""
    return Annotated[int, Field(ge=low), at_most(limit, what, cost)]
