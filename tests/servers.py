"""Helpers for tests that start real servers on 127.0.0.1: free ports, readiness, a local Ray cluster, the CLI."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil

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

    def kill(self) -> None:
        """SIGKILL every process of the cluster, head included, as when the head's machine is lost."""
        helper = psutil.Process(self.helper.pid)
        for process in [helper, *helper.children(recursive=True)]:  # Ray's processes, job drivers included
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.helper.wait(timeout=60)

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


class ErrorProxy(http.server.ThreadingHTTPServer):
    """An HTTP proxy on 127.0.0.1 in front of `upstream` that answers server errors for a while.

    `fail(phases, spare)` arms it: each phase is (status, requests): answer `status` to every request (to /health
    too, unless the phase's status is 500: an application error behind a healthy front) until `requests` of them
    were answered so, then the next phase; after the last, pass everything on again. Requests for which
    `spare(method, path, body)` is true always pass. `answered` counts (status, method, path) of what it refused.
    """

    daemon_threads = True

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream).netloc
        self.phases: list[list[int]] = []
        self.spare: Callable[[str, str, bytes], bool] = lambda *_: False
        self.answered: Counter[tuple[int, str, str]] = Counter()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def fail(self, phases: list[tuple[int, int]], spare: Callable[[str, str, bytes], bool] = lambda *_: False) -> None:
        with self.lock:
            self.phases, self.spare = [list(p) for p in phases], spare

    def refusal(self, method: str, path: str, body: bytes) -> int | None:
        """The status to answer this request with, or None to pass it on."""
        with self.lock:
            if not self.phases or self.spare(method, path, body):
                return None
            status = self.phases[0][0]
            if status == 500 and path == "/health":
                return None
            self.answered[status, method, path] += 1
            self.phases[0][1] -= 1
            if self.phases[0][1] <= 0:
                self.phases.pop(0)
            return status


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: ErrorProxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def relay(self) -> None:
        body = self._body()
        status = self.server.refusal(self.command, self.path.split("?")[0], body)
        if status is not None:
            payload = json.dumps({"error_code": "INTERNAL_ERROR", "message": "injected by the test"}).encode()
            self._answer(status, {"Content-Type": "application/json"}, payload)
            return
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "transfer-encoding", "connection")}
        upstream.request(self.command, self.path, body=body, headers=headers | {"Content-Length": str(len(body))})
        response = upstream.getresponse()
        payload = response.read()
        upstream.close()
        skip = ("transfer-encoding", "connection", "content-length")
        self._answer(response.status, {k: v for k, v in response.getheaders() if k.lower() not in skip}, payload)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = relay
