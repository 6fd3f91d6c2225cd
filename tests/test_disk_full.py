"""The disk fills up: a .beton build and a training run whose storage is a small tmpfs that this test mounts.

Each write that hits ENOSPC stops with an error naming the path and the space left there; what was written whole
before stays intact and loadable, nothing half-written is left where a rerun would trust it, and once space is
freed the same command resumes: the build writes only the files it had not finished, the run resumes from its
last checkpoint and ends with the uninterrupted run's weights and metrics. Mounting needs root (CI runs as root).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_raw
from drills import after_first_checkpoint, assert_same_as_reference, recovery_seconds

from oodlab import config
from oodlab.cli import main
from oodlab.datapipes import beton
from oodlab.datapipes.benchmarks import get_benchmark
from oodlab.distributed import checkpoint


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "40m") mounted at `path` while the block runs."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root and runs this)")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all the free space of `disk` but `leave` bytes."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, free - leave)
    return filler


def half_written(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".partial-" in p.name]


def test_a_build_that_fills_the_disk_stops_naming_the_file_and_resumes_once_there_is_room(tmp_path, demo_root, capsys):
    """40 MiB hold two of the digits benchmark's eight 16 MiB .beton files: the third stops the build."""
    bench = get_benchmark("digits")
    with small_disk(tmp_path / "disk", "40m") as disk:
        assert main(["data", "build", "digits", "--out", str(disk)]) == 1
        err = capsys.readouterr().err
        third = bench.path(disk, bench.splits[2])
        assert f"oodlab: error: no space left on the device for the file {third}: " in err and " free of 40.0 MiB" in err
        assert "Traceback" not in err
        written = [s for s in bench.files if bench.path(disk, s).exists()]
        assert written == list(bench.splits[:2]) and not half_written(disk)
        stamps = {s: beton.read_manifest(bench.path(disk, s))["stamp"] for s in written}

        resize(disk, "160m")
        assert main(["data", "build", "digits", "--out", str(disk)]) == 0
        out = capsys.readouterr().out
        assert all(f"{s}: current" in out for s in written) and f"{len(bench.files) - 2} file(s) written" in out
        for split in bench.files:  # as the build that never ran out of space
            built, reference = beton.read_info(bench.path(disk, split)), beton.read_info(bench.path(demo_root, split))
            assert (built.count, built.label_counts, built.min_size, built.max_size) == \
                (reference.count, reference.label_counts, reference.min_size, reference.max_size)
            assert built.manifest["stamp"] == reference.manifest["stamp"]
        assert all(beton.read_manifest(bench.path(disk, s))["stamp"] == stamp for s, stamp in stamps.items())


def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one_and_nothing_else(tmp_path):
    with small_disk(tmp_path / "disk", "2m") as disk:
        cfg = config.validate({"name": "c", "ray": {"storage_path": str(disk)}}, tmp_path)
        weights = {"w": torch.arange(100_000, dtype=torch.float32)}  # 400 KB
        checkpoint.write(cfg, "train", 0, weights, {"epoch": 0, "metrics": {}}, {"model": weights})
        fill(disk, leave=256 * 1024)
        with pytest.raises(OSError, match=r"no space left on the device for checkpoint .*/c\.stages/train_epoch_0001: "
                                          r"2\d\d\.\d KiB free of 2\.0 MiB there") as err:
            checkpoint.write(cfg, "train", 1, weights, {"epoch": 1, "metrics": {}}, {"model": weights})
        assert err.value.errno == 28
        assert [p.name for p in checkpoint.newest_first(cfg, "train")] == ["train_epoch_0000"] and not half_written(disk)
        _, state, meta = checkpoint.newest_training_state(cfg, "train")
        assert meta["epoch"] == 0 and state["model"]["w"].equal(weights["w"])


def test_a_run_whose_disk_fills_stops_naming_the_checkpoint_and_a_rerun_resumes_exactly(tiny_run, demo_root, tmp_path,
                                                                                         capsys):
    """The run's storage fills up after its first checkpoint: epoch 2's checkpoint does not fit."""
    reference = tiny_run[1]
    with small_disk(tmp_path / "disk", "32m") as disk:
        raw = tiny_raw(tmp_path, demo_root)
        raw["ray"]["storage_path"] = str(disk / "runs")
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(raw))
        cfg = config.load(path)
        filled: list[Path] = []

        def fill_after_the_first_checkpoint() -> None:
            after_first_checkpoint(cfg)
            filled.append(fill(disk, leave=64 * 1024))

        filler = threading.Thread(target=fill_after_the_first_checkpoint, daemon=True)
        filler.start()
        assert main(["train", str(path), "--verbose"]) == 1
        filler.join()
        err = capsys.readouterr().err
        second = checkpoint.run_dir(cfg) / checkpoint.dir_name("train", 1)
        assert f"oodlab: error: stage train: no space left on the device for checkpoint {second}: " in err, err[-3000:]
        assert "free of 32.0 MiB there" in err
        assert [p.name for p in checkpoint.newest_first(cfg, "train")] == ["train_epoch_0000"]
        assert not half_written(disk) and checkpoint.newest_training_state(cfg, "train") is not None

        filled[0].unlink()
        freed_at = time.time()
        assert main(["train", str(path), "--verbose"]) == 0
        run_id = assert_same_as_reference(cfg, reference)
        print(f"\ndisk full: the rerun trained again {recovery_seconds(cfg, run_id, freed_at):.1f} s after space was "
              "freed")
