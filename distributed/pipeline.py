"""Run a config's stages in order, each a Ray Train run starting from the previous stage's checkpoint.

Progress lives in `<storage>/<name>/pipeline.json` (written atomically after every stage): rerunning
the same config skips finished stages and resumes an interrupted one from its last checkpoint. In
MLflow the pipeline is a parent run and each stage a child run tagged with its stage and method; the
parent also gets each stage's headline numbers and, at the end, `report.html` comparing the stages.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from oodlab import console
from oodlab.atomic import write_text
from oodlab.config import Config, TrainStage, flatten, to_dict
from oodlab.datapipes.benchmarks import for_config
from oodlab.distributed import checkpoint, progress, tracking
from oodlab.distributed.artifacts import finish_stage, log_report
from oodlab.distributed.launch import StageResult, fit
from oodlab.distributed.stages import TrainMethod
from oodlab.distributed.worker import Job


@dataclass
class StageRecord:
    run_id: str
    done: bool = False
    checkpoint: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class PipelineState:
    path: Path
    parent_run_id: str | None = None
    stages: dict[str, StageRecord] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> PipelineState:
        if not path.is_file():
            return cls(path)
        raw = json.loads(path.read_text())
        return cls(path, raw["parent_run_id"], {k: StageRecord(**v) for k, v in raw["stages"].items()})

    def save(self) -> None:
        raw = {"parent_run_id": self.parent_run_id, "stages": {k: asdict(v) for k, v in self.stages.items()}}
        write_text(self.path, json.dumps(raw, indent=1))


def state_path(cfg: Config) -> Path:
    return cfg.ray.storage_path / cfg.name / "pipeline.json"


def method_tag(cfg: Config, name: str) -> str:
    stage = cfg.stages[name]
    return TrainMethod(stage, threshold=0.0).tag if isinstance(stage, TrainStage) else stage.kind


def run(cfg: Config, restart: bool = False, launch: Callable[[Config, Job], StageResult] = fit,
        parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> PipelineState:
    """Run (or resume) every stage; return the final state with each stage's checkpoint and metrics.

    `launch` runs one stage (a sweep passes one that reports to Tune); `parent_run_id` nests this
    pipeline's MLflow run under another (a sweep's), `tags` are added to it.
    """
    bench = for_config(cfg)
    uri = cfg.mlflow.tracking_uri
    state = PipelineState(state_path(cfg)) if restart else PipelineState.load(state_path(cfg))
    if state.parent_run_id is None:
        run_tags = {"oodlab.kind": "pipeline", "oodlab.benchmark": bench.name, **(tags or {})}
        state.parent_run_id = tracking.start_run(uri, cfg.mlflow.experiment, cfg.name, run_tags, parent_run_id)
        parent = tracking.RunLogger(uri, state.parent_run_id)
        parent.params(flatten(to_dict(cfg)))
        parent.text(yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")
        state.save()
    groups = [*bench.groups, "all"]
    tracking.share_runs_view(uri, cfg.mlflow.experiment, cfg.eval.select, groups)
    for name, stage in cfg.stages.items():
        record = state.stages.get(name)
        if record is not None and record.done:
            console.say(f"[{name}] done earlier; skipping (checkpoint {record.checkpoint})")
            continue
        if record is None:
            tags = {"oodlab.stage": name, "oodlab.kind": stage.kind, "oodlab.method": method_tag(cfg, name),
                    "oodlab.pipeline": cfg.name, "oodlab.benchmark": bench.name}
            record = StageRecord(tracking.start_run(uri, cfg.mlflow.experiment, f"{cfg.name}/{name}", tags,
                                                    parent_run_id=state.parent_run_id))
            state.stages[name] = record
            state.save()
        job = Job(config=to_dict(cfg), stage=name, init=resolve_init(cfg, state, name),
                  threshold=resolve_threshold(cfg, state, name), run_id=record.run_id)
        stage_logger = tracking.RunLogger(uri, record.run_id)
        stage_logger.params({f"stage.{k}": v for k, v in flatten(stage.model_dump(mode="json")).items()}
                            | {"stage.init_checkpoint": job.init, "stage.forget_threshold": job.threshold})
        console.say(f"[{name}] starting ({stage.kind}, {method_tag(cfg, name)}) on {cfg.ray.num_workers} workers")
        with progress.epoch_bar(cfg, name, record.run_id):
            result = launch(cfg, job)
        record.done, record.checkpoint, record.metrics = True, result.checkpoint, result.metrics
        state.save()
        console.say(progress.evaluation_line(name, result.metrics, cfg.eval.select, groups))
        finish_stage(cfg, bench, name, record.run_id, result.checkpoint, result.metrics, state.parent_run_id)
    log_report(cfg, state.parent_run_id, f"{cfg.name}: stages compared",
               {name: record.run_id for name, record in state.stages.items()})
    tracking.end_run(uri, state.parent_run_id)
    return state


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
