"""What a user sees in a terminal during a tiny `oodlab train`: product lines, not Ray's internals.

The command runs as its own process on a pseudo-terminal (so the epoch bar is a live bar, as in a shell),
with its own local Ray instance; Ray's output must land in the log file whose path it prints.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import yaml
from conftest import tiny_raw

MAX_LINES = 20  # one stage: the log file line, stage start, epoch bar, evaluation, the results table (its pixel
# floor row, a line per group of sets, a note)
RAY_INTERNALS = ("Reporting training result", "Started training worker group", "Controller actor state",
                 "TrainController", "RayTrainWorker", "Started a local Ray instance", "(pid=")


def run_on_terminal(args: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 900) -> tuple[int, str]:
    """Run `args` with stdout and stderr on a 120x40 pseudo-terminal; return its exit status and all it wrote."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                               start_new_session=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # until the command has exited and nothing more is coming
        if select.select([leader], [], [], 1.0)[0]:
            try:
                chunk = os.read(leader, 65536)
            except OSError as err:  # EIO: every writer closed its end
                if err.errno != errno.EIO:
                    raise
                chunk = b""
            if chunk:
                chunks.append(chunk)
                continue
        if process.poll() is not None:
            break
    os.close(leader)
    return process.wait(timeout=1), b"".join(chunks).decode(errors="replace")


def test_train_shows_product_lines_only(tmp_path, demo_root):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(tmp_path, demo_root)))
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rt", dir="/tmp"), "RAY_AUTH_MODE": "disabled"}
    status, out = run_on_terminal([sys.executable, "-m", "oodlab.cli", "train", str(path)], tmp_path, env)
    print(out)
    assert status == 0, out
    lines = out.replace("\r\n", "\n").split("\n")  # a terminal line ends with a newline; \r redraws the bar in place
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n{out}"
    assert not [word for word in RAY_INTERNALS if word in out], out
    assert re.search(r"\[train\] starting .*\n.*\[train\] 2/2 epochs .*loss [0-9.]+  id_acc [0-9.]+  energy val fpr95 ",
                     out), "the stage's epoch bar, ending at 2/2 with the latest loss, accuracy and FPR95"
    assert re.search(r"\[train\] done: id_acc [0-9.]+  energy auroc near ", out) and "| train |" in out

    log = Path(re.search(r"Ray's output goes to (\S+)", out).group(1))
    ray_output = (log if log.is_absolute() else tmp_path / log).read_text()
    assert "Started training worker group" in ray_output and "[train] epoch 2/2" in ray_output  # Ray's and the workers'
