"""Checkpoints: plain files any torch (and timm) user can read, written atomically, loaded weights-only.

A checkpoint directory holds:
  model.pt        dense state_dict (masks baked in: W * M) that `timm.create_model(...).load_state_dict` takes
  train_state.pt  what resuming this stage needs: full model state (mask scores too), optimizer, scheduler
  meta.json       stage, epoch, metrics
Ray Train copies the directory into its run storage (a local folder or a URI: oodlab.storage reads both).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from oodlab.atomic import atomic_path, write_text
from oodlab.config import Config
from oodlab.storage import StoragePath, location, remove

MODEL = "model.pt"
TRAIN_STATE = "train_state.pt"
META = "meta.json"


def save(directory: Path, model_state: dict[str, torch.Tensor] | None, meta: dict[str, Any],
         train_state: dict[str, Any] | None = None) -> Path:
    """Write the files that are given (a stage without a model, like estimate, writes only meta.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    if model_state is not None:
        _save_tensor_file(directory / MODEL, model_state)
    if train_state is not None:
        _save_tensor_file(directory / TRAIN_STATE, train_state)
    write_text(directory / META, json.dumps(meta, indent=1, default=float))
    return directory


def load(path: str | StoragePath) -> dict[str, Any]:
    """Load a .pt file, local or under a URI, safely (weights_only=True: tensors and plain containers, no code)."""
    path = location(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    source = path if isinstance(path, Path) else io.BytesIO(path.read_bytes())
    return torch.load(source, map_location="cpu", weights_only=True)


def model_file(path: str | StoragePath) -> StoragePath:
    """A checkpoint given as a directory or as its model.pt (local or under a URI) -> the model.pt (must exist)."""
    path = location(path)
    found = path / MODEL if path.is_dir() else path
    if not found.is_file():
        raise FileNotFoundError(f"checkpoint {found} does not exist; a missing checkpoint is an error, never a random init")
    return found


def read_meta(directory: str | StoragePath) -> dict[str, Any]:
    return json.loads((location(directory) / META).read_text())


def run_dir(cfg: Config) -> StoragePath:
    """Where Ray Train keeps a pipeline's checkpoints and run state: `<ray.storage_path>/<name>.stages`, one folder
    for every stage (one Ray Train run for all of them; each checkpoint folder is named after its stage)."""
    return cfg.ray.storage_path / f"{cfg.name}.stages"


def stage_error_file(cfg: Config, stage: str) -> StoragePath:
    """Where rank 0 leaves the error that stopped a stage for good (the driver raises it)."""
    return run_dir(cfg) / f"{stage}.error.txt"


def dir_name(stage: str, epoch: int) -> str:
    return f"{stage}_epoch_{epoch:04d}"


def newest_first(cfg: Config, stage: str) -> list[StoragePath]:
    """The stage's checkpoint folders in the pipeline's Ray run folder, the newest first."""
    return sorted(run_dir(cfg).glob(f"{stage}_epoch_*"), reverse=True)


def prune(cfg: Config, stage: str) -> None:
    """Delete the stage's checkpoints beyond the newest `checkpoint.keep_last` (Ray Train keeps every one: its own
    count would span all the stages of the run and delete the checkpoints later stages start from)."""
    keep = cfg.checkpoint.keep_last
    for old in newest_first(cfg, stage)[keep:] if keep else []:
        remove(old)


def newest_dir(cfg: Config, stage: str) -> StoragePath | None:
    """The stage's newest checkpoint folder with its meta.json, or None: once the stage ended, its final
    checkpoint, whether or not Ray registered it (see newest_training_state)."""
    return next((p for p in newest_first(cfg, stage) if (p / META).is_file()), None)


def newest_training_state(cfg: Config, stage: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(train_state, meta) of the stage's newest complete checkpoint in the Ray run folder, or None.

    Read from storage rather than from `ray.train.get_checkpoint()`: a checkpoint is complete once its files are
    there, but Ray Train registers it only when its controller next polls the workers, so after a worker dies
    Ray may hand back the one before. A checkpoint whose files are incomplete (a copy cut short) is skipped.
    """
    for path in newest_first(cfg, stage):
        try:
            return load(path / TRAIN_STATE), read_meta(path)
        except (OSError, RuntimeError, ValueError, EOFError):
            continue
    return None


def _save_tensor_file(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
