"""A durable local buffer for what a RunLogger could not send because the MLflow server did not answer.

One JSON-lines file per run, `<folder>/<run_id>.jsonl`: one record per call, in the order the calls were
made, each naming an operation (a function marked @replayable, called as `op(logger, **args)`) and its
JSON arguments; an artifact's file is copied beside it, under `<run_id>.files/`. Every change rewrites the
file atomically (fsynced, oodlab.atomic), so a crash leaves the old list or the new one, never a torn line.
The logger replays the records oldest first once the server answers again, dropping each one after it is
sent. Replaying is idempotent (metrics keep their original timestamps and MLflow drops exact duplicates;
params, tags, statuses and artifact paths are overwritten with the same values), so a crash between
sending a record and dropping it sends nothing twice.
"""

from __future__ import annotations

import importlib
import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

from oodlab.atomic import atomic_path, write_text

RECORDS_SUFFIX = ".jsonl"
PACKAGE = "oodlab."  # operations are looked up in this project's modules only


class ReplayError(Exception):
    """A buffered record the server refused for a reason other than being unreachable (it stays buffered)."""


def replayable(op: Callable[..., Any]) -> Callable[..., Any]:
    """Mark `op(logger, **json_args)` as an operation a buffer may hold and replay."""
    op.replayable = True
    return op


def op_name(op: Callable[..., Any]) -> str:
    return f"{op.__module__}:{op.__qualname__}"


def resolve(name: str) -> Callable[..., Any]:
    """The @replayable operation a record names."""
    module, _, attr = name.partition(":")
    op = getattr(importlib.import_module(module), attr, None) if module.startswith(PACKAGE) else None
    if not getattr(op, "replayable", False):
        raise ReplayError(f"{name!r} is not an operation the MLflow buffer replays")
    return op


def unreachable(err: BaseException) -> bool:
    """Whether `err`, or an error that led to it, says the server was not reached: refused, reset or timed-out
    connections, or server errors (5xx) that outlasted MLflow's retries. Anything else (bad input) is not."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout,
                              requests.exceptions.RetryError)):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


@dataclass
class Record:
    op: str  # see op_name
    args: dict[str, Any] = field(default_factory=dict)
    file: str | None = None  # its artifact's copy, relative to the run's files folder


class Buffer:
    """The records waiting for one run, under `folder`."""

    def __init__(self, folder: Path, run_id: str):
        self.folder = Path(folder)
        self.run_id = run_id
        self.path = self.folder / f"{run_id}{RECORDS_SUFFIX}"
        self.files = self.folder / f"{run_id}.files"

    def pending(self) -> bool:
        return self.path.is_file()

    def records(self) -> list[Record]:
        if not self.path.is_file():
            return []
        return [Record(**json.loads(line)) for line in self.path.read_text().splitlines() if line]

    def file(self, record: Record) -> Path | None:
        return None if record.file is None else self.files / record.file

    def append(self, op: str, args: dict[str, Any], file: Path | None = None) -> None:
        """Add a record at the end; `file` (an artifact) is copied into the buffer first."""
        kept = None
        if file is not None:
            kept = f"{uuid.uuid4().hex[:12]}/{file.name}"  # its own folder: the artifact keeps its name
            with atomic_path(self.files / kept) as tmp:
                shutil.copyfile(file, tmp)
        self._write([*self.records(), Record(op, args, kept)])

    def drop_first(self) -> None:
        """Remove the oldest record (it was sent) and its file; the buffer files go once nothing is left."""
        first, *rest = self.records()
        self._write(rest)
        if first.file is not None:
            shutil.rmtree(self.files / Path(first.file).parent, ignore_errors=True)
        if not rest:
            shutil.rmtree(self.files, ignore_errors=True)

    def _write(self, records: list[Record]) -> None:
        if records:
            write_text(self.path, "".join(json.dumps(asdict(r)) + "\n" for r in records))
        else:
            self.path.unlink(missing_ok=True)


def buffered_runs(folder: Path) -> dict[str, int]:
    """Run id -> how many records wait for it in `folder`."""
    run_ids = [p.name.removesuffix(RECORDS_SUFFIX) for p in sorted(Path(folder).glob(f"*{RECORDS_SUFFIX}"))]
    return {run_id: len(Buffer(folder, run_id).records()) for run_id in run_ids}
