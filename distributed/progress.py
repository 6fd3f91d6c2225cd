"""What the terminal shows of a running pipeline: a line per stage start, an epoch bar per training stage
(moved by each epoch's result as rank 0 hands it to the driver), and a line with each stage's evaluation.

Bars only run while the CLI sends Ray's output to a log file (`console.output_to`): not in a sweep's trials,
nor with --verbose, where Ray's own lines (the workers' epoch lines among them) scroll by.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from oodlab import console
from oodlab.config import Config, TrainStage
from oodlab.distributed.evaluate import VAL
from oodlab.distributed.jobs import Epoch


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
def epoch_bar(cfg: Config, stage: str) -> Iterator[Callable[[Epoch], None]]:
    """While the block runs a stage, what to call with each of its epochs: a training stage's bar on the terminal
    (when Ray's output is redirected), else nothing."""
    spec = cfg.stages[stage]
    if not console.redirected() or not isinstance(spec, TrainStage):
        yield lambda epoch: None
        return
    bar = console.EpochBar(stage, spec.epochs)
    latest: dict[str, float] = {}  # every metric's latest value (an epoch without evaluation has no id_acc)

    def show(epoch: Epoch) -> None:
        latest.update(epoch.metrics)
        bar.update(epoch.epoch + 1, epoch_fields(latest, cfg.eval.select))

    try:
        yield show
    finally:
        bar.close()
