"""Hostile and broken input, each through a real `oodlab` process: exit 2, a message naming the file or key and the
fix, no traceback, well under 1 GiB of memory, and nothing written outside the places the command was given.

Each case's wall time and peak memory (the child's ru_maxrss: the interpreter and its imports included) is printed
as a table row (`pytest -s`); only the memory is asserted, time never is (a hang is caught by the timeout).
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

GiB = 1 << 30


@dataclass
class Case:
    name: str
    make: Callable[[Path], list[str]]  # writes the input under a folder; the command's arguments
    says: str  # in the message


def laughs(levels: int = 9) -> str:
    """A billion laughs: 9 levels of 10 aliases, 10^9 values once expanded."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def config(tmp: Path, text: str) -> list[str]:
    path = tmp / "cfg.yaml"
    path.write_text(text)
    return ["train", str(path)]


def benchmark(tmp: Path, doc: dict | str) -> list[str]:
    path = tmp / "bench.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return ["data", "build", str(path), "--out", str(tmp / "out")]


def data_write(tmp: Path, name: str, content: bytes, *extra: str) -> list[str]:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return ["data", "write", str(path if len(Path(name).parts) == 1 else tmp / Path(name).parts[0]),
            str(tmp / "out" / "x.beton"), *extra]


BENCH = {"name": "b", "image_size": 32, "id": {"train": "a", "test": "b"}, "ood": {"val": "c", "far": {"d": "e"}}}


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...]) -> bytes:
    header = repr({"descr": "|u1", "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


def npz_declaring(shape: tuple[int, ...]) -> bytes:
    """An .npz whose images.npy header declares `shape` but holds 16 bytes."""
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("images.npy", npy_header(shape) + bytes(16))
    return buffer.getvalue()


def npz_bomb(tmp: Path, gib: float = 0.5) -> list[str]:
    """A real zip bomb: 512 MiB of zeros behind a valid header, deflated to about half a MiB."""
    side = 4096
    count = int(gib * GiB) // (side * side * 3)
    path = tmp / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("images.npy", "w", force_zip64=True) as member:
            member.write(npy_header((count, side, side, 3)))
            zeros = bytes(side * side * 3)
            for _ in range(count):
                member.write(zeros)
    return ["data", "write", str(path), str(tmp / "out" / "x.beton")]


def idx_declaring(tmp: Path) -> list[str]:
    """An MNIST-style images.gz declaring 65535 x 65535 x 65535 bytes (280 TB), and its labels."""
    (tmp / "t-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + struct.pack(">I", 1) + b"\0"))
    header = b"\0\0\x08\x03" + struct.pack(">III", 65535, 65535, 65535)
    return data_write(tmp, "t-images-idx3-ubyte.gz", gzip.compress(header + bytes(64)))


def png_bomb(width: int, height: int) -> bytes:
    """A PNG declaring width x height RGB pixels, its first rows of zeros deflated (a decompression bomb's start)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(bytes((3 * width + 1) * 64), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def beton_declaring(tmp: Path, samples: int) -> list[str]:
    """A .beton whose header declares `samples` samples, with an empty allocation table."""
    from ffcv.types import CURRENT_VERSION, HeaderType

    header = np.zeros(1, dtype=HeaderType)
    header["version"], header["num_samples"] = CURRENT_VERSION, samples
    header["alloc_table_ptr"] = HeaderType.itemsize
    path = tmp / "big.beton"
    path.write_bytes(header.tobytes())
    return ["data", "inspect", str(path)]


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def cifar_pickle(tmp: Path) -> list[str]:
    folder = tmp / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]}))
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": RunsACommand(), b"labels": [0]}))
    return ["data", "write", str(folder), str(tmp / "out" / "x.beton")]


CASES = [
    Case("config: billion laughs", lambda t: config(t, laughs() + "name: x\n"), "cfg.yaml: more than 100,000 values"),
    Case("benchmark: billion laughs", lambda t: benchmark(t, laughs()), "bench.yaml: more than 100,000 values"),
    Case("config: recursive alias", lambda t: config(t, "stages: &s {train: {epochs: *s}}\n"),
         "alias *s (line 1) repeats a value that contains it"),
    Case("config: nested 200,000 deep", lambda t: config(t, "[" * 200_000 + "]" * 200_000),
         "cfg.yaml: nested more than 64 levels deep"),
    Case("config: 5,000-digit number", lambda t: config(t, f"seed: {'9' * 5000}\n"), "cfg.yaml: a value cannot be read"),
    Case("config: 8 MiB file", lambda t: config(t, "# padding\n" * 800_000), "longer than 1.0 MiB"),
    Case("config: batch_size 10^9", lambda t: config(t, "data: {batch_size: 1000000000}\n"),
         "data.batch_size: 1,000,000,000 is more than the 1,048,576 images per batch"),
    Case("config: knn_bank_size 10^12", lambda t: config(t, "eval: {knn_bank_size: 1000000000000}\n"),
         "eval.knn_bank_size: 1,000,000,000,000 is more than"),
    Case("config: epochs 10^15", lambda t: config(t, "stages: {train: {epochs: 1000000000000000}}\n"),
         "stages.train.epochs: 1,000,000,000,000,000 is more than the 100,000 epochs"),
    Case("config: stage name ../../x", lambda t: config(t, "stages: {'../../x': {epochs: 1}}\n"),
         "stages.../../x.[key]: String should match pattern"),
    Case("config: lr .inf", lambda t: config(t, "stages: {train: {lr: .inf}}\n"), "stages.train.lr: Input should be a finite number"),
    Case("benchmark: image_size 200000", lambda t: benchmark(t, BENCH | {"image_size": 200000}),
         "image_size: 200,000 is more than the 4,096 px oodlab accepts: one 200000x200000 RGB image takes 111.8 GiB"),
    Case("benchmark: 10^7 crops", lambda t: benchmark(t, BENCH | {"ood": {"val": {"crops": ["camera"], "count": 10**7},
                                                                         "far": {"d": "e"}}}),
         "ood.val.count: 10,000,000 crops of up to 154x154 px"),
    Case("benchmark: --workers 100000", lambda t: benchmark(t, BENCH) + ["--workers", "100000"],
         "argument --workers: 100000 is outside 1..256"),
    Case(".npz with an object array", lambda t: data_write(t, "obj.npz", npz_bytes({"images": np.array([1, "a"], object)})),
         "obj.npz: array 'images' holds Python objects"),
    Case(".npz declaring 1 TiB", lambda t: data_write(t, "big.npz", npz_declaring((1 << 20, 1024, 1024))),
         "big.npz: its arrays take 1.0 TiB in memory"),
    Case(".npz zip bomb (512 MiB of zeros)", npz_bomb, "looks like a decompression bomb"),
    Case(".npz that is not a zip", lambda t: data_write(t, "junk.npz", b"junk" * 100), "junk.npz: not an .npz"),
    Case("idx.gz declaring 280 TB", idx_declaring, "t-images-idx3-ubyte.gz: its arrays take"),
    Case("PNG of 12000x12000 pixels", lambda t: data_write(t, "imgs/bomb.png", png_bomb(12_000, 12_000), "--ood"),
         "bomb.png: its header says 12000x12000 pixels (412.0 MiB decoded as RGB)"),
    Case("PNG of 10^10 pixels", lambda t: data_write(t, "imgs/bomb.png", png_bomb(100_000, 100_000), "--ood"),
         "bomb.png: Image size (10000000000 pixels) exceeds limit"),
    Case("image list, not UTF-8", lambda t: data_write(t, "list.txt", b"\xff\xfe a.png 0\n"), "cannot read"),
    Case("CIFAR pickle that runs a command", cifar_pickle, "refusing to unpickle posix.system"),
    Case(".beton header declaring 2^40 samples", lambda t: beton_declaring(t, 1 << 40),
         "big.beton: corrupt (its header says 1,099,511,627,776 samples"),
    Case("SVHN .mat that is not one", lambda t: data_write(t, "x.mat", b"MATLAB 5.0" + bytes(200)), "x.mat is not a readable"),
]


# Runs the command given after the file name and writes that command's peak resident memory (KiB) into the file. A
# process forked from this test's (with torch and Ray imported: 1 GiB resident) would report that as its own peak
# (Linux carries ru_maxrss across exec), so the command is forked from this small one instead.
MEASURE = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
           "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)")


def run_cli(argv: list[str], cwd: Path, timeout_s: float = 120) -> tuple[int, str, float, int]:
    """`oodlab ARGV` in its own process: exit status, stdout and stderr, seconds, peak resident bytes."""
    env = {**os.environ, "OODLAB_LOCAL_DIR": str(cwd / "local")}
    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak"
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", MEASURE, str(peak), sys.executable, "-m", "oodlab.cli", *argv],
                             cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout_s)
        seconds = time.perf_counter() - start
        return run.returncode, run.stdout.decode(errors="replace"), seconds, int(peak.read_text()) * 1024


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_refused_quickly_in_little_memory(case: Case, tmp_path):
    inputs, cwd = tmp_path / "in", tmp_path / "cwd"
    inputs.mkdir()
    cwd.mkdir()
    argv = case.make(inputs)
    given = {p for p in inputs.rglob("*") if p.is_file()}
    status, text, seconds, peak = run_cli(argv, cwd)
    message = " ".join(line.strip() for line in text.splitlines() if line.strip())[:200]
    print(f"\n| {case.name} | {status} | {seconds:.1f} | {peak / 2**20:.0f} | {message} |")
    assert status == 2, text[-3000:]
    assert case.says in text and "Traceback" not in text, text[-3000:]
    assert peak < GiB
    assert not any(cwd.iterdir())  # nothing in the working directory (a pickle's `touch PWNED` would be there)
    assert {p for p in inputs.rglob("*") if p.is_file()} == given  # nor beside them (no out/x.beton, no out/b/*.beton)
