"""Write throughput (images/s) of `oodlab data write` on real JPEG photos, for the usual write settings.

Run (oodlab installed, e.g. `pip install -e .`): python bench/bench_write.py --images 2000
Each setting runs the real command (`oodlab.cli.main`, in this process) on a folder of 256x256 JPEGs
(random crops of scikit-image's photos, see bench_loaders.py); the rate counts the whole command:
listing the folder, decoding every JPEG with PIL, encoding, writing and renaming the file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

from bench_loaders import make_jpeg_folder

from oodlab.cli import main as oodlab

SETTINGS = {  # name: extra command-line options
    "jpg q90, 1 worker": ["--write-mode", "jpg", "--workers", "1"],
    "jpg q90, 2 workers": ["--write-mode", "jpg", "--workers", "2"],
    "raw, 2 workers": ["--write-mode", "raw", "--workers", "2"],
    "raw 32x32 (--square 32), 2 workers": ["--write-mode", "raw", "--square", "32", "--workers", "2"],
    "proportion 0.5, max-res 128, 2 workers": ["--write-mode", "proportion", "--max-resolution", "128",
                                                "--workers", "2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpeg_folder(Path(tmp) / "jpegs", args.images)
        print(f"{args.images} JPEGs 256x256 (PIL decode + FFCV encode)\n")
        print("| setting | seconds | images/s | file MiB |\n|---|---|---|---|")
        for name, options in SETTINGS.items():
            out = Path(tmp) / "out.beton"
            log = io.StringIO()  # the command's own report and progress bar
            start = time.perf_counter()
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                status = oodlab(["data", "write", str(folder), str(out), *options])
            seconds = time.perf_counter() - start
            if status != 0:
                raise SystemExit(f"oodlab data write failed for {name}:\n{log.getvalue()}")
            print(f"| {name} | {seconds:.1f} | {args.images / seconds:.0f} | {out.stat().st_size / 2**20:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
