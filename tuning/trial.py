"""Inside one trial: the Tune function trainable that runs the config's stages with the sampled overrides.

A trial leases one of the sweep's worker groups (`session.Pool`, started once by the sweep driver) and runs
its pipeline (`oodlab.distributed.pipeline.run`) there, nested in MLflow under the sweep's run. Only the tuned
stage reports to Tune: the trial forwards each epoch's result that rank 0 hands back, through `tune_result`.
A trial's pipeline state lives under the sweep's trials folder, named `<sweep>.<trial id>`, so a trial that
Tune restarts after an interrupted sweep skips its finished stages and resumes the current one.

When Tune stops a trial early, the trial's wait ends (or its actor dies), and its job is cancelled: the
workers stop after their epoch and the group is free for the next trial (the sweep driver releases a group
whose trial's actor died, `TrialCleanup`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ray import tune

from oodlab.config import Config
from oodlab.distributed import pipeline, session
from oodlab.distributed.launch import StageResult
from oodlab.distributed.worker import Job
from oodlab.tuning.objective import reference_accuracy, tune_result, tuned_stage
from oodlab.tuning.space import overrides, sampled_config


@dataclass(frozen=True)
class TrialSetup:
    """What every trial gets from the sweep driver."""

    raw: dict[str, Any]  # the sweep's config as trials start from it (trial worker CPUs, trials folder)
    sweep_run_id: str  # MLflow parent run
    groups: tuple[Any, ...]  # the mailboxes of the sweep's worker groups


def trial_config(raw: dict[str, Any], params: dict[str, Any], trial_id: str) -> Config:
    return sampled_config({**raw, "name": f"{raw['name']}.{trial_id}"}, params)


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable: one pipeline run with this trial's overrides, a child of the sweep's run."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup.raw, params, trial_id)
    tags = {"oodlab.kind": "trial", "oodlab.sweep": setup.raw["name"], "oodlab.trial": trial_id,
            "oodlab.sampled": " ".join(overrides(params))}
    group = session.lease(list(setup.groups), trial_id)
    try:
        pipeline.run(cfg, launch=functools.partial(run_stage, group), parent_run_id=setup.sweep_run_id, tags=tags)
    finally:
        group.release.remote(trial_id)


def run_stage(group: Any, cfg: Config, job: Job) -> StageResult:
    """pipeline.run's launch inside a trial: the stage on the leased group; the tuned stage reports to Tune."""
    if job.stage != tuned_stage(cfg):
        return session.run_job(group, cfg, job)
    reference = reference_accuracy(job.init) if cfg.search.max_id_acc_drop is not None else None

    def report(result: dict[str, Any]) -> None:
        if (view := tune_result(result, cfg.search, reference)) is not None:
            tune.report(view)

    return session.run_job(group, cfg, job, report)
