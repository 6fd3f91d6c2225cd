"""A pipeline's stages in one Ray Train run: the worker group starts once and runs stage after stage.

Starting a worker group costs tens of seconds per stage: Ray's worker processes, their imports (FFCV's alone
compiles numba code for seconds), the process group, FFCV's compiled pipelines. So `run` keeps one group for
the whole pipeline. Ray Train's `fit` runs in the driver's main thread (its Ctrl-C handling stays), and the
pipeline's stage loop runs beside it in a thread, handing the workers one stage job at a time through a
small actor, `Mailbox`. Every stage keeps its own MLflow run, checkpoints and resume rules: when Ray Train
restarts the group after a worker or node failure, the workers ask the mailbox for the stage in progress,
which resumes from its newest checkpoint.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from oodlab.config import Config
from oodlab.distributed.launch import StageResult, stage_result, trainer
from oodlab.distributed.worker import Job, train_loop_per_worker

POLL_S = 0.2
END = "end"  # what the mailbox hands out once the driver posts no more stages


@ray.remote(num_cpus=0)
class Mailbox:
    """Stage jobs in the order the driver posts them; rank 0 marks each one finished."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []
        self.finished = 0
        self.closed = False

    def post(self, job: dict[str, Any]) -> None:
        self.jobs.append(job)

    def close(self) -> None:
        self.closed = True

    def job(self, index: int) -> dict[str, Any] | str | None:
        """The index-th job; END once closed and there is no such job; None while it may still come."""
        if index < len(self.jobs):
            return self.jobs[index]
        return END if self.closed else None

    def finish(self, index: int) -> None:
        self.finished = max(self.finished, index + 1)

    def progress(self) -> int:
        """How many jobs have finished: the index of the one in progress."""
        return self.finished


class SessionEnded(Exception):
    """The Ray Train run ended (an error, Ctrl-C) while the driver waited for a stage."""


def stages_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point: run each posted stage with the per-stage worker loop, until the driver closes."""
    mailbox = config["mailbox"]
    index = ray.get(mailbox.progress.remote())  # after Ray Train restarted the group: the stage in progress
    while (job := take(mailbox, index)) is not None:
        train_loop_per_worker(job)
        if ray.train.get_context().get_world_rank() == 0:
            ray.get(mailbox.finish.remote(index))
        index += 1


def take(mailbox: Any, index: int) -> dict[str, Any] | None:
    """The index-th stage job once the driver posts it; None when it posts no more."""
    while (job := ray.get(mailbox.job.remote(index))) is None:
        time.sleep(POLL_S)
    return None if job == END else job


def run(cfg: Config, drive: Callable[[Callable[[Job], StageResult]], None]) -> None:
    """Run one Ray Train run while `drive` (the pipeline's stage loop, in a thread) hands it stages.

    `drive` gets a function that runs one stage's job on the worker group and returns the stage's result. An
    error in `drive` ends the run once the workers finish their stage, then is raised here; an error of the run
    itself (after Ray Train's retries) or Ctrl-C ends `drive` at its next wait.
    """
    here = ray.get_runtime_context().get_node_id()  # the mailbox lives with the driver, not on a worker node
    mailbox = Mailbox.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
    ended = threading.Event()
    failed: list[BaseException] = []
    posted = 0

    def run_stage(job: Job) -> StageResult:
        nonlocal posted
        ray.get(mailbox.post.remote(job.to_dict()))
        posted += 1
        while ray.get(mailbox.progress.remote()) < posted:
            if ended.wait(POLL_S):
                raise SessionEnded(f"the Ray Train run ended during stage {job.stage}")
        return stage_result(cfg, job.stage)

    def driver() -> None:
        try:
            drive(run_stage)
        except BaseException as err:  # raised in the main thread once the run has ended
            failed.append(err)
        finally:
            ray.get(mailbox.close.remote())

    thread = threading.Thread(target=driver, name="oodlab-stages", daemon=True)
    thread.start()
    try:
        result = trainer(cfg, {"mailbox": mailbox}, loop=stages_loop).fit()
    finally:
        ended.set()
        thread.join()
        ray.kill(mailbox)
    if result.error is not None:
        raise result.error
    if failed:
        raise failed[0]
