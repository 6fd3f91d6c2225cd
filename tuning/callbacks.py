"""Tune callbacks on the sweep driver: a live status line per trial event, and cleanup of ended trials."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from oodlab.console import say
from oodlab.distributed import pipeline, tracking
from oodlab.distributed.group import GroupPool
from oodlab.tuning.space import overrides
from oodlab.tuning.trial import trial_config


class StatusLine(Callback):
    """On the terminal one line per finished, early-stopped or failed trial; one line per epoch result in Ray's
    output (the log file, or the terminal with --verbose)."""

    def __init__(self, metric: str, epochs_key: str, default_epochs: int, total: int):
        self.metric, self.epochs_key, self.default_epochs, self.total = metric, epochs_key, default_epochs, total

    def planned(self, config: dict[str, Any]) -> int:
        return int(config.get(self.epochs_key, self.default_epochs))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict[str, Any], **info) -> None:
        print(f"[sweep] {trial.trial_id} epoch {result['training_iteration']}/{self.planned(trial.config)}  "
              f"objective {result['objective']:.2f}  {self.metric} {result[self.metric]:.2f}  "
              f"id_val_acc {result['id_val_acc']:.2f}  | {' '.join(overrides(trial.config))}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        done, planned = last.get("training_iteration", 0), self.planned(trial.config)
        how = (f"finished {planned} epochs" if done >= planned
               else f"stopped early by the scheduler after {done}/{planned} epochs")
        value = f", objective {last['objective']:.2f}" if "objective" in last else ""
        say(f"[sweep] {trial.trial_id} {how}{value}  ({self.ended(trials, trial)}/{self.total} trials ended)")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        say(f"[sweep] {trial.trial_id} FAILED; its error is in {trial.path}  ({self.ended(trials, trial)}/{self.total} "
            "trials ended)")

    @staticmethod
    def ended(trials: list, trial) -> int:
        return 1 + sum(t.is_finished() for t in trials if t is not trial)


class TrialCleanup(Callback):
    """When a trial ends (finished, stopped early, failed, its actor killed), the one place it is cleaned up: the
    sweep takes its worker group back, cancelling what it left running, and ends its MLflow runs still open."""

    def __init__(self, raw: dict[str, Any], pool: str):
        self.raw, self.pool = raw, pool  # the pool by name: Tune pickles its callbacks

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.close(trial, "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.close(trial, "FAILED")

    def close(self, trial, status: str) -> None:
        if (pool := GroupPool.open.get(self.pool)) is not None:
            pool.release(trial.trial_id)
        close_trial(self.raw, trial.config, trial.trial_id, status)


def close_trial(raw: dict[str, Any], params: dict[str, Any], trial_id: str, status: str) -> None:
    """End a trial's still-open MLflow runs with `status`."""
    cfg = trial_config(raw, params, trial_id)
    state = pipeline.PipelineState.load(pipeline.state_path(cfg))
    uri = cfg.mlflow.tracking_uri
    for run_id in [r.run_id for r in state.stages.values()] + ([state.parent_run_id] if state.parent_run_id else []):
        if tracking.client(uri).get_run(run_id).info.status == "RUNNING":
            tracking.end_run(uri, run_id, status)
