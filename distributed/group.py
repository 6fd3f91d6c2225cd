"""Worker groups that outlive a stage: one Ray Train run takes stage after stage from its driver.

Starting a worker group costs tens of seconds: Ray's worker processes, their imports (FFCV's alone compiles numba
code for seconds), the process group, FFCV's compiled pipelines. So `oodlab train` keeps one group for a whole
pipeline, and a sweep a `GroupPool` of them for all its trials:

    with WorkerGroup(cfg) as group:
        result = group.run(job)  # the stage's StageResult; its error raised

The group's `JobBoard` (jobs.py) is an async actor on the driver's node; the group's workers (`worker.serve`) take
its jobs in order. `run` blocks on the board until the job's outcome (calling `on_epoch` with each epoch rank 0
hands back), and cancels the job if the wait ends by an error (Ctrl-C included): the workers stop at their next
step. Every stage keeps its own MLflow run, checkpoints and resume rules: when Ray Train restarts a group after a
worker or node failure, its workers take the job in progress again, which resumes from its newest checkpoint.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from oodlab.config import Config
from oodlab.errors import StageFailed
from oodlab.distributed import checkpoint
from oodlab.distributed.jobs import Epoch, Job, JobBoard, Leases, StageResult
from oodlab.distributed.launch import trainer
from oodlab.distributed.worker import serve

OnEpoch = Callable[[Epoch], None]


class GroupEnded(Exception):
    """The worker group's Ray Train run ended (for good, after Ray Train's retries) before the stage's outcome."""


class JobCancelled(Exception):
    """The stage was cancelled by someone else (the sweep took a trial's group back) while its driver waited."""


def on_this_node(actor: type, *args: Any) -> Any:
    """`actor` as a Ray async actor on the driver's node, not on a worker node that may be lost."""
    here = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(here, soft=False)
    return ray.remote(num_cpus=0)(actor).options(scheduling_strategy=strategy).remote(*args)


@dataclass(frozen=True)
class PendingStage:
    """A posted job: wait for its result, or cancel it."""

    board: Any
    index: int
    job: Job

    def result(self, on_epoch: OnEpoch | None = None) -> StageResult:
        """Block until the job's outcome; `on_epoch` gets each epoch's result as rank 0 hands it over. StageFailed for
        the stage's own error. If the wait ends by an error (Ctrl-C, Tune stopping a trial), the job is cancelled."""
        seen = 0
        try:
            while True:
                news = ray.get(self.board.events.remote(self.index, seen))
                seen += len(news.epochs)
                for epoch in news.epochs if on_epoch else []:
                    on_epoch(epoch)
                if news.result is not None:
                    return self.checked(news.result)
                if news.ended is not None:
                    raise GroupEnded(f"stage {self.job.stage}: {news.ended}")
        except BaseException:
            self.cancel()
            raise

    def checked(self, result: StageResult) -> StageResult:
        if result.error is not None:
            raise StageFailed(f"stage {self.job.stage}: {result.error}")
        if result.cancelled:
            raise JobCancelled(f"stage {self.job.stage}: cancelled (its worker group was taken back)")
        return result

    def cancel(self) -> None:
        """Cancel the job (sent, not awaited: also from an error handler, when the board may be gone)."""
        self.board.cancel.remote(self.index)


class GroupClient:
    """A worker group as any process sees it (the driver that owns it, a sweep's trial): post a job, wait for it."""

    def __init__(self, board: Any, name: str):
        self.board, self.name = board, name

    def submit(self, job: Job) -> PendingStage:
        return PendingStage(self.board, ray.get(self.board.post.remote(job)), job)

    def run(self, job: Job, on_epoch: OnEpoch | None = None) -> StageResult:
        return self.submit(job).result(on_epoch)


class WorkerGroup(GroupClient):
    """One Ray Train run (`name`, default: the pipeline's run folder) that runs the jobs posted to it, from `with` to
    the end of the block; then it ends its run once the posted jobs are done (unfinished ones are cancelled; on
    Ctrl-C without waiting for the workers). A failure of the run itself (after Ray Train's retries) ends any wait
    on it (GroupEnded) and is raised at the end of the block. `on_end()` hears that the run ended."""

    def __init__(self, cfg: Config, name: str | None = None, on_end: Callable[[], None] | None = None):
        super().__init__(on_this_node(JobBoard), name or checkpoint.run_dir(cfg).name)
        self.cfg, self.on_end = cfg, on_end
        self.failure: Exception | None = None
        # Ray forces this thread: TorchTrainer.fit blocks until its run ends, while the driver hands the run its jobs.
        self.thread = threading.Thread(target=self.fit, name=f"oodlab-fit-{self.name}", daemon=True)

    def __enter__(self) -> WorkerGroup:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if kind is not None and issubclass(kind, KeyboardInterrupt):  # Ctrl-C: this process ends, its run with it
            self.board.close.remote()
            return
        self.close()
        if kind is None and self.failure is not None:
            raise self.failure

    @property
    def client(self) -> GroupClient:
        """This group for another process (a sweep's trial): its board, without the run."""
        return GroupClient(self.board, self.name)

    def start(self) -> None:
        self.thread.start()

    def cancel_unfinished(self) -> None:
        ray.get(self.board.cancel_unfinished.remote())

    def close(self) -> None:
        """Let the run end once the posted jobs are done (unfinished ones are cancelled); wait until it has."""
        ray.get(self.board.close.remote())
        self.thread.join()
        ray.kill(self.board)

    def fit(self) -> None:
        why = "the worker group's Ray Train run ended"
        try:
            trainer(self.cfg, {"board": self.board}, loop=serve, name=self.name).fit()
        except Exception as err:
            self.failure = err
            why = f"the worker group's Ray Train run failed: {type(err).__name__}: {err}"
        ray.get(self.board.end.remote(why))
        if self.on_end is not None:
            self.on_end()


@dataclass(frozen=True)
class Lender:
    """What a sweep's trials get of its pool: `acquire` blocks until one of its groups is free for the holder."""

    leases: Any
    groups: tuple[GroupClient, ...]

    def acquire(self, holder: str) -> GroupClient:
        return self.groups[ray.get(self.leases.acquire.remote(holder))]


class GroupPool:
    """`size` worker groups that a sweep keeps for all its trials, from `with` to the end of the block: a trial acquires
    one (`lender`) and runs its stages there, so only the first trial on each group pays for starting it. The sweep
    takes a group back when its trial ends (`release`), however it ended.

    The open pools of this process are found by name in `GroupPool.open` (Tune restores its callbacks from a pickle,
    which cannot hold a pool)."""

    open: ClassVar[dict[str, GroupPool]] = {}

    def __init__(self, cfg: Config, size: int):
        self.name = cfg.name
        self.leases = on_this_node(Leases, size)
        self.groups = [WorkerGroup(cfg, f"{cfg.name}.worker-group-{k}", on_end=functools.partial(self.retire, k))
                       for k in range(size)]
        self.lender = Lender(self.leases, tuple(group.client for group in self.groups))

    def __enter__(self) -> GroupPool:
        for group in self.groups:
            group.start()
        GroupPool.open[self.name] = self
        return self

    def __exit__(self, *_: Any) -> None:
        """Close every group (their unfinished jobs are cancelled) and wait until their runs ended."""
        GroupPool.open.pop(self.name, None)
        ray.get([group.board.close.remote() for group in self.groups])
        for group in self.groups:
            group.close()
        ray.kill(self.leases)

    def release(self, holder: str) -> None:
        """Take back the group `holder` holds, cancelling what it left unfinished (a trial Tune stopped or killed)."""
        index = ray.get(self.leases.release.remote(holder))
        if index is not None:
            self.groups[index].cancel_unfinished()

    def retire(self, index: int) -> None:
        ray.get(self.leases.retire.remote(index))
