"""Before `oodlab submit` sends a job: can the cluster's `python` run oodlab at all?

A job's entrypoint (`python -m oodlab.cli ...`) runs in a shell on the head node with the PATH that Ray was started
with. Started from a shell where oodlab's environment was not activated (`.venv/bin/ray start --head`), `python` is
another interpreter, and the job would die with a raw `ModuleNotFoundError` from inside the cluster. So `check`
first runs a tiny job there, once per cluster (PROBE: it looks oodlab's dependencies up, importing none of them),
and refuses to submit, naming that interpreter, what it lacks and the fix. The check job is kept, not deleted: Ray's
job manager writes a job deleted before its supervisor actor has exited back into the list, as failed.
"""

from __future__ import annotations

import json
import secrets
import shlex
import sys
import time
from typing import Any

from oodlab.distributed import submit

REQUIRED = ("torch", "timm", "ray", "ffcv", "mlflow", "pydantic", "yaml", "numpy")  # what `oodlab train` imports
MIN_VERSION = (3, 10)  # pyproject's requires-python
MARKER = "oodlab-python-check"  # the check job's id prefix, and its output's
CHECK_KEY = "oodlab.check"  # in the check job's metadata
PROBE = (f"import importlib.util, json, sys; print({MARKER!r}, json.dumps({{'python': sys.executable, "
         f"'version': list(sys.version_info[:3]), 'missing': [m for m in {REQUIRED!r} "
         "if importlib.util.find_spec(m) is None]}))")
WAIT_S = 120.0  # a job that does nothing starts within seconds on a cluster that runs at all
NOT_READY = "No available agent to submit job"  # the job server's answer until the head's agent has started
FIX = (f"Start Ray from the environment where oodlab is installed (here that is {sys.prefix}): `source "
       f"{sys.prefix}/bin/activate` before `ray start`, so that the head's `python` is that environment's; or run "
       "the cluster on infra/Dockerfile's image")


class ClusterPythonError(ValueError):
    """The cluster's `python` cannot run oodlab; the message names it, what it lacks and the fix."""


def check(address: str) -> str:
    """The interpreter that jobs on the cluster at `address` run, once it is known to run oodlab: from the cluster's
    check job (PROBE), run now if the cluster has none that finished (one per cluster: it stays in the job list,
    named oodlab-python-check-..., where `oodlab jobs list` leaves it out). Raises ClusterPythonError if that
    `python` cannot run oodlab, JobServerError if the job server does not run the check."""
    done = [j for j in submit.list_jobs(address) if is_check(j) and j.status == submit.JobStatus.SUCCEEDED]
    job_id = done[-1].submission_id if done else run_probe(address)
    return judge(submit.logs(address, job_id))


def is_check(job: Any) -> bool:
    """Whether a job (Ray's JobDetails) is a check job of this module."""
    return (job.metadata or {}).get(CHECK_KEY) == "python"


def run_probe(address: str) -> str:
    """Submit PROBE and wait for it to finish; its job id."""
    jobs = submit.client(address)
    job_id = f"{MARKER}-{secrets.token_hex(3)}"
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            jobs.submit_job(entrypoint=f"python -c {shlex.quote(PROBE)}", submission_id=job_id,
                            metadata={CHECK_KEY: "python"})
            break
        except Exception as err:  # the job server's client raises what its HTTP calls raise
            if NOT_READY not in str(err) or time.monotonic() > deadline:
                raise submit.JobServerError(f"the job server at {address} refused a check job: {err}") from None
            time.sleep(1)  # a head node that has just started
    if not submit.wait(address, job_id, WAIT_S).is_terminal():
        raise submit.JobServerError(f"the cluster at {address} did not run a check job (it does nothing) within "
                                    f"{WAIT_S:.0f} s; is its head node overloaded?")
    return job_id


def judge(logs: str) -> str:
    """The interpreter the probe job ran on, from its logs; ClusterPythonError if it cannot run oodlab."""
    lines = [line.split(MARKER, 1)[1] for line in logs.splitlines() if line.startswith(MARKER)]
    if not lines:
        last = (logs.strip().splitlines() or ["(no output)"])[-1].strip()
        raise ClusterPythonError(f"the cluster's `python` could not run a check of oodlab's dependencies ({last}). {FIX}")
    found = json.loads(lines[-1])
    lacks = []
    if tuple(found["version"][:2]) < MIN_VERSION:
        lacks.append(f"Python {'.'.join(map(str, MIN_VERSION))} or newer (it is {'.'.join(map(str, found['version']))})")
    if found["missing"]:
        lacks.append(f"the packages {', '.join(found['missing'])}")
    if lacks:
        raise ClusterPythonError(f"jobs on this cluster run `python`, which is {found['python']}, and it lacks "
                                 f"{' and '.join(lacks)}: the job would fail with ModuleNotFoundError. {FIX}")
    return found["python"]
