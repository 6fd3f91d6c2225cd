"""Run a config's stages in order, in one Ray Train run, each starting from an earlier stage's checkpoint.

Progress lives in `<storage>/<name>/pipeline.json` (written atomically after every stage): rerunning
the same config skips finished stages and resumes an interrupted one from its last checkpoint. In
MLflow the pipeline is a parent run and each stage a child run tagged with its stage and method; the
parent also gets each stage's headline numbers and, at the end, `report.html` comparing the stages.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from oodlab import console, storage
from oodlab.atomic import write_text
from oodlab.config import Config, ConfigError, TrainStage, check_unchanged, flatten, to_dict
from oodlab.datapipes import floor
from oodlab.datapipes.benchmarks import Benchmark, floors, for_config
from oodlab.distributed import checkpoint, progress, tracking
from oodlab.distributed.artifacts import finish_stage, log_report
from oodlab.distributed.group import GroupClient, JobCancelled, PendingStage, WorkerGroup
from oodlab.distributed.jobs import Epoch, Job, StageResult
from oodlab.distributed.launch import check_address, check_resources, ensure_ray
from oodlab.methods import TrainMethod
from oodlab.models import create_model
from oodlab.storage import StoragePath


Listen = Callable[[Job, Epoch], None]  # hears each epoch of a stage as rank 0 hands it over (a sweep trial's Tune report)
# Ctrl-C; Tune stopping a trial (`tune.report` exits the trial's thread, the sweep takes its group back)
INTERRUPTED = (KeyboardInterrupt, SystemExit, JobCancelled)


@dataclass
class StageRecord:
    run_id: str
    done: bool = False
    checkpoint: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class PipelineState:
    path: StoragePath
    parent_run_id: str | None = None
    stages: dict[str, StageRecord] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # flattened, credentials redacted

    @classmethod
    def load(cls, path: StoragePath) -> PipelineState:
        if not path.is_file():
            return cls(path)
        raw = json.loads(path.read_text())
        return cls(path, raw["parent_run_id"], {k: StageRecord(**v) for k, v in raw["stages"].items()},
                   raw.get("config", {}))

    def save(self) -> None:
        raw = {"parent_run_id": self.parent_run_id, "stages": {k: asdict(v) for k, v in self.stages.items()},
               "config": self.config}
        write_text(self.path, json.dumps(raw, indent=1))


def state_path(cfg: Config) -> StoragePath:
    return cfg.ray.storage_path / cfg.name / "pipeline.json"


def method_tag(cfg: Config, name: str) -> str:
    stage = cfg.stages[name]
    return TrainMethod(stage, threshold=0.0).tag if isinstance(stage, TrainStage) else stage.kind


def preflight(cfg: Config, restart: bool = False) -> Benchmark:
    """Every check that needs no cluster, before any log file, Ray or MLflow run: the benchmark and its files,
    the init checkpoints, the same config as an earlier run of this name (unless `restart`), a tracking server
    that answers and a Ray address where something listens."""
    bench = for_config(cfg)
    check_inits(cfg, bench)
    check_outliers(cfg, bench)
    saved = PipelineState.load(state_path(cfg)).config
    if saved and not restart:
        check_unchanged("pipeline", cfg.name, tracking.redacted_config(cfg), saved)
    tracking.check_reachable(cfg.mlflow.tracking_uri)
    check_address(cfg.ray.address)
    return bench


def check_outliers(cfg: Config, bench: Benchmark) -> None:
    """A stage whose method trains on outliers (oe) needs a benchmark that has them."""
    needing = [n for n, s in cfg.train_stages().items() if TrainMethod(s, threshold=0.0).needs_outliers]
    if needing and not bench.spec.outliers:
        raise ConfigError(f"stages.{needing[0]}: its methods train on outlier data, and benchmark '{bench.name}' has "
                          "none; add `outliers:` to the benchmark YAML (e.g. fmnist has some) and build it")


def check_inits(cfg: Config, bench: Benchmark) -> None:
    """Every `init` checkpoint file has exactly the model's parameter names and shapes (class count included)."""
    files = {name: stage.init for name, stage in cfg.stages.items() if stage.init and stage.init not in cfg.stages}
    if not files:
        return
    m = cfg.model
    expected = {k: tuple(v.shape) for k, v in
                create_model(m.name, bench.num_classes, False, **m.kwargs).state_dict().items()}
    for name, init in files.items():
        try:
            found = {k: tuple(v.shape) for k, v in checkpoint.load(checkpoint.model_file(init)).items()}
        except FileNotFoundError as err:
            raise ConfigError(f"stages.{name}.init: {err}") from None
        except Exception as err:  # torch.load raises many kinds of error on a file that is no weights-only state dict
            raise ConfigError(f"stages.{name}.init: {init} is not a checkpoint of weights ({type(err).__name__}); name "
                              "a model.pt that oodlab or torch.save(model.state_dict()) wrote") from None
        problems = [f"missing {k}" for k in expected.keys() - found.keys()][:3]
        problems += [f"unexpected {k}" for k in found.keys() - expected.keys()][:3]
        problems += [f"{k}: {found[k]} in the file, {v} in the model" for k, v in expected.items()
                     if k in found and found[k] != v][:3]
        if problems:
            raise ConfigError(f"stages.{name}.init: {init} does not fit model {m.name} with {bench.num_classes} "
                              f"classes ({'; '.join(problems)}); name a checkpoint of this model and benchmark")


def retire(cfg: Config) -> None:
    """--restart: move the pipeline's state and Ray run folders aside (nothing is deleted), so that Ray Train
    starts every stage anew, and end the earlier MLflow runs still open as KILLED."""
    old = PipelineState.load(state_path(cfg))
    tracking.kill_open_runs(cfg.mlflow.tracking_uri, [old.parent_run_id, *(r.run_id for r in old.stages.values())])
    moving = [p for p in [state_path(cfg), checkpoint.run_dir(cfg)] if p.exists()]
    if not moving:
        return
    aside = cfg.ray.storage_path / cfg.name / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(parents=True)
    for path in moving:
        storage.move(path, aside / path.name)
    console.say(f"--restart: the previous run's state and checkpoints moved to {aside}")


def run(cfg: Config, restart: bool = False, group: GroupClient | None = None, listen: Listen | None = None,
        parent_run_id: str | None = None, tags: dict[str, str] | None = None,
        checked: Benchmark | None = None) -> PipelineState:
    """Run (or resume) every stage; return the final state with each stage's checkpoint and metrics.

    The stages run on `group` when given (a sweep trial's, leased from the sweep), else on a worker group of their
    own (one Ray Train run); `listen(job, epoch)` hears each epoch of a stage as rank 0 hands it over (a trial
    reports its tuned stage to Tune). `parent_run_id` nests this pipeline's MLflow run under another
    (a sweep's), `tags` are added to it; `checked` is the benchmark a caller's `preflight` returned (else run
    checks). Bad input fails before any MLflow run exists; a failure later ends the open runs as FAILED (KILLED when
    interrupted: Ctrl-C, Tune stopping a trial), and a rerun continues them.
    """
    bench = checked or preflight(cfg, restart)
    if restart:
        retire(cfg)
    ensure_ray(cfg.ray)
    check_resources(cfg.ray)
    state = PipelineState.load(state_path(cfg))
    uri, buffer = cfg.mlflow.tracking_uri, tracking.buffer_folder(cfg)
    if state.parent_run_id is None:
        run_tags = {"oodlab.kind": "pipeline", "oodlab.benchmark": bench.name, **(tags or {})}
        state.parent_run_id = tracking.start_run(uri, cfg.mlflow.experiment, cfg.name, run_tags, parent_run_id)
        state.config = tracking.redacted_config(cfg)
        parent = tracking.RunLogger(uri, state.parent_run_id, buffer)
        parent.params(flatten(to_dict(cfg)))
        parent.text(yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")
        state.save()
    tracking.reopen_run(uri, state.parent_run_id)
    open_runs = [state.parent_run_id]
    try:
        todo = stages_to_run(cfg, bench, state)
        if group is not None:
            run_stages(cfg, bench, state, todo, group, listen, open_runs)
        elif todo:
            with WorkerGroup(cfg) as own:
                run_stages(cfg, bench, state, todo, own, listen, open_runs)
    except BaseException as err:
        for run_id in open_runs:
            tracking.end_run(uri, run_id, "KILLED" if isinstance(err, INTERRUPTED) else "FAILED", buffer)
        raise
    log_report(cfg, state.parent_run_id, f"{cfg.name}: stages compared",
               {name: record.run_id for name, record in state.stages.items()})
    tracking.end_run(uri, state.parent_run_id, buffer=buffer)
    if note := tracking.buffer_note(cfg):
        console.say(note)
    return state


def stages_to_run(cfg: Config, bench: Benchmark, state: PipelineState) -> list[str]:
    """The stages not done yet, in order (saying which are skipped)."""
    tracking.share_runs_view(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.eval.select, bench.table_columns)
    todo = []
    for name in cfg.stages:
        record = state.stages.get(name)
        if record is not None and record.done:
            console.say(f"[{name}] done earlier; skipping (checkpoint {record.checkpoint})")
        else:
            todo.append(name)
    return todo


def run_stages(cfg: Config, bench: Benchmark, state: PipelineState, todo: list[str], group: GroupClient,
               listen: Listen | None, open_runs: list[str]) -> None:
    """Each stage of `todo` in order on `group`. A stage's MLflow record (datasets, logged model, the end of its run:
    seconds in which the workers would otherwise wait) is written while the next stage trains; the stage is done
    once it is. `open_runs` lists the MLflow runs a failure must end."""
    previous: tuple[str, StageResult] | None = None  # a stage whose record is written while the next one trains
    try:
        for name in todo:
            running = group.submit(launch_stage(cfg, bench, state, name, open_runs))
            if previous is not None:
                finishing, previous = previous, None
                try:
                    finish_one_stage(cfg, bench, state, *finishing, open_runs)
                except BaseException:
                    running.cancel()
                    raise
            previous = name, wait_for_stage(cfg, bench, state, name, running, listen)
    finally:
        if previous is not None:
            finish_one_stage(cfg, bench, state, *previous, open_runs)


def launch_stage(cfg: Config, bench: Benchmark, state: PipelineState, name: str, open_runs: list[str]) -> Job:
    """Open (or reopen) the stage's MLflow run and log its params; the stage's job."""
    uri, stage = cfg.mlflow.tracking_uri, cfg.stages[name]
    record = state.stages.get(name)
    if record is None:
        tags = {"oodlab.stage": name, "oodlab.kind": stage.kind, "oodlab.method": method_tag(cfg, name),
                "oodlab.pipeline": cfg.name, "oodlab.benchmark": bench.name}
        record = StageRecord(tracking.start_run(uri, cfg.mlflow.experiment, f"{cfg.name}/{name}", tags,
                                                parent_run_id=state.parent_run_id))
        state.stages[name] = record
        state.save()
    else:
        tracking.reopen_run(uri, record.run_id)
    open_runs.append(record.run_id)
    job = Job(config=to_dict(cfg), stage=name, init=resolve_init(cfg, state, name),
              threshold=resolve_threshold(cfg, state, name), run_id=record.run_id, launched_at=time.time())
    stage_logger = tracking.RunLogger(uri, record.run_id, tracking.buffer_folder(cfg))
    stage_logger.params({f"stage.{k}": v for k, v in flatten(stage.model_dump(mode="json")).items()}
                        | {"stage.init_checkpoint": job.init, "stage.forget_threshold": job.threshold})
    if by_column := floors(bench, cfg.data.root):  # the pixel floor beside every OOD number
        stage_logger.metrics_once(floor.metrics(by_column), step=0)
    console.say(f"[{name}] starting ({stage.kind}, {method_tag(cfg, name)}) on {cfg.ray.num_workers} workers")
    return job


def wait_for_stage(cfg: Config, bench: Benchmark, state: PipelineState, name: str, running: PendingStage,
                   listen: Listen | None) -> StageResult:
    """The stage's result, its epochs shown meanwhile; record its checkpoint and metrics."""
    with progress.epoch_bar(cfg, name) as show:
        def on_epoch(epoch: Epoch) -> None:
            show(epoch)
            if listen is not None:
                listen(running.job, epoch)

        result = running.result(on_epoch)
    record = state.stages[name]
    record.checkpoint, record.metrics = result.checkpoint, result.metrics
    state.save()
    console.say(progress.evaluation_line(name, result.metrics, cfg.eval.select, bench.table_columns))
    return result


def finish_one_stage(cfg: Config, bench: Benchmark, state: PipelineState, name: str, result: StageResult,
                     open_runs: list[str]) -> None:
    """Log what a stage left to MLflow and end its run; then the stage is done, for a rerun to skip."""
    run_id = state.stages[name].run_id
    finish_stage(cfg, bench, name, run_id, result.checkpoint, result.metrics, state.parent_run_id)
    open_runs.remove(run_id)
    state.stages[name].done = True
    state.save()


def resolve_init(cfg: Config, state: PipelineState, name: str) -> str | None:
    """The model.pt a stage starts from: an earlier stage's last checkpoint, or a file given in the config."""
    init = cfg.stages[name].init
    if init is None:
        return None
    if init in cfg.stages:
        return str(checkpoint.model_file(state.stages[init].checkpoint))
    return str(checkpoint.model_file(init))


def resolve_threshold(cfg: Config, state: PipelineState, name: str) -> float | None:
    forget = getattr(cfg.stages[name], "forget", None)
    if forget is None:
        return None
    if forget.threshold is not None:
        return forget.threshold
    return float(state.stages[forget.estimate].metrics["forget_threshold"])


def results(state: PipelineState) -> dict[str, dict[str, Any]]:
    return {name: rec.metrics for name, rec in state.stages.items()}
