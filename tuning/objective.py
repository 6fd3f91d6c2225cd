"""What Tune may see: validation metrics and training statistics only, and the objective made from them.

Workers evaluate every split each epoch (MLflow keeps the test-set curves), but a trial hands their
results to Tune through `tune_result`, which passes them through `validation_view` first: test-set keys (`id_acc`,
`ood/<score>/<test set|near|far|all>/...`) never reach Tune, its scheduler, its searcher or
`objective`, so test OOD data cannot influence which trial wins. The test sets are read for the best
trial only, after the sweep.

Objective: the configured validation metric; with `search.max_id_acc_drop`, a trial whose ID validation
accuracy fell more than that many points below its starting checkpoint's gets a penalised value
(worse than any admissible trial, ordered by the size of the violation). The starting accuracy is the
`id_val_acc` that oodlab saved in the starting checkpoint's meta.json (written at every evaluated
epoch), so it costs no extra evaluation; a foreign checkpoint without it is rejected before Ray starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oodlab.config import Config, ConfigError, SearchConfig
from oodlab.distributed.checkpoint import META, model_file, read_meta
from oodlab.distributed.jobs import Epoch
from oodlab.metrics import METRIC_NAMES
from oodlab.storage import StoragePath, location

TRAINING_KEYS = ("lr", "epoch_seconds")


def is_validation_metric(key: str) -> bool:
    parts = key.split("/")
    return key == "id_val_acc" or (len(parts) == 4 and parts[0] == "ood" and parts[2] == "val")


def tune_visible(key: str) -> bool:
    return is_validation_metric(key) or key.startswith("train/") or key in TRAINING_KEYS


def validation_view(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a worker's epoch result that Tune may see (an allowlist: anything new stays out)."""
    return {k: v for k, v in metrics.items() if tune_visible(k)}


def objective(view: Mapping[str, float], search: SearchConfig, reference: float | None) -> float:
    """The value Tune optimises, from a validation view; percent metrics, so 100 bounds the admissible ones."""
    value = float(view[search.metric])
    if search.max_id_acc_drop is None:
        return value
    excess = (reference - view["id_val_acc"]) - search.max_id_acc_drop
    if excess <= 0:
        return value
    return 100.0 + excess if search.mode == "min" else -excess


def tuned_stage(cfg: Config) -> str:
    """The stage whose per-epoch results reach Tune: search.stage, or the last train stage."""
    if cfg.search is not None and cfg.search.stage is not None:
        return cfg.search.stage
    return list(cfg.train_stages())[-1]


def reference_accuracy(model: str | StoragePath) -> float:
    """ID validation accuracy (percent) of a starting checkpoint, from the meta.json oodlab wrote beside it."""
    meta = location(model).parent / META
    found = read_meta(meta.parent).get("metrics", {}) if meta.is_file() else {}
    if "id_val_acc" not in found:
        raise ConfigError(
            f"search.max_id_acc_drop: the starting checkpoint {model} has no id_val_acc in {meta} (oodlab "
            "writes it at every evaluated epoch); start the tuned stage from an oodlab checkpoint or drop max_id_acc_drop")
    return float(found["id_val_acc"])


def check_objective(cfg: Config) -> None:
    """Fail before Ray starts if the objective could not be computed every evaluated epoch of every trial."""
    search, stage = cfg.search, tuned_stage(cfg)
    if search.metric != "id_val_acc":
        _, score, _, name = search.metric.split("/")
        if score not in cfg.eval.scores:
            raise ConfigError(f"search.metric: score '{score}' is not in eval.scores {cfg.eval.scores}, so it is not "
                              "evaluated every epoch; add it there")
        if name not in METRIC_NAMES:
            raise ConfigError(f"search.metric: unknown metric '{name}'; one of {', '.join(METRIC_NAMES)}")
    if search.max_id_acc_drop is not None:
        init = cfg.stages[stage].init
        if init is None:
            raise ConfigError(f"search.max_id_acc_drop: stage '{stage}' trains from scratch, so there is no starting "
                              "accuracy to compare with; set its init or drop max_id_acc_drop")
        if init not in cfg.stages:
            reference_accuracy(model_file(init))


def tune_result(epoch: Epoch, search: SearchConfig, reference: float | None) -> dict[str, Any] | None:
    """What Tune gets of an epoch rank 0 handed over: the validation view, the objective, and the epoch as
    `training_iteration`; None for an epoch without the metric (no OOD evaluation).

    `training_iteration` is the stage's epoch + 1, so ASHA's rungs stay in epochs when an interrupted trial
    resumes its stage from a checkpoint.
    """
    view = validation_view(epoch.metrics)
    if search.metric not in view:
        return None
    return view | {"objective": objective(view, search, reference), "training_iteration": epoch.epoch + 1}
