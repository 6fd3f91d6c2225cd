"""Worker groups that outlive a stage: one Ray Train run takes stage after stage from a driver.

Starting a worker group costs tens of seconds: Ray's worker processes, their imports (FFCV's alone compiles
numba code for seconds), the process group, FFCV's compiled pipelines. So `run` keeps one group for a whole
pipeline, and a sweep keeps a `Pool` of groups for all its trials. A driver posts stage jobs to a group's
`Mailbox` (a small actor); the group's workers (`stages_loop`) run them in order and hand back each epoch's
result, which a sweep trial forwards to Tune. Every stage keeps its own MLflow run, checkpoints and resume
rules: when Ray Train restarts a group after a worker or node failure, the workers ask the mailbox for the
job in progress, which resumes from its newest checkpoint.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from oodlab.config import Config
from oodlab.distributed.launch import StageResult, stage_result, trainer
from oodlab.distributed.worker import Job, train_loop_per_worker

POLL_S = 0.2
END = "end"  # what the mailbox hands out once the driver posts no more jobs
SKIP = "skip"  # a job cancelled before it started


@ray.remote(num_cpus=0)
class Mailbox:
    """One worker group's jobs in the order posted, the results rank 0 hands back, and who holds the group."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []
        self.results: list[list[dict[str, Any]]] = []
        self.cancelled: set[int] = set()
        self.finished = 0
        self.closed = False
        self.ended: str | None = None  # why the group's Ray Train run ended, once it has
        self.holder: str | None = None

    def post(self, job: dict[str, Any]) -> int:
        self.jobs.append(job)
        self.results.append([])
        return len(self.jobs) - 1

    def close(self) -> None:
        """No more jobs: the workers end their Ray Train run once the posted ones are done (cancelled ones stop
        after their epoch)."""
        self.closed = True
        self.cancel_unfinished()

    def end(self, why: str) -> None:
        self.ended = why

    def job(self, index: int) -> dict[str, Any] | str | None:
        """The index-th job (SKIP if cancelled); END once closed and there is no such job; None while it may come."""
        if index < len(self.jobs):
            return SKIP if index in self.cancelled else self.jobs[index]
        return END if self.closed else None

    def hand(self, index: int, result: dict[str, Any]) -> bool:
        """Rank 0's result of an epoch of the index-th job; whether that job is still wanted."""
        self.results[index].append(result)
        return index not in self.cancelled

    def finish(self, index: int) -> None:
        self.finished = max(self.finished, index + 1)

    def progress(self) -> int:
        """How many jobs have finished: the index of the one in progress."""
        return self.finished

    def status(self, index: int, seen: int) -> tuple[bool, list[dict[str, Any]], str | None]:
        """Whether the index-th job finished, its results after the first `seen`, and why the run ended (if so)."""
        return self.finished > index, self.results[index][seen:], self.ended

    def cancel(self, index: int) -> None:
        self.cancelled.add(index)

    def lease(self, holder: str) -> bool | None:
        """Hold the group for `holder` if it is free: True if now held, False if busy, None if its run ended."""
        if self.ended is not None:
            return None
        if self.holder not in (None, holder):
            return False
        self.holder = holder
        return True

    def release(self, holder: str) -> None:
        """Free the group if `holder` holds it, cancelling what it left unfinished (a trial Tune stopped)."""
        if self.holder == holder:
            self.cancel_unfinished()
            self.holder = None

    def cancel_unfinished(self) -> None:
        self.cancelled |= set(range(self.finished, len(self.jobs)))


def new_mailbox() -> Any:
    """A mailbox on the driver's node, not on a worker node that may be lost."""
    here = ray.get_runtime_context().get_node_id()
    return Mailbox.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()


class SessionEnded(Exception):
    """The worker group's Ray Train run ended (an error, Ctrl-C) while a driver waited for its stage."""


@dataclass
class MailboxChannel:
    """Rank 0's side of the mailbox for one job (`worker.Channel`)."""

    mailbox: Any
    index: int

    def hand(self, metrics: dict[str, float], epoch: int) -> bool:
        return ray.get(self.mailbox.hand.remote(self.index, {"epoch": epoch, "metrics": metrics}))


def stages_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point: run each posted job with the per-stage worker loop, until the mailbox closes."""
    mailbox = config["mailbox"]
    index = ray.get(mailbox.progress.remote())  # after Ray Train restarted the group: the job in progress
    while (job := take(mailbox, index)) != END:
        if job != SKIP:
            train_loop_per_worker(job, MailboxChannel(mailbox, index))
        if ray.train.get_context().get_world_rank() == 0:
            ray.get(mailbox.finish.remote(index))
        index += 1


def take(mailbox: Any, index: int) -> dict[str, Any] | str:
    """The index-th job once the driver posts it, SKIP or END."""
    while (job := ray.get(mailbox.job.remote(index))) is None:
        time.sleep(POLL_S)
    return job


def fit_group(cfg: Config, mailbox: Any, name: str | None = None) -> None:
    """Run a worker group on the jobs of `mailbox` until it closes (Ray Train's `fit`; raises its error)."""
    trainer(cfg, {"mailbox": mailbox}, loop=stages_loop, name=name).fit()


def run_job(mailbox: Any, cfg: Config, job: Job,
            forward: Callable[[dict[str, Any]], None] | None = None) -> StageResult:
    """Post a stage's job, wait until the group has run it, return its result. `forward` gets each epoch's
    result ({"epoch", "metrics"}) as rank 0 hands it over. If the wait ends by an error (Tune stopping a trial
    included), the job is cancelled: the workers stop after their epoch."""
    index = ray.get(mailbox.post.remote(job.to_dict()))
    seen = 0
    try:
        while True:
            finished, results, ended = ray.get(mailbox.status.remote(index, seen))
            seen += len(results)
            for result in results if forward else []:
                forward(result)
            if finished:
                return stage_result(cfg, job.stage)
            if ended is not None:
                raise SessionEnded(f"stage {job.stage}: {ended}")
            time.sleep(POLL_S)
    except BaseException:
        mailbox.cancel.remote(index)
        raise


def run(cfg: Config, drive: Callable[[Callable[[Job], StageResult]], None]) -> None:
    """One Ray Train run for a pipeline, while `drive` (its stage loop, in a thread) hands it stages.

    Ray Train's `fit` stays in the main thread, which keeps its Ctrl-C handling. `drive` gets a function that
    runs one stage's job on the worker group and returns the stage's result. An error in `drive` cancels the
    stage in progress (the workers stop after their epoch) and ends the run, then is raised here; an error of
    the run itself (after Ray Train's retries) or Ctrl-C ends `drive` at its next wait.
    """
    mailbox = new_mailbox()
    failed: list[BaseException] = []

    def driver() -> None:
        try:
            drive(lambda job: run_job(mailbox, cfg, job))
        except BaseException as err:  # raised in the main thread once the run has ended
            failed.append(err)
        finally:
            ray.get(mailbox.close.remote())

    thread = threading.Thread(target=driver, name="oodlab-stages", daemon=True)
    thread.start()
    try:
        fit_group(cfg, mailbox)
    finally:
        ray.get(mailbox.end.remote("the Ray Train run ended"))
        thread.join()
        ray.kill(mailbox)
    if failed:
        raise failed[0]


class Pool:
    """`size` worker groups for a sweep, each a Ray Train run in a driver thread: a trial leases one (`lease`)
    and runs its stages there, so only the first trial on each group pays for starting it.

    The open pools of this process are found by name in `Pool.open` (Tune restores its callbacks from a
    pickle, which cannot hold a pool)."""

    open: dict[str, Pool] = {}

    def __init__(self, cfg: Config, size: int):
        self.name = cfg.name
        self.mailboxes = [new_mailbox() for _ in range(size)]
        self.threads = [threading.Thread(target=self.keep, args=(cfg, f"{cfg.name}.worker-group-{k}", mailbox),
                                         name=f"oodlab-group-{k}", daemon=True)
                        for k, mailbox in enumerate(self.mailboxes)]
        for thread in self.threads:
            thread.start()
        Pool.open[self.name] = self

    @staticmethod
    def keep(cfg: Config, name: str, mailbox: Any) -> None:
        """Run the group until its mailbox closes; if its run fails for good (after Ray Train's retries), say so
        to whoever waits on it."""
        why = "the worker group's Ray Train run ended"
        try:
            fit_group(cfg, mailbox, name)
        except Exception as err:
            why = f"the worker group's Ray Train run failed: {type(err).__name__}: {err}"
        ray.get(mailbox.end.remote(why))

    def release(self, holder: str) -> None:
        """Free whatever group `holder` still holds (a trial whose actor Tune killed)."""
        ray.get([mailbox.release.remote(holder) for mailbox in self.mailboxes])

    def close(self, wait: bool = True) -> None:
        """Close every group (unfinished jobs are cancelled); with `wait`, until their runs end."""
        Pool.open.pop(self.name, None)
        ray.get([mailbox.close.remote() for mailbox in self.mailboxes])
        for thread in self.threads if wait else []:
            thread.join()


def lease(mailboxes: list[Any], holder: str) -> Any:
    """A pool's mailbox held for `holder`, once one is free; SessionEnded if every group's run has ended."""
    while True:
        answers = []
        for mailbox in mailboxes:
            answers.append(ray.get(mailbox.lease.remote(holder)))
            if answers[-1]:
                return mailbox
        if all(answer is None for answer in answers):
            raise SessionEnded("every worker group of the sweep ended; see the errors above")
        time.sleep(POLL_S)
