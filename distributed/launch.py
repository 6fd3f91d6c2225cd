"""Ray and Ray Train runs: connect to (or start) Ray, check the cluster fits the workers, config -> TorchTrainer.

The runs themselves are worker groups that take stage after stage (`group.py`): one per `oodlab train`, a pool of
them per sweep.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import ray
import ray._private.ray_constants as ray_constants
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from oodlab.config import Config, RayConfig
from oodlab.storage import storage_env
from oodlab.distributed.tracking import tracking_env

SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the driver of a submitted job


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to the configured cluster, or start a local Ray instance sized to this machine.

    Every Ray worker gets this environment's MLflow address and credentials, and those of the run storage,
    through the runtime_env (a submitted job's runtime_env carries them already, and Ray refuses the same
    variable twice).
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    env = {} if SUBMITTED_JOB_ENV in os.environ else tracking_env() | storage_env()
    check_address(cfg.address)
    local = loopback_only() if cfg.address is None and "RAY_ADDRESS" not in os.environ else {}
    ray.init(address=cfg.address, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", **env}}, **local)


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at `ray.address` (host:port or ray://host:port): ray.init would wait for
    minutes. None and "auto" (find the cluster on this machine; Ray fails fast itself) are not checked."""
    if address in (None, "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as err:
        raise ConnectionError(f"ray.address: nothing answers at {address!r} ({err}); start the cluster "
                              "(`ray start --head`), fix the address (host:port of the head's GCS, or "
                              "ray://host:10001), or remove ray.address to start a local instance") from None


def loopback_only() -> dict[str, str]:
    """ray.init arguments for a local instance that listens on 127.0.0.1 only.

    Ray otherwise binds and advertises the machine's routable address: its ENABLE_RAY_CLUSTER constant (read
    from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when ray is imported) turns that off; the variable reaches the
    processes Ray starts.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    return {"_node_ip_address": "127.0.0.1"}


def check_resources(cfg: RayConfig) -> None:
    """Fail before training if the cluster can never fit the requested workers."""
    have = ray.cluster_resources()
    need_cpu = cfg.num_workers * cfg.cpus_per_worker
    if need_cpu > have.get("CPU", 0):
        raise ValueError(f"ray: {cfg.num_workers} workers x {cfg.cpus_per_worker} CPUs = {need_cpu} CPUs, but the "
                         f"cluster has {have.get('CPU', 0)}; lower ray.num_workers or ray.cpus_per_worker")
    if cfg.use_gpu and cfg.num_workers > have.get("GPU", 0):
        raise ValueError(f"ray: {cfg.num_workers} GPU workers, but the cluster has {have.get('GPU', 0)} GPUs; "
                         "lower ray.num_workers or set ray.use_gpu=false")
    for name, amount in cfg.resources_per_worker.items():
        if cfg.num_workers * amount > have.get(name, 0):
            raise ValueError(f"ray.resources_per_worker: {cfg.num_workers} workers x {amount} {name}, but the cluster "
                             f"has {have.get(name, 0)} {name}; start nodes with --resources or change the field")


def trainer(cfg: Config, loop_config: dict[str, Any], loop: Callable[[dict[str, Any]], None], name: str) -> TorchTrainer:
    """`loop(loop_config)` on every worker, in the Ray Train run `name`. oodlab writes and prunes the checkpoints
    itself (`checkpoint.write`), so Ray Train keeps none."""
    r = cfg.ray
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                     resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {}),
                                                           **r.resources_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=str(r.storage_path),
            failure_config=FailureConfig(max_failures=r.max_failures),
        ),
    )

