"""A cluster whose `python` cannot run oodlab: Ray started as a user who forgot to activate the environment would.

`.venv/bin/ray start --head --block` from a shell whose PATH has no `.venv/bin`, where `python` is the system's
(without torch, timm, ...). `oodlab submit --follow` must refuse before sending the job, exit 2, and name that
interpreter, what it lacks and the fix, with no traceback; a second submit reads the first one's check job.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import tiny_raw
from ray.job_submission import JobSubmissionClient
from servers import LOOPBACK_RAY, free_port, oodlab, wait_for_http

SYSTEM_PYTHON = Path("/usr/bin/python3")


def lacks_timm(python: Path) -> bool:
    return python.is_file() and subprocess.run([python, "-c", "import timm"], capture_output=True).returncode != 0


@pytest.fixture
def head_without_the_venv(tmp_path):
    """`ray start --head --block` with PATH = a folder whose `python` is the system's, then /usr/bin:/bin."""
    if not lacks_timm(SYSTEM_PYTHON):
        pytest.skip(f"needs a {SYSTEM_PYTHON} without oodlab's dependencies")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(SYSTEM_PYTHON)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RAY_ADDRESS", "PYTHONPATH")}
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    env |= LOOPBACK_RAY | {"PATH": f"{bin_dir}:/usr/bin:/bin", "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp}
    dashboard = free_port()
    ray = Path(sys.executable).parent / "ray"
    head = subprocess.Popen([str(ray), "start", "--head", "--block", "--port", str(free_port()), "--num-cpus", "1",
                             "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                             str(dashboard), "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", ray_tmp],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{dashboard}/api/version", head, "ray start --head")
        yield f"http://127.0.0.1:{dashboard}", bin_dir / "python"
    finally:  # SIGKILL to every process of the node: `ray start`'s own graceful stop takes half a minute
        for process in [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_submit_refuses_a_cluster_whose_python_lacks_oodlabs_dependencies(head_without_the_venv, demo_root, tmp_path):
    address, python = head_without_the_venv
    raw = tiny_raw(tmp_path, demo_root)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    for _ in range(2):  # the second reads the first's check job instead of running another
        run = oodlab("submit", str(path), "--address", address, "--follow", cwd=tmp_path, env=env)
        print(run.stdout)
        assert run.returncode == 2, run.stdout[-3000:]
        assert f"jobs on this cluster run `python`, which is {python}, and it lacks the packages torch, timm" in run.stdout
        assert "Start Ray from the environment where oodlab is installed" in run.stdout
        assert "infra/Dockerfile" in run.stdout and "Traceback" not in run.stdout and "submitted job" not in run.stdout
    jobs = JobSubmissionClient(address).list_jobs()
    assert len(jobs) == 1 and jobs[0].metadata == {"oodlab.check": "python"}  # the check, and nothing else was sent
    listed = oodlab("jobs", "list", "--address", address, cwd=tmp_path, env=env)
    assert listed.returncode == 0 and listed.stdout.strip() == "no jobs"
