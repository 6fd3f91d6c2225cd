"""The job protocol between a driver and its worker groups (`oodlab.distributed.jobs`), without Ray Train.

The plain classes run on one asyncio loop, the driver and each worker as tasks: ordering, cancellation before and
during a job, a worker that dies mid-job (Ray Train restarts the group), a driver that stops waiting, the end of a
group's run, and a sweep's leases. The last tests run the board as the async Ray actor the groups use, with a Ray
task as the worker: waits block on Ray calls and cancellation reaches a running worker without a round trip.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from oodlab.distributed.jobs import END, SKIP, Epoch, Job, JobBoard, Leases, NoGroupLeft, StageResult


def job(stage: str) -> Job:
    return Job(config={}, stage=stage, init=None, threshold=None, run_id=f"run-{stage}")


async def settle() -> None:
    """Let every task that can run, run (the board's waits are woken through its condition)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def worker(board: JobBoard, epochs: int = 1, taken: list[str] | None = None) -> None:
    """A worker group's rank 0, as `worker.serve` runs: each job in order, SKIP and END as the board says; a job runs
    `epochs` epochs, one whose stage is named `long` until it is cancelled."""
    index = board.start()
    while (found := await board.take(index)) != END:
        result = StageResult(cancelled=True)
        if found != SKIP:
            (taken if taken is not None else []).append(found.stage)
            result = await run_job(board, index, found, 10**9 if found.stage == "long" else epochs)
        await board.finish(index, result)
        index += 1


async def run_job(board: JobBoard, index: int, found: Job, epochs: int) -> StageResult:
    """`epochs` epochs, each handed to the driver; stopped at the next one once the job is cancelled."""
    cancelled = asyncio.ensure_future(board.until_cancelled(index))
    for epoch in range(epochs):
        await settle()
        if cancelled.done() and cancelled.result():
            return StageResult(cancelled=True)
        await board.hand(index, Epoch(epoch, {"loss": 1.0 / (epoch + 1)}))
    return StageResult(f"/ckpt/{found.stage}", {"loss": 0.5})


async def wait_result(board: JobBoard, index: int) -> tuple[list[Epoch], StageResult | None, str | None]:
    """What a driver gets of a job: its epochs in order, then its outcome (or why the run ended)."""
    seen: list[Epoch] = []
    while True:
        news = await board.events(index, len(seen))
        seen += news.epochs
        if news.result is not None or news.ended is not None:
            return seen, news.result, news.ended


async def goes_on_then_ends(board: JobBoard, workers: asyncio.Future) -> None:
    """The group runs the next job as usual, and its workers' loop returns once the board closes."""
    assert (await wait_result(board, await board.post(job("next"))))[1].checkpoint == "/ckpt/next"
    await board.close()
    await asyncio.wait_for(workers, 1)


def test_jobs_run_in_the_order_posted_and_the_driver_gets_every_epoch_then_the_outcome():
    async def scenario():
        board, taken = JobBoard(), []
        workers = asyncio.ensure_future(worker(board, epochs=3, taken=taken))
        first, second = await board.post(job("a")), await board.post(job("b"))
        epochs, result, ended = await wait_result(board, second)
        assert taken == ["a", "b"] and ended is None
        assert [e.epoch for e in epochs] == [0, 1, 2] and result == StageResult("/ckpt/b", {"loss": 0.5})
        assert (await wait_result(board, first))[1].checkpoint == "/ckpt/a"  # kept for a late reader
        await board.close()
        await asyncio.wait_for(workers, 1)  # END: the workers' loop returns
        assert board.start() == 2

    asyncio.run(scenario())


def test_a_worker_waits_for_jobs_without_polling_and_ends_when_the_board_closes():
    async def scenario():
        board = JobBoard()
        taking = asyncio.ensure_future(board.take(0))
        await settle()
        assert not taking.done()  # blocked on the board's condition
        await board.post(job("a"))
        assert (await asyncio.wait_for(taking, 1)).stage == "a"
        closing = asyncio.ensure_future(board.take(1))
        await settle()
        await board.close()
        assert await asyncio.wait_for(closing, 1) == END

    asyncio.run(scenario())


def test_a_job_cancelled_before_it_starts_is_skipped_and_one_cancelled_while_running_stops():
    async def scenario():
        board, taken = JobBoard(), []
        running = await board.post(job("long"))
        waiting = await board.post(job("b"))
        await board.cancel(waiting)
        workers = asyncio.ensure_future(worker(board, epochs=1, taken=taken))
        while not board.epochs[running]:
            await settle()
        await board.cancel(running)
        assert (await wait_result(board, running))[1] == StageResult(cancelled=True)
        assert (await wait_result(board, waiting))[1] == StageResult(cancelled=True)
        assert taken == ["long"]  # b never ran
        await goes_on_then_ends(board, workers)
        await board.cancel(2)  # a finished job stays finished
        assert board.results[2].checkpoint == "/ckpt/next" and 2 not in board.cancelled

    asyncio.run(scenario())


def test_a_worker_that_dies_mid_job_is_restarted_at_the_job_in_progress():
    async def scenario():
        board = JobBoard()
        done = await board.post(job("a"))
        dying = await board.post(job("long"))
        first = asyncio.ensure_future(worker(board))
        while len(board.epochs[dying]) < 2:
            await settle()
        first.cancel()  # the worker process is killed: no outcome for b
        await settle()
        assert board.results[dying] is None and board.start() == dying
        restarted = asyncio.ensure_future(worker(board))  # Ray Train's new group: the same job again (it resumes)
        while len(board.epochs[dying]) < 4:
            await settle()
        await board.cancel(dying)
        epochs, result, _ = await wait_result(board, dying)
        assert result.cancelled and board.results[done].checkpoint == "/ckpt/a"
        numbers = [e.epoch for e in epochs]  # the driver saw both attempts' epochs, in order
        again = numbers.index(0, 1)
        assert again >= 2 and numbers == [*range(again), *range(len(numbers) - again)]
        await goes_on_then_ends(board, restarted)

    asyncio.run(scenario())


def test_a_driver_that_stops_waiting_leaves_the_board_consistent_and_its_cancel_stops_the_job():
    async def scenario():
        board = JobBoard()
        index = await board.post(job("long"))
        workers = asyncio.ensure_future(worker(board))
        waiting = asyncio.ensure_future(wait_result(board, index))
        while not board.epochs[index]:
            await settle()
        waiting.cancel()  # the driver gives up (Ctrl-C, Tune stopping a trial) ...
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await board.cancel(index)  # ... and cancels its job, as `PendingStage.result` does
        assert (await wait_result(board, index))[1] == StageResult(cancelled=True)
        await goes_on_then_ends(board, workers)

    asyncio.run(scenario())


def test_the_end_of_the_group_run_wakes_every_driver_waiting_on_it():
    async def scenario():
        board = JobBoard()
        index = await board.post(job("a"))  # no worker ever takes it: the run failed for good
        waiting = asyncio.ensure_future(wait_result(board, index))
        await settle()
        assert not waiting.done()
        await board.end("the worker group's Ray Train run failed: WorkerGroupError: boom")
        epochs, result, ended = await asyncio.wait_for(waiting, 1)
        assert (epochs, result) == ([], None) and ended.endswith("boom")

    asyncio.run(scenario())


def test_closing_the_board_cancels_what_is_unfinished():
    async def scenario():
        board = JobBoard()
        index = await board.post(job("a"))
        stopping = asyncio.ensure_future(board.until_cancelled(index))
        await board.close()
        assert await asyncio.wait_for(stopping, 1) is True and await board.take(index) == SKIP

    asyncio.run(scenario())


def test_leases_block_until_a_group_is_free_and_a_retired_group_is_lent_no_more():
    async def scenario():
        leases = Leases(2)
        assert await leases.acquire("t1") == 0 and await leases.acquire("t2") == 1
        assert await leases.acquire("t1") == 0  # the one it holds
        third = asyncio.ensure_future(leases.acquire("t3"))
        await settle()
        assert not third.done()  # both groups lent: it waits
        assert await leases.release("t2") == 1
        assert await asyncio.wait_for(third, 1) == 1
        assert await leases.release("nobody") is None
        await leases.retire(0)  # t1's group ended for good
        assert await leases.release("t1") == 0
        fourth = asyncio.ensure_future(leases.acquire("t4"))
        await settle()
        assert not fourth.done()  # group 0 is not lent again; group 1 is still held
        await leases.retire(1)
        with pytest.raises(NoGroupLeft):
            await asyncio.wait_for(fourth, 1)

    asyncio.run(scenario())


# -- the board as the groups run it: an async Ray actor ------------------------------------------------------------
def test_the_board_as_a_ray_actor_blocks_its_callers_and_cancels_a_running_worker(ray_cluster):
    import ray

    from oodlab.distributed.group import GroupClient, JobCancelled, on_this_node

    @ray.remote(num_cpus=0)
    def rank0(board) -> list[str]:
        """A worker's loop as `worker.serve` runs it: one epoch per job, then steps until cancelled (at most 60 s)."""
        index, log = ray.get(board.start.remote()), []
        while (found := ray.get(board.take.remote(index))) != END:
            if found == SKIP:
                log.append("skipped")
                ray.get(board.finish.remote(index, StageResult(cancelled=True)))
                index += 1
                continue
            cancelled = board.until_cancelled.remote(index)
            ray.get(board.hand.remote(index, Epoch(0, {"loss": 1.0})))
            deadline = time.monotonic() + (60 if found.stage == "long" else 0)
            while time.monotonic() < deadline and not ray.wait([cancelled], timeout=0)[0]:
                time.sleep(0.01)  # a training step
            stopped = bool(ray.wait([cancelled], timeout=0)[0])
            log.append(f"{found.stage}:{'cancelled' if stopped else 'done'}")
            ray.get(board.finish.remote(index, StageResult(cancelled=True) if stopped else StageResult(f"/{found.stage}")))
            index += 1
        return log

    board = on_this_node(JobBoard)
    group = GroupClient(board, "test")
    workers = rank0.remote(board)
    seen: list[Epoch] = []
    assert group.run(job("short"), seen.append) == StageResult("/short") and [e.epoch for e in seen] == [0]

    long = group.submit(job("long"))
    started = time.monotonic()

    class StopWaiting(Exception):
        pass

    def stop_waiting(epoch: Epoch) -> None:  # as Ctrl-C or Tune stopping a trial: the driver's wait ends by an error
        raise StopWaiting

    with pytest.raises(StopWaiting):
        long.result(stop_waiting)
    assert group.run(job("after")) == StageResult("/after")  # the long job stopped at its next step
    assert time.monotonic() - started < 30
    ray.get(board.cancel_unfinished.remote())
    taken_back = group.submit(job("long"))
    ray.get(board.cancel_unfinished.remote())  # the sweep took the group back while the trial waited
    with pytest.raises(JobCancelled):
        taken_back.result()
    ray.get(board.close.remote())
    log = ray.get(workers, timeout=30)
    assert log[:3] == ["short:done", "long:cancelled", "after:done"] and log[3] in ("long:cancelled", "skipped")
    ray.kill(board)
