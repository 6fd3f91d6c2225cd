"""What the terminal shows of a running pipeline: a line per stage start, an epoch bar per training stage
(fed from the stage's MLflow run while Ray trains it), and a line with each stage's evaluation.

Rank 0 logs every epoch's metrics to the stage's run; a driver thread reads the run once a second and
moves the bar. Bars only run while the CLI sends Ray's output to a log file (`console.output_to`): not in
a sweep's trials, nor with --verbose, where Ray's own lines (the workers' epoch lines among them) scroll by.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from oodlab import console
from oodlab.config import Config, TrainStage
from oodlab.distributed import tracking
from oodlab.distributed.evaluate import VAL

POLL_S = 1.0
EPOCH_KEY = "train/loss"  # logged once per epoch by every training stage


def epoch_fields(metrics: Mapping[str, float], select: str) -> str:
    """The latest loss, ID test accuracy and validation FPR95 of the selected score (those logged so far)."""
    named = (("loss", "train/loss", "{:.3f}"), ("id_acc", "id_acc", "{:.1f}"),
             (f"{select} val fpr95", f"ood/{select}/{VAL}/fpr95", "{:.1f}"))
    return "  ".join(f"{label} {fmt.format(metrics[key])}" for label, key, fmt in named if key in metrics)


def evaluation_line(stage: str, metrics: Mapping[str, float], select: str, groups: Sequence[str]) -> str:
    """A finished stage's result in one line: ID accuracy and the selected score's AUROC / FPR95 per group."""
    if "id_acc" not in metrics:
        threshold = metrics.get("forget_threshold")
        return f"[{stage}] done" + (f": forgetting threshold {threshold:.4f}" if threshold is not None else "")
    per_group = {m: " ".join(f"{g} {metrics.get(f'ood/{select}/{g}/{m}', float('nan')):.1f}" for g in groups)
                 for m in ("auroc", "fpr95")}
    return (f"[{stage}] done: id_acc {metrics['id_acc']:.2f}  {select} auroc {per_group['auroc']}  "
            f"fpr95 {per_group['fpr95']}")


@contextmanager
def epoch_bar(cfg: Config, stage: str, run_id: str) -> Iterator[None]:
    """While the block runs a training stage, show its epochs on the terminal (when Ray's output is redirected)."""
    spec = cfg.stages[stage]
    if not console.redirected() or not isinstance(spec, TrainStage):
        yield
        return
    bar = console.EpochBar(stage, spec.epochs)
    stop = threading.Event()
    reader = threading.Thread(target=_follow, args=(tracking.client(cfg.mlflow.tracking_uri), run_id, cfg.eval.select,
                                                    bar, stop), daemon=True)
    reader.start()
    try:
        yield
    finally:
        stop.set()
        reader.join()
        bar.close()


def _follow(client: MlflowClient, run_id: str, select: str, bar: console.EpochBar, stop: threading.Event) -> None:
    """Move `bar` whenever the run has a new epoch; one last look after `stop`."""
    seen = 0
    while True:
        stopping = stop.wait(POLL_S)
        try:
            epochs = {m.step for m in client.get_metric_history(run_id, EPOCH_KEY)}
            if len(epochs) > seen:
                seen = len(epochs)
                bar.update(max(epochs) + 1, epoch_fields(client.get_run(run_id).data.metrics, select))
        except MlflowException:  # the store is busy (sqlite): try again next time
            pass
        if stopping:
            return
