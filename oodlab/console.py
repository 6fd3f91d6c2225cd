"""The terminal as the user sees it: product lines and progress bars; Ray's own output goes to a log file.

Ray prints a lot from many places: its Python loggers, every worker's stdout and stderr (forwarded to the
driver), C++ core warnings. `output_to(log_file)` points this process's file descriptors 1 and 2 at the
log file, so all of it lands there whatever its source, while `say` and `EpochBar` keep writing to the
terminal through a copy of the original stdout.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

_terminal: TextIO | None = None  # the user's stdout while everything else goes to a log file


def redirected() -> bool:
    """True while `output_to` is active: progress bars are wanted, Ray's chatter is in the log file."""
    return _terminal is not None


def say(text: str) -> None:
    """A line for the user (the terminal, also while Ray's output goes to a log file)."""
    print(text, file=_terminal or sys.stdout, flush=True)


@contextmanager
def output_to(log_file: Path) -> Iterator[None]:
    """Append everything written to stdout and stderr (fd 1 and 2) to `log_file`; `say` still reaches the terminal."""
    global _terminal
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    _terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding=sys.stdout.encoding, errors="replace")
    with open(log_file, "ab") as log:
        for fd in saved:
            os.dup2(log.fileno(), fd)
    try:
        yield
    except BaseException:
        _restore(saved)
        if log_file.stat().st_size:  # not for a config error found before Ray started
            print(f"oodlab: Ray's output of this run is in {log_file}", file=sys.stderr, flush=True)
        raise
    _restore(saved)


def _restore(saved: dict[int, int]) -> None:
    global _terminal
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, copy in saved.items():
        os.dup2(copy, fd)
        os.close(copy)
    _terminal.close()
    _terminal = None


class EpochBar:
    """Epochs of one stage: a live bar on a terminal, one line per epoch elsewhere (a pipe, a CI log)."""

    def __init__(self, name: str, total: int):
        self.name, self.total = name, total
        stream = _terminal or sys.stdout
        self.bar = (tqdm(total=total, desc=f"[{name}]", unit="epoch", file=stream, dynamic_ncols=True,
                         bar_format="{desc} {n_fmt}/{total_fmt} epochs |{bar:20}| {elapsed}<{remaining}{postfix}")
                    if stream.isatty() else None)

    def update(self, done: int, fields: str) -> None:
        if self.bar is None:
            say(f"[{self.name}] epoch {done}/{self.total}  {fields}")
            return
        self.bar.set_postfix_str(fields, refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
