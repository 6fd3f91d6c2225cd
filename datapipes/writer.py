"""FFCV's DatasetWriter, supervised: a bad image or a dead worker ends the write at once with a clear error.

FFCV 1.0.2's writer waits for a shared counter to reach the sample count. If a worker process raises
(an unreadable image), the counter never gets there and the write hangs forever. Here every sample is
read through `GuardedSource`, which never raises inside a worker: it puts the failure on a queue and
hands FFCV a tiny placeholder instead. The main loop watches that queue and the workers' exit codes.
On a failure it stops the workers and raises WriteError naming the image; with skip_bad an unreadable
image is counted instead, and `finalize` drops the skipped samples from the file (their metadata rows
and allocations; the remaining samples are renumbered), so the file holds only real images. A worker that
fills the disk says so on the same queue (no traceback) and the write stops with ENOSPC, which
`oodlab.atomic` turns into DiskFull naming the file.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import queue
import sys
import time
from typing import Any, NamedTuple

import numpy as np
from ffcv.memory_allocator import MemoryAllocator
from ffcv.types import ALLOC_TABLE_TYPE
from ffcv.writer import DatasetWriter
from tqdm import tqdm

from oodlab.datapipes.sources import OOD_LABEL, ImageSource, SourceError
from oodlab.errors import no_space

PLACEHOLDER = np.zeros((8, 8, 3), dtype=np.uint8)  # what FFCV encodes for a failed sample until it is dropped
_POLL_S = 0.05


class WriteError(ValueError):
    """A write stopped: an unreadable image (named), a worker that died, or nothing left to write."""


class Failure(NamedTuple):
    index: int  # sample index in the source (and in the file being written)
    message: str
    skippable: bool  # an unreadable image (SourceError); anything else is a bug or a limit: never skipped
    disk_full: bool = False  # a worker could not write its pages: the disk is full


def sample_origin(source: ImageSource, index: int) -> str:
    """The file behind sample `index` when the source (or a view's inner source) has paths, else 'name[index]'."""
    while True:
        if hasattr(source, "paths"):
            return str(source.paths[index])
        if hasattr(source, "indices") and hasattr(source, "inner"):
            index, source = int(source.indices[index]), source.inner
        elif hasattr(source, "inner"):
            source = source.inner
        else:
            return f"{source.name}[{index}]"


class GuardedSource:
    """`source[i]` that never raises: failures go to `failures` and a placeholder is returned instead.

    Also refuses (unskippable) an image too big for one FFCV page when it may be written raw, since
    FFCV's allocator would raise inside the worker.
    """

    def __init__(self, source: ImageSource, failures: Any, max_resolution: int | None, raw_limit: int | None):
        self.source, self.failures = source, failures
        self.max_resolution, self.raw_limit = max_resolution, raw_limit

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        try:
            image, label = self.source[index]
            self._check_size(image)
            return image, label
        except SourceError as err:
            self.failures.put(Failure(index, str(err), skippable=True))
        except Exception as err:  # noqa: BLE001 - reported to the main process, which raises it
            where = sample_origin(self.source, index)
            self.failures.put(Failure(index, f"{where}: {type(err).__name__}: {err}", skippable=False))
        return PLACEHOLDER, OOD_LABEL

    def _check_size(self, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        scale = min(1.0, self.max_resolution / max(h, w)) if self.max_resolution else 1.0
        raw_bytes = int(h * scale) * int(w * scale) * 3
        if self.raw_limit is not None and raw_bytes > self.raw_limit:
            raise ValueError(f"image is {h}x{w} ({raw_bytes} bytes raw), more than one FFCV page ({self.raw_limit} "
                             "bytes); pass max_resolution (--max-resolution, e.g. 512) or write_mode='jpg'")


class SupervisedWriter(DatasetWriter):
    """DatasetWriter that cannot hang: see the module docstring. `write(source)` returns the skipped failures."""

    def __init__(self, fname: str, fields: dict, num_workers: int, skip_bad: bool = False,
                 progress: bool = True, desc: str | None = None):
        super().__init__(fname, fields, num_workers=num_workers)
        self.skip_bad, self.progress, self.desc = skip_bad, progress, desc
        self.skipped: list[Failure] = []

    def write(self, source: ImageSource) -> list[Failure]:
        """Write `source` (samples in order; `fields` must be image, label); return the skipped failures."""
        self.failure_queue = mp.Queue()
        image = self.fields["image"]
        raw_limit = None if image.write_mode == "jpg" else self.page_size
        self.from_indexed_dataset(GuardedSource(source, self.failure_queue, image.max_resolution, raw_limit))
        return sorted(self.skipped)

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args) -> None:
        # Replaces FFCV's version: same setup and finalize, plus supervision and cleanup on any error.
        self.num_samples = num_samples
        self.prepare()
        todo, allocations_queue, done = mp.Queue(), mp.Queue(), mp.Value("Q", 0)
        for chunk in queue_content:
            todo.put(chunk)
        for _ in range(self.num_workers):
            todo.put(None)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        args = (todo, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations_queue,
                *extra_worker_args)
        workers = [mp.Process(target=_work, args=(work_fn, self.failure_queue, *args), daemon=True)
                   for _ in range(self.num_workers)]
        try:
            for w in workers:
                w.start()
            self._wait_until_done(workers, done)
            allocations = self._collect(workers, allocations_queue)
            self._drain_failures()
            self.finalize(allocations)
        finally:
            for w in workers:
                if w.is_alive():
                    w.terminate()
                w.join()
            self.metadata_sm.close()
            self.metadata_sm.unlink()

    def _wait_until_done(self, workers: list[mp.Process], done: Any) -> None:
        bar = tqdm(total=self.num_samples, desc=self.desc, unit="img", disable=not self.progress, smoothing=0.1)
        shown = 0
        try:
            while shown < self.num_samples:
                self._drain_failures()
                self._check_workers(workers)
                value = done.value
                if value > shown:
                    bar.update(value - shown)
                    shown = value
                if shown < self.num_samples:
                    time.sleep(_POLL_S)
        finally:
            bar.close()

    def _collect(self, workers: list[mp.Process], allocations_queue: Any) -> list[tuple[int, int, int]]:
        allocations: list[tuple[int, int, int]] = []
        for _ in workers:
            while True:
                try:
                    allocations.extend(allocations_queue.get(timeout=_POLL_S * 10))
                    break
                except queue.Empty:
                    self._drain_failures()
                    self._check_workers(workers)
        for w in workers:  # a worker exits once its queues are flushed
            while w.is_alive():
                self._drain_failures()
                w.join(_POLL_S)
        return allocations

    def _check_workers(self, workers: list[mp.Process]) -> None:
        dead = [w for w in workers if w.exitcode not in (None, 0)]
        if dead:
            self._drain_failures()  # a worker that said why (a full disk) put it on the queue before it exited
            raise WriteError(f"a writer worker died (exit code {dead[0].exitcode}); its traceback is printed above. "
                             "Common causes: out of memory (use fewer --workers) or a bug in a custom source")

    def _drain_failures(self) -> None:
        while True:
            try:
                failure: Failure = self.failure_queue.get_nowait()
            except queue.Empty:
                return
            if failure.disk_full:
                raise OSError(errno.ENOSPC, failure.message)
            if not (self.skip_bad and failure.skippable):
                raise WriteError(failure.message)
            self.skipped.append(failure)

    def finalize(self, allocations: list[tuple[int, int, int]]) -> None:
        """FFCV's finalize, writing only the samples that were not skipped."""
        keep = np.ones(self.num_samples, dtype=bool)
        keep[[f.index for f in self.skipped]] = False
        if not keep.any():
            raise WriteError(f"all {self.num_samples} images were unreadable, e.g. {self.skipped[0].message}")
        new_id = np.cumsum(keep) - 1
        table = np.array([tuple(a) for a in allocations], dtype=ALLOC_TABLE_TYPE)
        table = table[keep[table["sample_id"].astype(np.int64)]]
        table["sample_id"] = new_id[table["sample_id"].astype(np.int64)]
        metadata = np.frombuffer(self.metadata_sm.buf, dtype=self.metadata_type)[keep]
        with open(self.fname, "r+b") as fp:
            fp.seek(self.metadata_start)
            fp.write(metadata.tobytes())
            fp.seek(0, 2)
            self.header["alloc_table_ptr"] = fp.tell()
            fp.write(table.tobytes())
            self.header["num_samples"] = int(keep.sum())
            fp.seek(0)
            fp.write(self.header.tobytes())


def _work(work_fn: Any, failures: Any, *args: Any) -> None:
    """FFCV's worker job; a full disk goes to the failure queue instead of a traceback."""
    try:
        work_fn(*args)
    except OSError as err:
        if not no_space(err):
            raise
        failures.put(Failure(-1, str(err), skippable=False, disk_full=True))
        sys.exit(1)
