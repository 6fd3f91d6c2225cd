"""The job protocol between a driver and its worker groups, as plain asyncio classes (Ray runs them as async actors:
`group.py`; tests/test_jobs.py tests them without Ray Train).

`JobBoard`, one per worker group. The driver posts stage jobs; the group's workers take them in the order posted
(`take` waits until the next one is posted); rank 0 hands back each epoch's result and then the job's outcome
(`StageResult`: its last checkpoint and metrics, or the error that stopped it), and the driver waits for them
(`events`). Every wait is an `asyncio.Condition`: nothing sleeps in a loop. Cancelling a job (the driver stopped
waiting, Ctrl-C, Tune stopping a trial) skips it if no worker took it yet; a running one ends at its next training
step, where rank 0 finds `until_cancelled` answered. When Ray Train restarts the group after a failure, its new
workers `start` at the job in progress, which resumes from its newest checkpoint.

`Leases`, one per sweep: which of its worker groups is lent to which trial. `acquire` waits for a free group.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

END = "end"  # what `take` hands out once the driver closed the board and there is no such job
SKIP = "skip"  # a job cancelled before any worker took it


@dataclass
class Job:
    """What the driver hands every worker of one stage."""

    config: dict[str, Any]
    stage: str
    init: str | None  # model.pt to start from (resolved by the pipeline)
    threshold: float | None  # resolved forgetting threshold, when the stage floors its loss
    run_id: str  # MLflow run of this stage
    launched_at: float = 0.0  # the driver's time.time() when it launched the stage


@dataclass(frozen=True)
class Epoch:
    """Rank 0's result of one epoch of a stage (the metrics it logs to MLflow)."""

    epoch: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class StageResult:
    """A job's outcome: the stage's last checkpoint folder and its metrics, or why it stopped without them."""

    checkpoint: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # a failure every rank saw and a retry would repeat (a NaN loss)
    cancelled: bool = False


@dataclass(frozen=True)
class News:
    """What `JobBoard.events` returns: a job's epochs after those the driver has seen, its outcome once there, and
    why the group's Ray Train run ended, once it has."""

    epochs: list[Epoch]
    result: StageResult | None
    ended: str | None


class Changes:
    """A condition to wait on until a predicate holds, and to notify after every change."""

    def __init__(self) -> None:
        self.condition = asyncio.Condition()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with self.condition:
            await self.condition.wait_for(predicate)

    async def notify(self) -> None:
        async with self.condition:
            self.condition.notify_all()


class JobBoard:
    """One worker group's jobs in the order posted, what rank 0 handed back of each, and which were cancelled."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.epochs: list[list[Epoch]] = []
        self.results: list[StageResult | None] = []
        self.cancelled: set[int] = set()
        self.closed = False
        self.ended: str | None = None  # why the group's Ray Train run ended, once it has
        self.changes = Changes()

    def finished(self) -> int:
        """How many jobs have their outcome: the workers run them in order, so the index of the one in progress."""
        return next((i for i, result in enumerate(self.results) if result is None), len(self.results))

    # -- the driver's side -------------------------------------------------------------------------------------
    async def post(self, job: Job) -> int:
        self.jobs.append(job)
        self.epochs.append([])
        self.results.append(None)
        await self.changes.notify()
        return len(self.jobs) - 1

    async def events(self, index: int, seen: int) -> News:
        """Wait until the index-th job has epochs after the first `seen`, its outcome, or the group's run ended."""
        await self.changes.until(lambda: len(self.epochs[index]) > seen or self.results[index] is not None
                                 or self.ended is not None)
        return News(self.epochs[index][seen:], self.results[index], self.ended)

    async def cancel(self, index: int) -> None:
        if self.results[index] is None:
            self.cancelled.add(index)
            await self.changes.notify()

    async def cancel_unfinished(self) -> None:
        """Cancel every job without an outcome (a trial's, when the sweep takes its group back)."""
        self.cancelled |= {i for i, result in enumerate(self.results) if result is None}
        await self.changes.notify()

    async def close(self) -> None:
        """No more jobs: the workers end their Ray Train run after the posted ones (unfinished ones are cancelled)."""
        self.closed = True
        await self.cancel_unfinished()

    async def end(self, why: str) -> None:
        """The group's Ray Train run ended: whoever waits for a job's outcome hears why."""
        self.ended = why
        await self.changes.notify()

    # -- the workers' side -------------------------------------------------------------------------------------
    def start(self) -> int:
        """Where a (re)started worker group begins: the job in progress."""
        return self.finished()

    async def take(self, index: int) -> Job | str:
        """The index-th job once posted; SKIP if it was cancelled, END once the board is closed without it."""
        await self.changes.until(lambda: index < len(self.jobs) or self.closed)
        if index >= len(self.jobs):
            return END
        return SKIP if index in self.cancelled else self.jobs[index]

    async def hand(self, index: int, epoch: Epoch) -> None:
        self.epochs[index].append(epoch)
        await self.changes.notify()

    async def finish(self, index: int, result: StageResult) -> None:
        self.results[index] = result
        await self.changes.notify()

    async def until_cancelled(self, index: int) -> bool:
        """Answers once the index-th job is cancelled (True) or has its outcome (False). Rank 0 keeps the call pending
        while the job runs and looks at it every step, without a round trip."""
        await self.changes.until(lambda: index in self.cancelled or self.results[index] is not None)
        return index in self.cancelled


class NoGroupLeft(RuntimeError):
    """Every worker group of the sweep ended (their errors were reported as they ended)."""


class Leases:
    """Which of a sweep's `size` worker groups is lent to whom (a holder is a trial id)."""

    def __init__(self, size: int) -> None:
        self.free = list(range(size))
        self.held: dict[str, int] = {}
        self.retired: set[int] = set()
        self.size = size
        self.changes = Changes()

    async def acquire(self, holder: str) -> int:
        """The index of a group for `holder`, once one is free (the one it holds already, if any)."""
        await self.changes.until(lambda: holder in self.held or bool(self.free) or len(self.retired) == self.size)
        if holder not in self.held:
            if not self.free:
                raise NoGroupLeft("every worker group of the sweep ended; see the errors above")
            self.held[holder] = self.free.pop(0)
        return self.held[holder]

    async def release(self, holder: str) -> int | None:
        """Take back the group `holder` holds; its index, or None if it holds none."""
        index = self.held.pop(holder, None)
        if index is not None and index not in self.retired:
            self.free.append(index)
            await self.changes.notify()
        return index

    async def retire(self, index: int) -> None:
        """The index-th group's run ended for good: lend it no more."""
        self.retired.add(index)
        if index in self.free:
            self.free.remove(index)
        await self.changes.notify()
