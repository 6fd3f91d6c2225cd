"""Writing and inspecting .beton files: round trips for every reader, failures that never hang, damaged files."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
from ffcv.reader import Reader
from PIL import Image

from oodlab.datapipes import beton
from oodlab.datapipes.beton import BetonError, ImageOptions
from oodlab.datapipes.sources import ArraySource, ImageSource, open_source
from oodlab.datapipes.verify import verify
from oodlab.datapipes.writer import WriteError

RNG = np.random.default_rng(0)
CIFAR10_NAMES = [f"c{k}" for k in range(10)]


# ---------------------------------------------------------------- data on disk (also used by test_prepare)


def save_image(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def write_pickle(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(content, f)


def write_cifar10(folder: Path, per_batch: int = 4, test: int = 5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Official-format CIFAR-10 pickles under folder/cifar-10-batches-py; returns {split: (HWC images, labels)}."""
    data = folder / "cifar-10-batches-py"
    write_pickle(data / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES]})
    n = 5 * per_batch + test
    rows = RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = np.arange(n) % 10
    for b in range(5):
        part = slice(b * per_batch, (b + 1) * per_batch)
        write_pickle(data / f"data_batch_{b + 1}", {b"data": rows[part], b"labels": labels[part].tolist()})
    write_pickle(data / "test_batch", {b"data": rows[-test:], b"labels": labels[-test:].tolist()})
    hwc = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return {"train": (hwc[:-test], labels[:-test]), "test": (hwc[-test:], labels[-test:])}


def write_cifar100(folder: Path, train: int = 6, test: int = 3) -> None:
    data = folder / "cifar-100-python"
    write_pickle(data / "meta", {b"fine_label_names": [f"f{k}".encode() for k in range(100)],
                                 b"coarse_label_names": [f"s{k}".encode() for k in range(20)]})
    for split, n in (("train", train), ("test", test)):
        rows = RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        write_pickle(data / split, {b"data": rows, b"fine_labels": list(range(n)), b"coarse_labels": [0] * n})


def write_svhn(path: Path, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = RNG.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).reshape(-1, 1)
    scipy.io.savemat(path, {"X": x, "y": y})
    return x.transpose(3, 0, 1, 2), np.where(y.ravel() == 10, 0, y.ravel())


def stored_samples(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Every image as written in the file (raw bytes, or JPEG bytes decoded by OpenCV) and the labels."""
    reader = Reader(str(path))
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    data = np.fromfile(path, dtype=np.uint8)
    images = []
    for row in reader.metadata["f0"]:
        ptr = int(row["data_ptr"])
        raw = data[ptr : ptr + sizes[ptr]]
        if row["mode"] == 1:
            images.append(raw.reshape(int(row["height"]), int(row["width"]), 3))
        else:
            images.append(cv2.cvtColor(cv2.imdecode(raw, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
    return images, np.asarray(reader.metadata["f1"])


def assert_same_samples(path: Path, source: ImageSource) -> None:
    images, labels = stored_samples(path)
    assert len(images) == len(source) == beton.read_info(path).count
    for i, image in enumerate(images):
        expected, label = source[i]
        np.testing.assert_array_equal(image, expected)
        assert labels[i] == label


# ---------------------------------------------------------------- round trips


def test_every_reader_round_trips_raw_exactly(tmp_path):
    folder = tmp_path / "folder"
    for i in range(6):
        save_image(folder / f"class{i % 2}" / f"{i}.png", RNG.integers(0, 256, (5 + i, 7, 3), dtype=np.uint8))
    (tmp_path / "list.txt").write_text("".join(f"folder/class{i % 2}/{i}.png {i % 3}\n" for i in range(6)))
    write_cifar10(tmp_path / "cifar")
    write_svhn(tmp_path / "svhn" / "test_32x32.mat")
    np.savez(tmp_path / "arrays.npz", images=RNG.integers(0, 256, (4, 3, 9), dtype=np.uint8), labels=[1, 0, 1, 1])
    specs = {"folder": {}, "list.txt": {}, "cifar": {"split": "test"}, "svhn/test_32x32.mat": {}, "arrays.npz": {}}

    for rel, kw in specs.items():
        source = open_source(tmp_path / rel, **kw)
        path = beton.write(source, tmp_path / "out" / f"{Path(rel).stem}.beton", workers=2, progress=False)
        assert_same_samples(path, source)
        manifest = beton.read_manifest(path)
        assert manifest["count"] == len(source) and manifest["classes"] == source.classes
        assert manifest["skipped"] == [] and manifest["options"]["write_mode"] == "raw"


def test_jpeg_and_max_resolution_round_trip(tmp_path):
    y, x = np.mgrid[0:60, 0:80]
    smooth = np.stack([x * 3, y * 4, (x + y) * 1.5], -1).astype(np.uint8)
    source = ArraySource(np.stack([smooth, smooth[::-1]]), np.array([0, 1]))
    path = beton.write(source, tmp_path / "j.beton", ImageOptions("jpg", max_resolution=40, jpeg_quality=95),
                       progress=False)
    info = beton.read_info(path)
    assert info.jpeg_count == 2 and info.max_size == (30, 40)  # longest side 80 -> 40
    images, labels = stored_samples(path)
    expected = cv2.resize(smooth, (40, 30), interpolation=cv2.INTER_AREA)
    assert np.abs(images[0].astype(int) - expected).max() <= 8 and labels.tolist() == [0, 1]


def test_describe_shows_fields_sizes_histogram_and_manifest(tmp_path):
    source = ArraySource(np.zeros((3, 4, 4, 3), np.uint8), np.array([0, 2, 2]))
    path = beton.write(source, tmp_path / "d.beton", progress=False, stamp={"v": 1})
    text = beton.read_info(path).describe()
    assert "3 samples, fields image, label" in text and "3 raw, 0 jpg; sizes 4x4 .. 4x4" in text
    assert "       0        1 ####################\n" in text + "\n" and "       2        2 " + "#" * 40 in text
    assert "written from array" in text
    assert beton.is_current(path, {"v": 1}) and not beton.is_current(path, {"v": 2})


# ---------------------------------------------------------------- failures: fast, clear, nothing left behind


def unreadable_folder(root: Path) -> tuple[list[np.ndarray], list[Path]]:
    """A class folder tree with 2 unreadable files among 8 good PNGs; returns (good images in order, bad paths)."""
    good = []
    for i in range(8):
        image = RNG.integers(0, 256, (6, 6 + i, 3), dtype=np.uint8)
        save_image(root / "a" / f"{i}.png", image)
        good.append(image)
    bad = [root / "a" / "3b.png", root / "a" / "6b.png"]
    bad[0].write_bytes(b"<html>not an image</html>")
    truncated = (root / "a" / "0.png").read_bytes()
    bad[1].write_bytes(truncated[: len(truncated) // 2])
    return good, bad


@pytest.mark.timeout(60)
def test_unreadable_image_fails_fast_naming_it_and_leaves_nothing(tmp_path):
    _, bad = unreadable_folder(tmp_path / "imgs")
    source = open_source(tmp_path / "imgs")
    out = tmp_path / "out" / "x.beton"
    for workers in (1, 2):  # FFCV's own writer would wait forever here
        with pytest.raises(WriteError, match="cannot read image") as err:
            beton.write(source, out, workers=workers, progress=False)
        assert any(str(p) in str(err.value) for p in bad)
        assert os.listdir(out.parent) == []  # no beton, no manifest, no temp file


@pytest.mark.timeout(60)
def test_skip_bad_leaves_out_and_lists_unreadable_images(tmp_path):
    good, bad = unreadable_folder(tmp_path / "imgs")
    path = beton.write(open_source(tmp_path / "imgs"), tmp_path / "s.beton", workers=2, skip_bad=True, progress=False)
    images, labels = stored_samples(path)
    assert len(images) == 8 and labels.tolist() == [0] * 8
    for stored, expected in zip(images, good):  # the remaining samples, renumbered, in path order
        np.testing.assert_array_equal(stored, expected)
    skipped = beton.read_manifest(path)["skipped"]
    assert len(skipped) == 2 and all(any(str(p) in m for m in skipped) for p in bad)
    info = verify(path)  # the compacted file reads end to end through an FFCV Loader
    assert info.count == 8 and info.min_size == (6, 6) and info.max_size == (6, 13)
    assert "skipped 2 unreadable images" in info.describe()


class FailingSource(ImageSource):
    """Raises a non-image error at one index (a bug, not bad data): never skipped."""

    def __init__(self, n: int, fail_at: int, image_shape: tuple[int, int, int] = (4, 4, 3)):
        super().__init__("failing", [], np.full(n, -1))
        self.fail_at, self.shape = fail_at, image_shape

    def load(self, index: int) -> np.ndarray:
        if index == self.fail_at:
            raise RuntimeError("boom")
        return np.zeros(self.shape, np.uint8)


@pytest.mark.timeout(60)
def test_errors_that_are_not_bad_images_stop_the_write_even_with_skip_bad(tmp_path):
    with pytest.raises(WriteError, match=r"failing\[5\]: RuntimeError: boom"):
        beton.write(FailingSource(20, 5), tmp_path / "f.beton", workers=2, skip_bad=True, progress=False)
    big = FailingSource(2, -1, image_shape=(1800, 1800, 3))  # 9.7 MB raw: more than one 8 MiB FFCV page
    with pytest.raises(WriteError, match="max-resolution"):
        beton.write(big, tmp_path / "f.beton", progress=False)
    assert beton.write(big, tmp_path / "f.beton", ImageOptions(max_resolution=64), progress=False).is_file()
    assert not list(tmp_path.glob(".f.beton.partial*"))


SLOW_WRITE = textwrap.dedent("""
    import sys, time
    import numpy as np
    from oodlab.datapipes import beton
    from oodlab.datapipes.sources import ImageSource

    class Slow(ImageSource):
        def load(self, index):
            time.sleep(0.02)
            return np.full((8, 8, 3), index % 256, np.uint8)

    beton.write(Slow("slow", [], np.full(2000, -1)), sys.argv[1], workers=2, progress=False)
""")


@pytest.mark.timeout(60)
def test_killed_write_leaves_no_file_that_looks_complete(tmp_path):
    out = tmp_path / "k.beton"
    old = beton.write(ArraySource(np.zeros((2, 4, 4, 3), np.uint8)), out, progress=False)
    assert beton.read_manifest(old)["count"] == 2
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, str(out)], start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob(".k.beton.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the workers are writing pages now
    os.killpg(proc.pid, signal.SIGKILL)  # the writer and its worker processes, as on a crash
    proc.wait()
    partial = list(tmp_path.glob(".k.beton.partial-*"))
    assert len(partial) == 1  # SIGKILL gives no chance to clean up; the name says what it is
    with pytest.raises(BetonError, match="incomplete|truncated"):
        beton.read_info(partial[0])
    # The previous file is untouched, but no longer described by a manifest: callers see it is not current.
    assert beton.read_info(out).count == 2 and not beton.manifest_path(out).exists()
    assert not beton.is_current(out, {})


# ---------------------------------------------------------------- damaged files


@pytest.fixture(scope="module")
def jpeg_beton(tmp_path_factory) -> Path:
    y, x = np.mgrid[0:24, 0:24]
    images = np.stack([np.stack([x * 9 + k, y * 9, np.full_like(x, 7 * k)], -1) for k in range(30)]).astype(np.uint8)
    folder = tmp_path_factory.mktemp("jpeg")
    return beton.write(ArraySource(images, np.arange(30) % 3), folder / "j.beton", ImageOptions("jpg"), progress=False)


def test_truncated_or_foreign_files_give_a_clear_error(jpeg_beton, tmp_path):
    data = jpeg_beton.read_bytes()
    table_ptr = int(Reader(str(jpeg_beton)).header["alloc_table_ptr"])
    damaged = tmp_path / "t.beton"
    for cut in (len(data) - 1, table_ptr + 24, table_ptr, len(data) // 2, 30, 0):
        damaged.write_bytes(data[:cut])
        with pytest.raises(BetonError, match="truncated|corrupt|incomplete"):
            beton.read_info(damaged)
        with pytest.raises(BetonError):
            verify(damaged)
    damaged.write_text(json.dumps({"not": "a beton"}) * 20)
    with pytest.raises(BetonError, match="not an FFCV"):
        beton.read_info(damaged)
    with pytest.raises(BetonError, match="no such file"):
        beton.read_info(tmp_path / "missing.beton")


def test_verify_decodes_every_image_and_names_corrupt_ones(jpeg_beton, tmp_path):
    info = verify(jpeg_beton)
    assert info.count == 30 and info.jpeg_count == 30 and info.label_counts == {0: 10, 1: 10, 2: 10}
    reader = Reader(str(jpeg_beton))
    damaged = tmp_path / "c.beton"
    damaged.write_bytes(jpeg_beton.read_bytes())
    with open(damaged, "r+b") as f:
        for sample in (4, 17):  # overwrite the JPEG start-of-image marker and header
            f.seek(int(reader.metadata["f0"]["data_ptr"][sample]))
            f.write(b"\x00" * 16)
    beton.read_info(damaged)  # structurally intact ...
    with pytest.raises(BetonError, match=r"2 of 30 images are corrupt, e.g. samples 4 \(JPEG data does not decode"):
        verify(damaged)  # ... but two images do not decode


# ---------------------------------------------------------------- the commands


def test_data_write_and_inspect_commands(tmp_path, capsys):
    from oodlab.cli import main

    unreadable_folder(tmp_path / "imgs")
    out = tmp_path / "cli.beton"
    assert main(["data", "write", str(tmp_path / "imgs"), str(out), "--workers", "2"]) == 2
    assert "cannot read image" in capsys.readouterr().err and not out.exists()
    args = ["--skip-bad", "--write-mode", "jpg", "--jpeg-quality", "80", "--square", "16", "--ood"]
    assert main(["data", "write", str(tmp_path / "imgs"), str(out), *args]) == 0
    report = capsys.readouterr().out
    assert "wrote 8 images in" in report and "labels: all -1" in report and "skipped 2 unreadable" in report
    assert beton.read_manifest(out)["options"]["jpeg_quality"] == 80
    assert main(["data", "inspect", str(out), "--verify"]) == 0
    assert "8 samples" in (text := capsys.readouterr().out) and "sizes 16x16 .. 16x16" in text
    assert "verified: all 8 images decode" in text
    out.write_bytes(out.read_bytes()[:-100])
    assert main(["data", "inspect", str(out)]) == 2
    assert "truncated" in capsys.readouterr().err
