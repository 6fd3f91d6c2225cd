"""Helpers for tests that start real servers on 127.0.0.1: free ports, readiness, a local Ray cluster, the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

CLUSTER_HELPER = Path(__file__).parent / "local_ray_cluster.py"
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray keeps 127.0.0.1 (see local_ray_cluster.py)


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
    """`oodlab ARGS` as its own process (this interpreter); `.stdout` is stdout and stderr interleaved, as a user sees."""
    return subprocess.run([sys.executable, "-m", "oodlab.cli", *args], cwd=cwd, env=dict(env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)


@dataclass
class RayCluster:
    address: str  # the GCS: ray.address for a driver
    dashboard: str | None  # the job server
    node_ids: list[str]
    helper: subprocess.Popen = field(repr=False)

    def remove_node(self) -> str:
        """Kill every process of the newest worker node (SIGKILL); its id."""
        return self._command("remove", "REMOVED")

    def add_node(self) -> str:
        """Start another worker node; its id."""
        return self._command("add", "ADDED")

    def _command(self, command: str, answer: str) -> str:
        self.helper.stdin.write(command + "\n")
        self.helper.stdin.flush()
        for line in self.helper.stdout:  # (skipping anything else a node may print)
            reply = line.split()
            if reply[:1] in ([answer], ["ERROR"]):
                assert reply[0] == answer, f"the cluster helper answered {line!r} to {command!r}"
                return reply[1]
        raise AssertionError(f"the cluster helper exited while answering {command!r}")


@contextlib.contextmanager
def local_ray_cluster(nodes: int = 1, cpus: int = 1, resources: dict | None = None, dashboard: bool = False,
                      token: str | None = None) -> Iterator[RayCluster]:
    """tests/local_ray_cluster.py in its own process group (token auth if `token`). Its environment has no MLflow
    settings: only a job's or a driver's runtime_env brings them to its workers."""
    tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port, dashboard_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")} | LOOPBACK_RAY
    env |= {"RAY_TMPDIR": str(tmp), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token} if token else {"RAY_AUTH_MODE": "disabled"}
    args = ["--nodes", str(nodes), "--cpus", str(cpus), "--resources", json.dumps(resources or {}), "--port", str(port)]
    with (tmp / "cluster.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, str(CLUSTER_HELPER), *args,
                                 *(["--dashboard-port", str(dashboard_port)] if dashboard else [])],
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
    try:
        ready = proc.stdout.readline().split()
        assert ready[:1] == ["READY"], f"the Ray cluster did not start:\n{(tmp / 'cluster.log').read_text()[-3000:]}"
        yield RayCluster(ready[1], f"http://127.0.0.1:{dashboard_port}" if dashboard else None, ready[2:], proc)
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
