"""`oodlab submit` and `oodlab jobs`: run a config on a Ray cluster as a Ray job, through its job server.

What travels (the job's runtime_env `working_dir`): this project's source tree as one zip, packed by Ray's own
packager (without EXCLUDES and what the tree's .gitignore / .rayignore files list) and laid out as it installs
(pyproject's package-dir: datapipes/ as oodlab/datapipes/, ...), plus the config as `oodlab-job.yaml`: the YAML
with the command line's overrides applied. The job runs `python -m oodlab.cli train|tune oodlab-job.yaml` in that
folder on the head node: `oodlab` and all its layers import from the shipped code, not what the cluster has
installed.

Paths: the job's working directory is a temporary copy on the head, so every path in the config (data.root,
ray.storage_path, a sqlite tracking URI, checkpoint files) must be absolute, as the cluster's nodes see them
(shared storage); relative ones are refused here, before anything is sent. Absolute paths travel as given and
are resolved on the cluster, where they must exist. A benchmark YAML inside the project travels with it.

Tracking: the config's mlflow.tracking_uri, else this environment's MLFLOW_TRACKING_URI (a job never falls back
to a sqlite file in its temporary folder). MLFLOW_TRACKING_URI / _USERNAME / _PASSWORD / _TOKEN from this
environment travel as runtime_env env_vars (the dashboard masks them for browsers) and are never printed; so do
the run storage's endpoint and credentials (AWS_*, GOOGLE_*, AZURE_*: see oodlab.storage).
Ray's token auth: with RAY_AUTH_MODE=token, Ray's client itself sends RAY_AUTH_TOKEN (or the file named by
RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token); oodlab never reads or prints it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from ray._private.runtime_env import packaging
from ray.exceptions import RayError
from ray.job_submission import JobStatus, JobSubmissionClient

from oodlab import config
from oodlab.datapipes.benchmarks import get_benchmark, is_yaml_ref
from oodlab.distributed.tracking import redact, tracking_env
from oodlab.storage import storage_env

JOB_CONFIG = "oodlab-job.yaml"
EXCLUDES = ["/.git", "/.venv", "/.oodlab", "/data", "/mlruns", "/mlflow.db", "*.beton", "__pycache__"]
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # read by Ray's client, and then preferred to its argument
STOP_WAIT_S = 60.0

for _chatty in ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk",
               "ray.dashboard.modules.job.sdk"):  # INFO lines per packed file and request
    logging.getLogger(_chatty).setLevel(logging.WARNING)


class JobServerError(RuntimeError):
    """The Ray job server could not be reached, refused the request, or does not know the job."""


@dataclass
class JobConfig:
    """A config checked for a cluster: `raw` travels, `cfg` (paths resolved here) is for further local checks."""

    raw: dict[str, Any]
    cfg: config.Config
    tracking_uri: str


@dataclass
class Package:
    """A job, checked and packed, ready to send."""

    entrypoint: str
    env: dict[str, str]  # runtime_env env_vars: MLflow and storage addresses and credentials
    zip_path: Path
    name: str  # the config's name, for the job id


def project_root() -> Path:
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "oodlab" / "cli.py").is_file():
        raise config.ConfigError(f"oodlab submit ships the project's source tree, but {root} is not one; run it from "
                                 "a checkout (pip install -e .)")
    return root


def resolve_address(address: str | None) -> str:
    found = address or next((os.environ[k] for k in ADDRESS_ENV if os.environ.get(k)), None)
    if not found:
        raise config.ConfigError("--address: name the cluster's job server, e.g. --address http://127.0.0.1:8265 (the "
                                 "head's dashboard port, tunnelled), or set RAY_API_SERVER_ADDRESS")
    return found


def check(config_path: Path, overrides: list[str]) -> JobConfig:
    """Every check of a config that needs no cluster; raises ConfigError."""
    raw = config.read(config_path, overrides)
    cfg = config.validate(raw, Path.cwd())  # every check of `oodlab train`
    get_benchmark(cfg.data.benchmark)
    uri = check_cluster_paths(config.Config.model_validate(raw), raw)  # the config as given, paths unresolved
    if is_yaml_ref(cfg.data.benchmark):
        raw.setdefault("data", {})["benchmark"] = benchmark_for_job(Path(cfg.data.benchmark))
    return JobConfig(raw, cfg, uri)


def benchmark_for_job(path: Path) -> str:
    """A benchmark YAML inside the project travels with it (a path from the job's working directory, the
    project's copy); one outside keeps its absolute path, where the cluster must have it too."""
    root = project_root()
    if not path.is_relative_to(root):
        return str(path)
    return shipped_name(path.relative_to(root).as_posix(), installed_layout(root))


def package(job: JobConfig, command: str, into: Path) -> Package:
    """The project and the config packed in `into`, to run `oodlab <command>` (train or tune) on the cluster."""
    zip_path = pack(project_root(), {JOB_CONFIG: yaml.safe_dump(job.raw, sort_keys=False)}, into)
    return Package(f"python -m oodlab.cli {command} {JOB_CONFIG}", tracking_env() | storage_env(), zip_path,
                   job.cfg.name)


def check_cluster_paths(cfg: config.Config, raw: dict[str, Any]) -> str:
    """Refuse paths that only mean something here; return the tracking URI the job will use."""
    problems = [f"  {field}: {value} is relative; give the absolute path on the cluster, e.g. {example}"
                for field, value, example in [("data.root", cfg.data.root, "data.root=/data/oodlab"),
                                              ("ray.storage_path", cfg.ray.storage_path,
                                               "ray.storage_path=/shared/oodlab/runs")]
                if not _on_cluster(value)]
    problems += [f"  stages.{name}.init: {stage.init} is relative; give the checkpoint's absolute path on the cluster"
                 for name, stage in cfg.stages.items()
                 if stage.init and stage.init not in cfg.stages and not _on_cluster(stage.init)]
    uri = raw.get("mlflow", {}).get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        problems.append("  mlflow.tracking_uri: not set, and MLFLOW_TRACKING_URI is not set here; the job would write to "
                        "a sqlite file in its temporary folder. Set it to the server the cluster reaches, e.g. "
                        "mlflow.tracking_uri=http://mlflow:5000, or export MLFLOW_TRACKING_URI")
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        problems.append(f"  mlflow.tracking_uri: {redact(uri)} is a relative sqlite path; give an absolute one "
                        "(sqlite:////shared/mlflow.db) or a tracking server")
    if problems:
        raise config.ConfigError("the job runs in a temporary copy of the project on the cluster:\n" + "\n".join(problems))
    return uri


def _on_cluster(path: str | Path) -> bool:
    return "://" in str(path) or Path(path).is_absolute()


def pack(root: Path, extra: dict[str, str], into: Path) -> Path:
    """`root` zipped by Ray's packager (EXCLUDES, ignore files) in the installed layout, plus `extra` files; refused
    above Ray's upload limit."""
    zip_path = into / "oodlab-job.zip"
    layout = installed_layout(root)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree.zip"
        packaging.create_package(str(root), tree, include_gitignore=True, excludes=EXCLUDES)
        with zipfile.ZipFile(tree) as source, zipfile.ZipFile(zip_path, "w") as z:
            for info in source.infolist():
                data = source.read(info)
                info.filename = shipped_name(info.filename, layout)
                z.writestr(info, data)
            for name, text in extra.items():  # a fixed date: the same job packs to the same bytes (Ray reuses the upload)
                z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), text)
    size, limit = zip_path.stat().st_size, packaging.GCS_STORAGE_MAX_SIZE
    if size >= limit:
        largest = "\n".join(f"  {_mib(n)}  {p}" for p, n in largest_paths(root)[:8])
        raise config.ConfigError(
            f"the project packs to {_mib(size)}, over Ray's upload limit of {_mib(limit)}. Largest paths in it "
            f"(before compression):\n{largest}\nList what the job does not need in {root / '.rayignore'} (gitignore "
            "syntax), or move data out of the project: jobs read data from data.root on the cluster")
    return zip_path


def installed_layout(root: Path) -> dict[str, str]:
    """Source folder -> where it installs, from pyproject's package-dir (`datapipes/` -> `oodlab/datapipes/`)."""
    folders = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {f"{folder}/": f"{package.replace('.', '/')}/" for package, folder in folders.items()}


def shipped_name(name: str, layout: dict[str, str]) -> str:
    """A path of the source tree as the job's working directory has it (the installed layout)."""
    return next((to + name.removeprefix(source) for source, to in layout.items() if name.startswith(source)), name)


def largest_paths(root: Path) -> list[tuple[str, int]]:
    """Top-level files and folders of the package, largest first, with their sizes summed (what Ray would pack)."""
    sizes: dict[str, int] = {}

    def add(path: Path) -> None:
        if path.is_file():
            top = path.relative_to(root).parts[0]
            sizes[top] = sizes.get(top, 0) + path.stat().st_size

    packaging._dir_travel(root, [packaging._get_excludes(root, EXCLUDES)], add, include_gitignore=True)
    return sorted(sizes.items(), key=lambda item: -item[1])


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@contextlib.contextmanager
def _address_as_given() -> Iterator[None]:
    """Ray's client prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS to the address it is given: hide them meanwhile."""
    saved = {k: os.environ.pop(k) for k in ADDRESS_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def client(address: str) -> JobSubmissionClient:
    try:
        with _address_as_given():
            return JobSubmissionClient(address)
    except (OSError, RuntimeError, RayError) as err:
        raise JobServerError(f"cannot reach the Ray job server at {address}: {err}") from None


def submit(address: str, package: Package) -> str:
    """Send the package; return the job id (oodlab-<name>-<time>-<random>)."""
    job_id = f"oodlab-{package.name}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    jobs = client(address)
    try:
        return jobs.submit_job(entrypoint=package.entrypoint, submission_id=job_id,
                               runtime_env={"working_dir": str(package.zip_path), "env_vars": package.env},
                               metadata={"oodlab.config": package.name})
    except (OSError, RuntimeError, RayError) as err:
        raise JobServerError(f"the job server at {address} refused the job: {err}") from None


def _call(address: str, what: str, method: str, *args: Any) -> Any:
    try:
        return getattr(client(address), method)(*args)
    except (OSError, RuntimeError, RayError) as err:
        raise JobServerError(f"{what} failed at {address}: {err}") from None


def status(address: str, job_id: str) -> JobStatus:
    return _call(address, f"status of job {job_id}", "get_job_status", job_id)


def logs(address: str, job_id: str) -> str:
    return _call(address, f"logs of job {job_id}", "get_job_logs", job_id)


def list_jobs(address: str) -> list[Any]:
    """Every job the cluster knows, oldest first (Ray's JobDetails)."""
    return sorted(_call(address, "listing jobs", "list_jobs"), key=lambda j: j.start_time or 0)


def follow(address: str, job_id: str) -> JobStatus:
    """Print the job's logs as they come until it ends; return its final status."""
    jobs = client(address)

    async def stream() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(stream())
    except (OSError, RuntimeError, RayError) as err:
        raise JobServerError(f"following job {job_id} failed at {address}: {err}") from None
    return wait(address, job_id, STOP_WAIT_S)


def wait(address: str, job_id: str, timeout_s: float) -> JobStatus:
    """The job's status once it has ended, or its status after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (state := status(address, job_id)).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    return state


def stop(address: str, job_id: str) -> JobStatus:
    """Ask Ray to stop the job (SIGTERM, then SIGKILL to its driver); return its status once it ended."""
    _call(address, f"stopping job {job_id}", "stop_job", job_id)
    return wait(address, job_id, STOP_WAIT_S)
