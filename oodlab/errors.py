"""Errors the CLI reports in one line, without a traceback (config errors live in oodlab.config)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from oodlab.limits import human_bytes

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full filesystem, or the user's quota on it


class StageFailed(RuntimeError):
    """A stage stopped by an error that a retry would repeat (a NaN loss): Ray does not retry it."""


class DiskFull(OSError):
    """A write stopped because its filesystem is full; the message names the path and the space left there.
    Nothing half-written is left where a rerun would read it (oodlab.atomic), so a rerun resumes once there is room."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC

    @classmethod
    def at(cls, path: str | Path, what: str) -> DiskFull:
        """The error for `what` (e.g. "checkpoint") that could not be written whole at `path`."""
        folder = Path(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        usage = shutil.disk_usage(folder)
        return cls(f"no space left on the device for {what} {path}: {human_bytes(usage.free)} free of "
                   f"{human_bytes(usage.total)} there (nothing half-written was kept); free "
                   "space (or move that folder to a larger disk) and rerun: it resumes from what was written whole")


def no_space(err: BaseException) -> bool:
    """Whether `err`, or an error that led to it, is a full filesystem (torch.save reports one as a RuntimeError)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False
