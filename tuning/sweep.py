"""`oodlab tune`: a Ray Tune sweep whose trials each run the config's stages on multi-worker Ray Train groups.

The driver starts one worker group (a Ray Train run, `group.GroupPool`) per trial that may run at once
(`max_concurrent_trials`, from the cluster's resources: `resources.py`) and keeps them for the whole sweep, so
trials do not pay for starting workers. The Tuner runs a function trainable per trial (`trial.run_trial`)
that applies the sampled overrides, acquires a group and runs the pipeline on it; the tuned stage's epoch
results reach Tune through `objective.tune_result`, validation metrics only. Searchers: random (grid
dimensions expand) or Optuna TPE; scheduler: ASHA on the tuned stage's epochs, or FIFO.

Everything lives under `<ray.storage_path>/<name>/sweep/`:
  sweep.json  the sweep's MLflow parent run and its config (a rerun must use the same config)
  tune/       Tune's experiment: rerunning `oodlab tune` restores it, so ended trials are not rerun
  trials/     each trial's pipeline state and checkpoints (an interrupted trial resumes its stage there),
              and the worker groups' Ray Train runs
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm
from ray.tune.search.optuna import OptunaSearch

from oodlab import storage
from oodlab.atomic import write_text
from oodlab.console import say
from oodlab.config import Config, ConfigError, check_unchanged, flatten, to_dict
from oodlab.distributed import pipeline, tracking
from oodlab.distributed.artifacts import log_report
from oodlab.distributed.group import GroupPool
from oodlab.distributed.launch import ensure_ray
from oodlab.plots import png_bytes
from oodlab.report import html_images, html_table
from oodlab.storage import StoragePath
from oodlab.tuning import summary
from oodlab.tuning.callbacks import StatusLine, TrialCleanup, close_trial
from oodlab.tuning.objective import check_objective, tuned_stage
from oodlab.tuning.resources import TRIAL_DRIVER_CPUS, max_concurrent_trials, worker_cpus
from oodlab.tuning.space import check_space, expected_trials, to_tune
from oodlab.tuning.trial import TrialSetup, run_trial, trial_config

ASHA_REDUCTION_FACTOR = 2  # sweeps here are small: halve at each rung


@dataclass
class SweepState:
    parent_run_id: str
    config: dict[str, Any]


def sweep_folder(cfg: Config) -> StoragePath:
    return cfg.ray.storage_path / cfg.name / "sweep"


def trial_base(cfg: Config) -> dict[str, Any]:
    """The config trials start from: trial worker CPUs, Train runs and pipeline states in the trials folder."""
    raw = to_dict(cfg)
    raw["ray"] |= {"storage_path": str(sweep_folder(cfg) / "trials"), "cpus_per_worker": worker_cpus(cfg)}
    return raw


def run(cfg: Config, restart: bool = False, base: dict[str, Any] | None = None) -> summary.SweepResult:
    """Run (or resume) the sweep; return every trial's row and the best trial with its final metrics.

    `base` is what the caller's `preflight` returned (else the checks run here).
    """
    base = base or preflight(cfg, restart)
    resumed = previous_state(cfg, restart)
    ensure_ray(cfg.ray)
    concurrency = max_concurrent_trials(ray.cluster_resources(), cfg)
    state = resumed or new_state(cfg, concurrency)
    with GroupPool(Config.model_validate(base), concurrency) as pool:
        results = tuner(cfg, base, state, concurrency, pool).fit()
    return finish(cfg, base, state, results)


def check(cfg: Config) -> dict[str, Any]:
    """Every check of the sweep that needs no cluster (`oodlab submit --tune` runs them too); the trials' base."""
    if cfg.search is None:
        raise ConfigError("search: this config has no search section; add one (see configs/demo_sweep.yaml)")
    base = trial_base(cfg)
    check_space(cfg, base)
    check_objective(cfg)
    return base


def preflight(cfg: Config, restart: bool = False) -> dict[str, Any]:
    """Every check of `oodlab tune` before a log file or Ray: the sweep's config first, then the benchmark, the
    checkpoints and the servers (`pipeline.preflight`); the trials' base."""
    base = check(cfg)
    pipeline.preflight(cfg, restart)
    return base


def previous_state(cfg: Config, restart: bool) -> SweepState | None:
    """The state of an earlier run of this sweep, to resume (it must have had the same config); None if none.

    With `restart`, an earlier sweep is moved aside first.
    """
    folder = sweep_folder(cfg)
    if restart and folder.exists():
        retire(cfg, folder)
    if not (folder / "sweep.json").is_file():
        return None
    state = SweepState(**json.loads((folder / "sweep.json").read_text()))
    check_unchanged("sweep", cfg.name, tracking.redacted_config(cfg), state.config)
    return state


def new_state(cfg: Config, concurrency: int) -> SweepState:
    """A new sweep: its MLflow parent run, with the config as params and as config.yaml."""
    uri = cfg.mlflow.tracking_uri
    run_id = tracking.start_run(uri, cfg.mlflow.experiment, cfg.name, {"oodlab.kind": "sweep", "oodlab.sweep": cfg.name})
    logger = tracking.RunLogger(uri, run_id)
    logger.params(flatten(to_dict(cfg)) | {"sweep.max_concurrent_trials": concurrency,
                                            "sweep.trial_driver_cpus": TRIAL_DRIVER_CPUS})
    logger.text(yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")
    state = SweepState(run_id, tracking.redacted_config(cfg))
    write_text(sweep_folder(cfg) / "sweep.json", json.dumps(asdict(state), indent=1))
    return state


def retire(cfg: Config, folder: StoragePath) -> None:
    """--restart: move the old sweep aside (nothing is deleted) and close its MLflow run if still open."""
    old = folder / "sweep.json"
    if old.is_file():
        tracking.kill_open_runs(cfg.mlflow.tracking_uri, [json.loads(old.read_text())["parent_run_id"]])
    aside = folder.with_name(f"sweep.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    storage.move(folder, aside)
    say(f"[sweep] --restart: the previous sweep moved to {aside}")


def tuner(cfg: Config, base: dict[str, Any], state: SweepState, concurrency: int, pool: GroupPool) -> tune.Tuner:
    """Restore the sweep's Tuner if it ran before, else build it."""
    search = cfg.search
    setup = TrialSetup(base, state.parent_run_id, pool.lender)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": TRIAL_DRIVER_CPUS})
    experiment = str(sweep_folder(cfg) / "tune")
    if tune.Tuner.can_restore(experiment):
        say(f"[sweep] resuming {experiment}")
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    stage = tuned_stage(cfg)
    status = StatusLine(search.metric, f"stages.{stage}.epochs", cfg.stages[stage].epochs, expected_trials(search))
    return tune.Tuner(
        trainable,
        param_space=to_tune(search.space),
        tune_config=tune.TuneConfig(metric="objective", mode=search.mode, num_samples=search.num_samples,
                                    search_alg=searcher(cfg, concurrency), scheduler=scheduler(cfg),
                                    reuse_actors=True, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep_folder(cfg)), verbose=0,
                                  callbacks=[status, TrialCleanup(base, pool.name)]),
    )


def searcher(cfg: Config, concurrency: int) -> SearchAlgorithm:
    if cfg.search.searcher == "optuna":
        return ConcurrencyLimiter(OptunaSearch(seed=cfg.seed), max_concurrent=concurrency)
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=cfg.seed)


def scheduler(cfg: Config) -> TrialScheduler:
    """ASHA on the tuned stage's epochs, with rungs at 1, 2, 4, ... strictly before the last epoch.

    A trial is never cut at its last epoch (it finishes its stage, final evaluation and later stages); with
    a single epoch there is nothing to stop early, so FIFO.
    """
    last = max_epochs(cfg)
    if cfg.search.scheduler == "fifo" or last < 2:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=last - 1, grace_period=1,
                         reduction_factor=ASHA_REDUCTION_FACTOR, stop_last_trials=False)


def max_epochs(cfg: Config) -> int:
    stage = tuned_stage(cfg)
    dist = cfg.search.space.get(f"stages.{stage}.epochs")
    if dist is None:
        return cfg.stages[stage].epochs
    return int(dist.upper())


def trial_dirname(trial: Any) -> str:
    return trial.trial_id


def finish(cfg: Config, base: dict[str, Any], state: SweepState, results: tune.ResultGrid) -> summary.SweepResult:
    """Rows from Tune's results; once every trial ended: the best trial, and the parent run's artifacts."""
    search, stage = cfg.search, tuned_stage(cfg)
    rows = [summary.trial_row(Path(r.path).name, {k: r.config[k] for k in search.space}, r.metrics or {},
                              r.error is not None, int(r.config.get(f"stages.{stage}.epochs", cfg.stages[stage].epochs)),
                              search.metric) for r in results]
    rows.sort(key=lambda r: r.trial_id)
    result = summary.SweepResult(cfg.name, state.parent_run_id, rows, expected_trials(search),
                                 results.num_terminated + results.num_errors)
    if result.interrupted:
        return result
    for row in rows:  # a trial whose actor was killed may have left its runs open
        close_trial(base, row.params, row.trial_id, "KILLED")
    result.best = summary.pick_best(rows, search.mode)
    if result.best is not None:
        pipeline_state = pipeline.PipelineState.load(pipeline.state_path(trial_config(base, result.best.params,
                                                                                      result.best.trial_id)))
        client = tracking.client(cfg.mlflow.tracking_uri)
        result.best_run_id = pipeline_state.parent_run_id
        result.best_runs = {name: client.get_run(rec.run_id).data.metrics for name, rec in pipeline_state.stages.items()}
    log_sweep(cfg, result, trial_runs(cfg, base, rows))
    return result


def trial_runs(cfg: Config, base: dict[str, Any], rows: list[summary.TrialRow]) -> dict[str, str]:
    """Trial id -> the MLflow run of its tuned stage, for the trials that started it."""
    stage, runs = tuned_stage(cfg), {}
    for row in rows:
        state = pipeline.PipelineState.load(pipeline.state_path(trial_config(base, row.params, row.trial_id)))
        if stage in state.stages:
            runs[row.trial_id] = state.stages[stage].run_id
    return runs


def log_sweep(cfg: Config, result: summary.SweepResult, trials: dict[str, str]) -> None:
    """The parent run: trials table (CSV + markdown), objective plot, best config, report.html; then it ends."""
    uri, search, keys = cfg.mlflow.tracking_uri, cfg.search, list(cfg.search.space)
    logger = tracking.RunLogger(uri, result.parent_run_id)
    logger.text(summary.trials_csv(result.rows, keys, search.metric), "trials.csv")
    logger.text(summary.trials_markdown(result.rows, keys, search.metric, result.best), "trials.md")
    figure = summary.objective_figure(cfg.name, result.rows, search.space, result.best, search.metric, search.mode)
    logger.figure(figure, "objective.png")
    trials_table = html_table(*summary.trials_table(result.rows, keys, search.metric, result.best))
    log_report(cfg, result.parent_run_id, f"{cfg.name}: trials compared", trials,
               [("Trials (chosen on validation only: the objective)", trials_table),
                ("Objective", html_images([("objective per searched value", png_bytes(figure))]))])
    if result.best is not None:
        logger.text(summary.best_config_yaml(cfg, result.best.params), "best_config.yaml")
        logger.tags({"oodlab.best_trial": result.best.trial_id, "oodlab.best_run_id": result.best_run_id})
        logger.metrics({"best/objective": result.best.objective}, step=0)
    tracking.end_run(uri, result.parent_run_id)
