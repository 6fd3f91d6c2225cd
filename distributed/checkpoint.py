"""Checkpoints: plain files any torch (and timm) user can read, written atomically, loaded weights-only.

A checkpoint directory holds:
  model.pt        dense state_dict (masks baked in: W * M) that `timm.create_model(...).load_state_dict` takes
  train_state.pt  what resuming this stage needs: full model state (mask scores too), optimizer, scheduler
  meta.json       stage, epoch, metrics
Rank 0 writes it into the pipeline's run folder (`run_dir`: a local folder or a URI, through oodlab.storage)
under `<stage>_epoch_NNNN`. Ray Train is not handed the checkpoint: oodlab resumes from the files, and a
pool of worker groups (a sweep's) writes each trial's checkpoints into that trial's own folder. A checkpoint
that does not fit on its disk raises DiskFull (naming it and the space left) and leaves nothing behind.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from oodlab.atomic import atomic_path, fsync, write_text
from oodlab.config import Config
from oodlab.errors import DiskFull
from oodlab.storage import RemotePath, StoragePath, location, remove, upload

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


def write(cfg: Config, stage: str, epoch: int, model_state: dict[str, torch.Tensor] | None, meta: dict[str, Any],
          train_state: dict[str, Any] | None = None) -> StoragePath:
    """Write one epoch's checkpoint folder into the run folder, where readers find it whole or not at all.

    Locally it is built beside its final name and renamed into place. Under a URI its files are uploaded with
    meta.json last: `newest_training_state` skips a folder without it, or whose files do not load.
    """
    target = run_dir(cfg) / dir_name(stage, epoch)
    if isinstance(target, RemotePath):
        with tempfile.TemporaryDirectory() as tmp:
            for file in sorted(save(Path(tmp), model_state, meta, train_state).iterdir(), key=lambda f: f.name == META):
                upload(file, target / file.name)
        return target
    for stale in target.parent.glob(f".{target.name}.partial-*"):  # left by a writer that died
        remove(stale)
    building = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        save(building, model_state, meta, train_state)
    except DiskFull:
        remove(building)
        raise DiskFull.at(target, "checkpoint") from None
    remove(target)  # an incomplete copy of the same epoch, written before a failure
    os.replace(building, target)
    fsync(target.parent)
    return target


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
    """A pipeline's checkpoints, `<ray.storage_path>/<name>.stages`: one folder for every stage (each checkpoint
    folder is named after its stage); Ray Train's run state too, when the pipeline is its own Ray Train run."""
    return cfg.ray.storage_path / f"{cfg.name}.stages"


def dir_name(stage: str, epoch: int) -> str:
    return f"{stage}_epoch_{epoch:04d}"


def newest_first(cfg: Config, stage: str) -> list[StoragePath]:
    """The stage's checkpoint folders in the pipeline's run folder, the newest first."""
    return sorted(run_dir(cfg).glob(f"{stage}_epoch_*"), reverse=True)


def prune(cfg: Config, stage: str) -> None:
    """Delete the stage's checkpoints beyond the newest `checkpoint.keep_last` (counted per stage: later stages
    start from the last checkpoint of earlier ones)."""
    keep = cfg.checkpoint.keep_last
    for old in newest_first(cfg, stage)[keep:] if keep else []:
        remove(old)


def newest_training_state(cfg: Config, stage: str) -> tuple[StoragePath, dict[str, Any], dict[str, Any]] | None:
    """(folder, train_state, meta) of the stage's newest complete checkpoint in the run folder, or None.

    A checkpoint whose files do not load (an upload cut short) is skipped.
    """
    for path in newest_first(cfg, stage):
        try:
            return path, load(path / TRAIN_STATE), read_meta(path)
        except (OSError, RuntimeError, ValueError, EOFError):
            continue
    return None


def _save_tensor_file(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: torch's error then says why it failed
        torch.save(state, f)
