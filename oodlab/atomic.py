"""Atomic file writes: write beside the target under a hidden temp name, fsync, then rename into place.

The file is fsynced before the rename and its folder after it, so after a crash or power loss a reader
finds the old file or the complete new one, never a partial or empty one. A write that fills the disk raises
DiskFull naming the file and the space left, and leaves the old file as it was. Temp files of writers that
died (`.<name>.partial-<pid>` whose process is gone) are removed when the next write of that file starts.
`write_text` also takes a path under a URI (oodlab.storage), where an upload is all-or-nothing by itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from oodlab.errors import DiskFull, no_space
from oodlab.storage import RemotePath, StoragePath, location

PARTIAL = ".partial-"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `path` (durably), on error it is removed (a full disk:
    DiskFull)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except Exception as err:
        if no_space(err) and not isinstance(err, DiskFull):
            _discard(tmp)  # first: the message gives the space left without it
            raise DiskFull.at(path, "the file") from err
        raise
    finally:
        _discard(tmp)


def _discard(tmp: Path) -> None:
    if tmp.exists() and tmp.is_file():
        tmp.unlink()


def write_text(path: str | StoragePath, text: str) -> StoragePath:
    """Write a local file atomically; a file under a URI is one object upload, which appears whole."""
    path = location(path)
    if isinstance(path, RemotePath):
        path.write_text(text)
        return path
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def remove_stale_partials(path: Path) -> list[Path]:
    """Delete temp files of `path` left by writers whose process no longer exists; return them."""
    stale = []
    for partial in path.parent.glob(f".{path.name}{PARTIAL}*"):
        pid = partial.name.rpartition(PARTIAL)[2]
        if pid.isdigit() and not _alive(int(pid)):
            partial.unlink(missing_ok=True)
            stale.append(partial)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
