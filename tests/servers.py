"""Helpers for tests that start real servers on 127.0.0.1: free ports, waiting for readiness, the CLI as a process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, what: str, timeout_s: float = 180) -> None:
    """Return once `url` answers 200; fail if `process` exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        assert process.poll() is None, f"{what} exited with status {process.returncode}"
        assert time.monotonic() < deadline, f"{what} did not answer {url} within {timeout_s:.0f} s"
        time.sleep(1)


def stop(process: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM the process group started with start_new_session=True; SIGKILL what is left after `timeout_s`."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def oodlab(*args: str, cwd: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess:
    """`oodlab ARGS` as its own process (this interpreter), stdout and stderr captured."""
    return subprocess.run([sys.executable, "-m", "oodlab.cli", *args], cwd=cwd, env=dict(env), capture_output=True,
                          text=True, timeout=900)
