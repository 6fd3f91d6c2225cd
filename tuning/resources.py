"""How many trials may run at once without deadlocking.

The sweep keeps one Ray Train worker group per trial that may run at once, and each running trial is a
Tune actor (the driver function, TRIAL_DRIVER_CPUS) that runs its stages on one of them. If Tune started
more trials than there are groups, or groups than the cluster can fit beside their trials' actors, a
trial would hold its CPU while waiting for workers that never come. So: max_concurrent_trials = how many
(driver + workers) fit in the cluster's totals, and the sweep starts that many groups.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from oodlab.config import Config, ConfigError

TRIAL_DRIVER_CPUS = 1.0  # Tune rejects a zero-CPU trial; the driver mostly waits on its worker group


def worker_cpus(cfg: Config) -> float:
    return cfg.search.cpus_per_trial_worker or cfg.ray.cpus_per_worker


def per_trial(cfg: Config) -> dict[str, float]:
    """Everything one trial holds while its stage trains: driver CPU + workers' CPUs (+ one GPU each)."""
    need = {"CPU": TRIAL_DRIVER_CPUS + cfg.ray.num_workers * worker_cpus(cfg)}
    if cfg.ray.use_gpu:
        need["GPU"] = float(cfg.ray.num_workers)
    return need | {k: cfg.ray.num_workers * v for k, v in cfg.ray.resources_per_worker.items()}


def max_concurrent_trials(cluster: Mapping[str, float], cfg: Config) -> int:
    """Trials that fit together in `cluster` (ray.cluster_resources()); an error if not even one fits."""
    need = per_trial(cfg)
    fits = min(math.floor(cluster.get(kind, 0.0) / amount + 1e-9) for kind, amount in need.items())
    if fits < 1:
        shown = ", ".join(f"{v:g} {k}" for k, v in need.items())
        raise ConfigError(
            f"search: one trial needs {shown} ({TRIAL_DRIVER_CPUS:g} CPU for the trial driver + {cfg.ray.num_workers} "
            f"workers x {worker_cpus(cfg):g} CPU{' + 1 GPU' if cfg.ray.use_gpu else ''}) but the cluster has "
            f"{dict(cluster)}; lower search.cpus_per_trial_worker (fractions such as 0.5 work) or ray.num_workers")
    return fits
