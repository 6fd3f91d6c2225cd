"""What gets attached to MLflow runs: rank 0's artifacts on a stage's run after its final evaluation; the
driver's record of a finished stage (datasets, final model, headline numbers on the pipeline's run); and
the driver's `report.html` on a pipeline's or a sweep's run (one self-contained page that MLflow's
artifact viewer renders: tables, and every figure inline as a PNG data URI).

The epoch curve, the stage record and the report read runs back from MLflow, so each is one replayable
operation of a RunLogger: while the server is away it waits in the run's buffer behind the metrics it
reads, and runs when they have been sent (see tracking_buffer)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from oodlab.config import Config, EvalConfig, TrainStage, to_dict
from oodlab.datapipes.benchmarks import Benchmark, floors, get_benchmark
from oodlab.distributed import checkpoint, tracking
from oodlab.distributed.evaluate import VAL, Evaluation
from oodlab.distributed.tracking import RunLogger
from oodlab.distributed.tracking_buffer import replayable
from oodlab.models import create_model
from oodlab.plots import epoch_curve_figure, histogram_figure, roc_figure
from oodlab.report import (FLOOR_NOTE, html_images, html_page, html_pre, html_table, metrics_csv, metrics_markdown,
                           score_table)

REPORT = "report.html"


def log_final_artifacts(log: RunLogger | None, ev: Evaluation | None, bench: Benchmark, root: Path,
                        eval_cfg: EvalConfig, epoch: int | None) -> None:
    """Metrics table (CSV + markdown), ROC curves and score histograms per score, cached scores (npz),
    and for training runs the per-epoch OOD curve with the best-OOD (validation) and final epochs marked."""
    if log is None or ev is None:
        return
    run = log.run_name()
    columns = [*bench.ood_test, *bench.table_columns, VAL]
    log.text(metrics_csv(ev.metrics, ev.id_acc), "metrics.csv")
    log.text(metrics_markdown(ev.metrics, ev.id_acc, columns, floors(bench, root)), "metrics.md")
    for score, per_split in ev.scores.items():
        log.figure(roc_figure(run, score, ev.roc_curves(score, list(bench.ood_test))), f"roc_{score}.png")
        log.figure(histogram_figure(run, score, per_split["id_test"], {s: per_split[s] for s in bench.ood_test}),
                   f"hist_{score}.png")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scores.npz"
        np.savez_compressed(path, **{f"{score}/{split}": v for score, d in ev.scores.items() for split, v in d.items()})
        log.artifact(path)
    if epoch is not None:
        log.send(log_epoch_curve, select=eval_cfg.select, max_acc_drop=eval_cfg.best_epoch_max_acc_drop)


def best_ood_epoch(val_fpr95: Sequence[tuple[int, float]], id_val_acc: Sequence[tuple[int, float]],
                   max_acc_drop: float) -> int:
    """The epoch of lowest OOD-validation FPR95 among those whose ID validation accuracy is within `max_acc_drop`
    points of the best epoch's (so an early epoch that rejects OOD data by knowing nothing is never picked)."""
    acc = dict(id_val_acc)
    floor = max(acc.values(), default=-np.inf) - max_acc_drop
    eligible = [(epoch, value) for epoch, value in val_fpr95 if acc.get(epoch, -np.inf) >= floor]
    return min(eligible or val_fpr95, key=lambda point: point[1])[0]


@replayable
def log_epoch_curve(log: RunLogger, select: str, max_acc_drop: float) -> dict[str, int]:
    """Plot fpr95 (validation and test) and ID accuracy (validation and test) per epoch; mark the best-OOD epoch
    on validation among the epochs that kept ID validation accuracy, and the final one."""
    keys = {f"{select} fpr95 (OOD val)": f"ood/{select}/{VAL}/fpr95", f"{select} fpr95 (test, all)": f"ood/{select}/all/fpr95",
            "id_val_acc": "id_val_acc", "id_acc (test)": "id_acc"}
    history = {label: [(m.step + 1, m.value) for m in sorted(log.client.get_metric_history(log.run_id, key), key=lambda m: m.step)]
               for label, key in keys.items()}
    val = history[f"{select} fpr95 (OOD val)"]
    if not val:
        return {}
    best = best_ood_epoch(val, history["id_val_acc"], max_acc_drop)
    marks = {f"best OOD (val), ID val acc within {max_acc_drop:g} pts of best": best, "final": val[-1][0]}
    log.metrics_once({"best_ood_epoch": best}, step=val[-1][0] - 1)
    log.figure(epoch_curve_figure(log.run_name(), select, history, marks), "epoch_curve.png")
    return marks


def finish_stage(cfg: Config, bench: Benchmark, stage: str, run_id: str, checkpoint_dir: str | None,
                 metrics: Mapping[str, float], pipeline_run_id: str) -> None:
    """Record a finished stage, then end its run: every split as a dataset input, a training stage's final model as
    an MLflow model at its last epoch, and the stage's headline numbers on the pipeline's run."""
    headline = tracking.stage_headline(stage, metrics, cfg.eval.select, bench.table_columns)
    folder = tracking.buffer_folder(cfg)
    RunLogger(cfg.mlflow.tracking_uri, pipeline_run_id, folder).metrics(headline, step=0)
    RunLogger(cfg.mlflow.tracking_uri, run_id, folder).send(record_stage, config=to_dict(cfg), stage=stage,
                                                             checkpoint_dir=checkpoint_dir)


@replayable
def record_stage(log: RunLogger, config: dict, stage: str, checkpoint_dir: str | None) -> None:
    """finish_stage's record on the stage's run (which it ends FINISHED): datasets, and the final model."""
    cfg = Config.model_validate(config)
    bench = get_benchmark(cfg.data.benchmark, cfg.data.root)
    with tracking.active_run(log.tracking_uri, log.run_id):
        tracking.log_datasets(bench, cfg.data.root)
        if isinstance(cfg.stages[stage], TrainStage) and checkpoint_dir is not None:
            m = cfg.model
            model = create_model(m.name, bench.num_classes, pretrained=False, **m.kwargs).eval()
            model.load_state_dict(checkpoint.load(checkpoint.model_file(checkpoint_dir)))
            example = np.zeros((1, 3, bench.image_size, bench.image_size), np.float32)
            epoch = checkpoint.read_meta(checkpoint_dir)["epoch"]
            tracking.log_model(model, f"{cfg.name}-{stage}", epoch, example)


def log_report(cfg: Config, run_id: str, title: str, models: Mapping[str, str],
               extra: Sequence[tuple[str, str]] = ()) -> None:
    """`report.html` on `run_id`: `extra` sections, then for the models (name -> MLflow run) one comparison table per
    score (ID accuracy, FPR95 and AUROC per OOD set, group and the validation split), the forgetting thresholds,
    each model's ROC curves and histograms of the selected score and its per-epoch curves, and the config."""
    RunLogger(cfg.mlflow.tracking_uri, run_id, tracking.buffer_folder(cfg)).send(
        write_report, config=to_dict(cfg), title=title, models=dict(models), extra=[list(e) for e in extra])


@replayable
def write_report(log: RunLogger, config: dict, title: str, models: Mapping[str, str],
                 extra: Sequence[Sequence[str]]) -> None:
    """log_report's page, once what the models' runs have waiting in the same buffer folder has been sent."""
    if log.buffer is not None:
        for model_run in models.values():
            if not RunLogger(log.tracking_uri, model_run, log.buffer.folder).flush():
                raise ConnectionError(f"run {model_run} has records waiting that the server did not take")
    cfg = Config.model_validate(config)
    client = log.client
    runs = {name: client.get_run(model_run) for name, model_run in models.items()}
    bench = get_benchmark(cfg.data.benchmark)
    scored = {name: run.data.metrics for name, run in runs.items() if "id_acc" in run.data.metrics}
    select = cfg.eval.select
    columns = [*bench.ood_test, *bench.table_columns, VAL]
    scores = [s for s in dict.fromkeys([select, *cfg.eval.final_scores, *cfg.eval.scores])
              if any(f"ood/{s}/all/auroc" in m for m in scored.values())]
    sections = [*extra]
    by_column = floors(bench, cfg.data.root)
    sections += [(f"Score {score}", score_table(scored, score, columns, by_column)) for score in scores]
    thresholds = forgetting_thresholds(runs)
    if thresholds:
        sections.append(("Forgetting threshold", html_table(["run", "threshold (train CE)", "what"], thresholds)))
    sections.append((f"Plots of the {select} score", html_images(stage_plots(client, runs, select))))
    sections.append(("Config", html_pre(yaml.safe_dump(to_dict(cfg), sort_keys=False))))
    intro = (f"Benchmark {bench.name}. Percent; fpr95: OOD samples accepted at 95% ID recall (ID positive, lower is "
             f"better); auroc: higher is better; the best value of each column in bold; {VAL}: the OOD validation "
             f"split (what selection may use), all other OOD columns are test sets; {FLOOR_NOTE}.")
    if bench.outside_all:
        intro += f" Reported on their own, not in all: {', '.join(bench.outside_all)}."
    if bench.val_overlaps:
        intro += (f" Marked: {', '.join(bench.val_overlaps)} shares data with the OOD validation split (declared in "
                  "the benchmark), so tuning may flatter it; it is left out of every group average and of all.")
    log.text(html_page(title, intro, sections), REPORT)


def forgetting_thresholds(runs: Mapping[str, Run]) -> list[list[str]]:
    """Measured thresholds (estimate stages) and the loss floors the training stages used."""
    rows = []
    for name, run in runs.items():
        if "forget_threshold" in run.data.metrics:
            rows.append([name, f"{run.data.metrics['forget_threshold']:.4f}", "measured: mean train CE of the init "
                         "model under a random mask"])
        if run.data.params.get("stage.forget_threshold", "None") != "None":
            floor = float(run.data.params["stage.forget_threshold"])
            rows.append([name, f"{floor:.4f}", "the loss floor it trained with"])
    return rows


def stage_plots(client: MlflowClient, runs: Mapping[str, Run], select: str) -> list[tuple[str, bytes]]:
    """Each run's ROC curves and score histogram of `select`, and its per-epoch curve, as (caption, PNG)."""
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in runs.items():
            if not any(a.path == "plots" for a in client.list_artifacts(run.info.run_id)):
                continue
            folder = Path(client.download_artifacts(run.info.run_id, "plots", str(Path(tmp) / run.info.run_id)))
            for file, what in ((f"roc_{select}.png", "ROC"), (f"hist_{select}.png", "histogram"),
                               ("epoch_curve.png", "per epoch")):
                if (folder / file).is_file():
                    found.append((f"{name}: {what}", (folder / file).read_bytes()))
    return found
