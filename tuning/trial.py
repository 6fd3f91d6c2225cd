"""Inside one trial: the Tune function trainable that runs the config's stages with the sampled overrides.

A trial acquires one of the sweep's worker groups (`group.GroupPool`, started once by the sweep driver; the
acquire blocks until one is free) and runs its pipeline (`oodlab.distributed.pipeline.run`) there, nested in
MLflow under the sweep's run. Only the tuned stage reports to Tune: each epoch that rank 0 hands back goes
through `tune_result`. A trial's pipeline state lives under the sweep's trials folder, named
`<sweep>.<trial id>`, so a trial that Tune restarts after an interrupted sweep skips its finished stages and
resumes the current one.

However a trial ends (finished, stopped early by Tune, failed, its actor killed), the sweep driver takes its
group back (`callbacks.TrialCleanup`): what it left running is cancelled and the workers stop at their next step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ray import tune

from oodlab.config import Config
from oodlab.distributed import pipeline
from oodlab.distributed.group import JobCancelled, Lender
from oodlab.distributed.jobs import Epoch, Job
from oodlab.tuning.objective import reference_accuracy, tune_result, tuned_stage
from oodlab.tuning.space import overrides, sampled_config


@dataclass(frozen=True)
class TrialSetup:
    """What every trial gets from the sweep driver."""

    raw: dict[str, Any]  # the sweep's config as trials start from it (trial worker CPUs, trials folder)
    sweep_run_id: str  # MLflow parent run
    groups: Lender  # the sweep's worker groups


def trial_config(raw: dict[str, Any], params: dict[str, Any], trial_id: str) -> Config:
    return sampled_config({**raw, "name": f"{raw['name']}.{trial_id}"}, params)


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable: one pipeline run with this trial's overrides, a child of the sweep's run."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(setup.raw, params, trial_id)
    tags = {"oodlab.kind": "trial", "oodlab.sweep": setup.raw["name"], "oodlab.trial": trial_id,
            "oodlab.sampled": " ".join(overrides(params))}
    heard: set[int] = set()  # the tuned stage's epochs handed to Tune by this process
    group = setup.groups.acquire(trial_id)
    try:
        state = pipeline.run(cfg, group=group, listen=functools.partial(report_to_tune, cfg, heard),
                             parent_run_id=setup.sweep_run_id, tags=tags)
    except JobCancelled:  # Tune stopped the trial and the sweep took its group back: the trial is over
        return
    name = tuned_stage(cfg)
    last = cfg.stages[name].epochs - 1
    if last not in heard:  # the sweep was interrupted after the last epoch's checkpoint, before Tune heard of it: the
        # resumed stage trains nothing and hands no epoch over, so Tune hears the last epoch from the stage's metrics
        tell_tune(cfg, pipeline.resolve_init(cfg, state, name), Epoch(last, state.stages[name].metrics))


def report_to_tune(cfg: Config, heard: set[int], job: Job, epoch: Epoch) -> None:
    """pipeline.run's listener in a trial: each epoch of the tuned stage reaches Tune."""
    if job.stage == tuned_stage(cfg):
        heard.add(epoch.epoch)
        tell_tune(cfg, job.init, epoch)


def tell_tune(cfg: Config, init: str | None, epoch: Epoch) -> None:
    """Report an epoch's validation view and objective to Tune (nothing for an epoch without OOD evaluation)."""
    reference = reference_accuracy(init) if cfg.search.max_id_acc_drop is not None else None
    if (view := tune_result(epoch, cfg.search, reference)) is not None:
        tune.report(view)
