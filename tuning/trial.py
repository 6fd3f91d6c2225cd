"""Inside one trial: the Tune driver function that runs the config's stages with the sampled overrides.

Each trial is a pipeline (`oodlab.distributed.pipeline.run`) of multi-worker Ray Train runs, nested in
MLflow under the sweep's run. Only the tuned stage reports to Tune, through `ValidationReport`. A trial's
pipeline state lives under the sweep's trials folder, named `<sweep>.<trial id>`, so a trial that Tune
restarts after an interrupted sweep skips its finished stages and resumes the current one.

When Tune stops a trial early, the trial's actor dies and with it the Train controller it owns, but the
workers' placement group outlives them (a group lives until its creator and its job are gone), and Ray
Train's own cleaner needs Ray's state API (the dashboard, off in local runs): the leaked CPUs would starve
every later trial. So rank 0 notes its group's id in the trial's folder, and the sweep driver releases
what a stopped trial left (`release_placement_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray import tune
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from oodlab.atomic import write_text
from oodlab.config import Config
from oodlab.distributed import pipeline
from oodlab.distributed.launch import StageResult, fit
from oodlab.distributed.worker import Job, train_loop_per_worker
from oodlab.storage import StoragePath
from oodlab.tuning.objective import ValidationReport, reference_accuracy, tuned_stage
from oodlab.tuning.space import overrides, sampled_config

PLACEMENT_GROUPS = "placement_groups.txt"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial gets from the sweep driver."""

    raw: dict[str, Any]  # the sweep's config as trials start from it (trial worker CPUs, trials folder)
    sweep_run_id: str  # MLflow parent run


def trial_config(raw: dict[str, Any], params: dict[str, Any], trial_id: str) -> Config:
    return sampled_config({**raw, "name": f"{raw['name']}.{trial_id}"}, params)


def trial_folder(cfg: Config) -> StoragePath:
    return pipeline.state_path(cfg).parent


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable: one pipeline run with this trial's overrides, a child of the sweep's run."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup.raw, params, trial_id)
    tags = {"oodlab.kind": "trial", "oodlab.sweep": setup.raw["name"], "oodlab.trial": trial_id,
            "oodlab.sampled": " ".join(overrides(params))}
    pipeline.run(cfg, launch=launch_stage, parent_run_id=setup.sweep_run_id, tags=tags)


def launch_stage(cfg: Config, job: Job) -> StageResult:
    """pipeline.run's launch inside a trial: the tuned stage also reports its validation results to Tune."""
    callbacks = None
    if job.stage == tuned_stage(cfg):
        reference = reference_accuracy(job.init) if cfg.search.max_id_acc_drop is not None else None
        callbacks = [ValidationReport(cfg.search, reference)]
    return fit(cfg, job, callbacks, loop=noting_loop)


def noting_loop(job: dict[str, Any]) -> None:
    """The stage's worker loop, after rank 0 noted its worker group's placement group."""
    if ray.train.get_context().get_world_rank() == 0:
        cfg = Config.model_validate(job["config"])
        notes = trial_folder(cfg) / PLACEMENT_GROUPS
        noted = notes.read_text() if notes.is_file() else ""
        write_text(notes, noted + ray.util.get_current_placement_group().id.hex() + "\n")
    train_loop_per_worker(job)


def release_placement_groups(cfg: Config) -> int:
    """Remove the trial's worker placement groups that are still reserved (its Train run was killed)."""
    notes = trial_folder(cfg) / PLACEMENT_GROUPS
    released = 0
    for hex_id in notes.read_text().split() if notes.is_file() else []:
        group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id)))
        if placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)
            released += 1
    return released
