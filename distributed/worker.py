"""The Ray Train worker loop: config in, metrics and checkpoints out. One loop for every stage.

`train_loop_per_worker(job)` runs on each worker. The job names the stage, the resolved starting
checkpoint and forgetting threshold, and the MLflow run that rank 0 logs to.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from oodlab import rng
from oodlab.atomic import write_text
from oodlab.config import Config, EstimateStage, EvalStage, TrainStage
from oodlab.datapipes.benchmarks import Benchmark, get_benchmark
from oodlab.datapipes.beton import read_info
from oodlab.datapipes.loaders import LoaderSpec, build_loader
from oodlab.distributed import checkpoint, tracking
from oodlab.distributed.artifacts import log_final_artifacts
from oodlab.distributed.evaluate import Evaluation, evaluate
from oodlab.distributed.stages import TrainMethod
from oodlab.errors import DiskFull
from oodlab.masking import attach_masks, dense_state_dict
from oodlab.models import FeatureNet, create_model

log = logging.getLogger("oodlab")


@dataclass
class Job:
    """What the driver hands every worker of one stage."""

    config: dict[str, Any]
    stage: str
    init: str | None  # model.pt to start from (resolved by the pipeline)
    threshold: float | None  # resolved forgetting threshold, when the stage floors its loss
    run_id: str  # MLflow run of this stage
    launched_at: float = 0.0  # the driver's time.time() when it launched the stage

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Channel(Protocol):
    """How rank 0 of a worker group that runs stages for a driver (`session.py`) hands it each epoch's result."""

    def hand(self, metrics: dict[str, float], epoch: int) -> bool:
        """Hand over an epoch's result; whether the driver still wants the stage."""


class Worker:
    """Per-process state: config, rank, device, data loaders, MLflow logger (rank 0)."""

    def __init__(self, job: Job, channel: Channel | None = None):
        self.job, self.channel = job, channel
        self.cfg = Config.model_validate(job.config)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.set_num_threads(max(1, int(self.cfg.ray.cpus_per_worker)))
        rng.seed_all(self.cfg.seed)  # the same initial weights on every rank; then seed + rank (see run_train)
        self.node_id = check_data_root(self.cfg.data.root)
        self.bench: Benchmark = get_benchmark(self.cfg.data.benchmark, self.cfg.data.root)
        self.log = (tracking.RunLogger(self.cfg.mlflow.tracking_uri, job.run_id, tracking.buffer_folder(self.cfg))
                    if self.rank == 0 else None)
        self._started = False
        self.record_nodes()

    def record_nodes(self) -> None:
        """Rank 0 tags the run with every rank's Ray node id (`ray.node_ids` in rank order, `ray.node_id.rank<r>`)
        and with the Ray Train run whose worker group ran the stage (`ray.train_run`)."""
        nodes = [self.node_id] * self.world
        if dist.is_initialized():
            dist.all_gather_object(nodes, self.node_id)
        if self.log is not None:
            self.log.tags({"ray.node_ids": ",".join(nodes), "ray.train_run": ray.train.get_context().get_experiment_name()}
                          | {f"ray.node_id.rank{r}": n for r, n in enumerate(nodes)})

    # -- data --------------------------------------------------------------------------------------
    def spec(self, split: str, batch_size: int, **kw) -> LoaderSpec:
        data = self.cfg.data
        return LoaderSpec(self.bench.path(data.root, split), batch_size, distributed=self.world > 1,
                          threads=data.loader_threads, os_cache=data.os_cache, device=self.device,
                          channels_last=self.cfg.model.channels_last, seed=self.cfg.seed, **kw)

    def train_loader(self, augment: bool = True, sequential: bool = False):
        """Shuffled, augmented, full batches; or (`sequential`) every sample exactly once, for estimation."""
        per_worker = self.cfg.data.batch_size // self.world
        if sequential:
            return shared_loader(self.bench, self.spec("id_train", per_worker, augment=augment))
        return shared_loader(self.bench, self.spec("id_train", per_worker, augment=True, order=self.cfg.data.order,
                                                   drop_last=True))

    @functools.cached_property
    def eval_loaders(self) -> dict[str, Any]:
        """One sequential loader per split (the id_train one over the kNN bank), looked up once per stage."""
        per_worker = max(1, self.cfg.data.eval_batch_size // self.world)
        loaders = {s: shared_loader(self.bench, self.spec(s, per_worker)) for s in self.bench.splits if s != "id_train"}
        n_train = read_info(self.bench.path(self.cfg.data.root, "id_train")).count
        bank = np.linspace(0, n_train - 1, min(n_train, self.cfg.eval.knn_bank_size)).round().astype(int)
        loaders["id_train"] = shared_loader(self.bench, self.spec("id_train", per_worker, indices=tuple(bank.tolist())))
        return loaders

    def evaluate(self, net: FeatureNet, scores: list[str]) -> Evaluation | None:
        """Score every split with exactly the model rank 0 saves: its BatchNorm statistics on every rank."""
        if dist.is_initialized():
            for buffer in net.buffers():
                dist.broadcast(buffer, 0)
        loaders = self.eval_loaders
        sizes = {s: len(loader.indices) for s, loader in loaders.items()}
        start = time.perf_counter()
        evaluation = evaluate(net, loaders, sizes, self.bench, scores, self.cfg.eval.params)
        self.say(f"evaluated {len(scores)} scores on {len(loaders)} splits in {time.perf_counter() - start:.1f}s")
        return evaluation

    # -- model -------------------------------------------------------------------------------------
    def model(self) -> FeatureNet:
        m = self.cfg.model
        net = FeatureNet(create_model(m.name, self.bench.num_classes, m.pretrained, **m.kwargs))
        if self.job.init is not None:
            net.model.load_state_dict(checkpoint.load(self.job.init))
        return net

    def place(self, net: FeatureNet) -> FeatureNet:
        net = net.to(self.device)
        return net.to(memory_format=torch.channels_last) if self.cfg.model.channels_last else net

    # -- reporting ---------------------------------------------------------------------------------
    def report(self, metrics: dict[str, float], epoch: int, net: FeatureNet | None = None,
               train_state: dict | None = None) -> None:
        """Rank 0 writes the epoch's checkpoint; every rank calls ray.train.report (a barrier); then the driver
        sees the result (`Channel`) and rank 0 logs the metrics. StageCancelled if the driver no longer wants
        the stage.

        Metrics reach MLflow only once their checkpoint is written; a worker that dies in between logs them
        when it resumes from that checkpoint (`log_once`). A checkpoint that does not fit on its disk stops the stage
        on every rank (StageError: a retry would fill the disk again), its previous checkpoint intact.
        """
        full = None
        if self.rank == 0:
            meta = {"stage": self.job.stage, "epoch": epoch, "metrics": metrics}
            model_state = None if net is None else dense_state_dict(net.model)
            try:
                checkpoint.write(self.cfg, self.job.stage, epoch, model_state, meta, train_state)
                checkpoint.prune(self.cfg, self.job.stage)
            except DiskFull as err:
                full = err
        if not self.from_rank0(full is None):
            raise StageError(str(full or "rank 0 could not write the checkpoint: the disk is full"))
        ray.train.report(metrics)
        if self.channel is not None and not self.from_rank0(self.rank != 0 or self.channel.hand(metrics, epoch)):
            raise StageCancelled(f"cancelled by the driver after epoch {epoch + 1}")
        self.log_once(metrics, epoch)

    def from_rank0(self, flag: bool) -> bool:
        """Rank 0's flag on every rank (so that all stop at the same step)."""
        if not dist.is_initialized():
            return flag
        shared = torch.tensor([float(flag)], device=self.device)
        dist.broadcast(shared, 0)
        return bool(shared.item())

    def log_once(self, metrics: dict[str, float], epoch: int) -> None:
        """Rank 0: log an epoch's metrics unless an earlier attempt of this stage logged them."""
        if self.log is not None:
            self.log.metrics_once(metrics, step=epoch)

    def first_step_done(self) -> None:
        """Rank 0 logs `stage_startup_seconds` (driver launch -> first step done: Ray workers, imports, data
        loaders, FFCV's compilation) once per attempt of the stage."""
        if self._started:
            return
        self._started = True
        if self.log is not None and self.job.launched_at:
            self.log.metrics({STARTUP: time.time() - self.job.launched_at}, step=0)

    def say(self, text: str) -> None:
        """A progress line from rank 0 (through logging: Ray Train tees print() into its logs twice)."""
        if self.rank == 0:
            log.info("[%s] %s", self.job.stage, text)


LOADERS: dict[LoaderSpec, Any] = {}  # this worker process's, kept across epochs and the stages of a session


def shared_loader(bench: Benchmark, spec: LoaderSpec) -> Any:
    """A loader built once per process and spec, reused by later stages (a session's, a sweep's trials): FFCV
    compiles each pipeline (seconds), and freeing compiled pipelines makes numba print errors. It starts at
    epoch 0 each time it is handed out (a resumed stage then sets its epoch)."""
    if spec not in LOADERS:
        LOADERS[spec] = build_loader(bench, spec)
    LOADERS[spec].next_epoch = 0
    return LOADERS[spec]


def check_data_root(root: Path) -> str:
    """This worker's Ray node id, once the data root is found here (every node reads the .beton files)."""
    node = ray.get_runtime_context().get_node_id()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} does not exist on Ray node {node} (host {socket.gethostname()}); "
                                "every node reads it: put the .beton files on storage that all nodes mount")
    return node


class StageError(Exception):
    """A deterministic failure every rank sees at the same step (a NaN loss): the stage stops, not retried."""


class StageCancelled(Exception):
    """The driver no longer wants the stage (a sweep trial that Tune stopped): every rank stops after the epoch."""


RESUMED = "resumed_after_epoch"  # logged by a resumed stage, once per resume
STARTUP = "stage_startup_seconds"  # logged once per attempt of a stage


def train_loop_per_worker(job_dict: dict[str, Any], channel: Channel | None = None) -> None:
    """One stage on every worker. The first worker on each node logs that node's system metrics to the stage's run.

    A StageError ends the loop normally, its message left in the stage's error file for the driver: Ray retries
    only system failures (a raised exception would be retried `ray.max_failures` times, failing the same way).
    A StageCancelled ends it normally too.
    """
    worker = Worker(Job(**job_dict), channel)
    stage = worker.cfg.stages[worker.job.stage]
    monitor = (tracking.system_metrics(worker.cfg.mlflow.tracking_uri, worker.job.run_id, worker.node_id[:8])
               if ray.train.get_context().get_local_rank() == 0 else contextlib.nullcontext())
    with monitor:
        try:
            if isinstance(stage, EstimateStage):
                run_estimate(worker, stage)
            elif isinstance(stage, EvalStage):
                run_eval(worker)
            else:
                run_train(worker, stage)
        except StageError as err:
            worker.say(f"stopped: {err}")
            if worker.rank == 0:
                write_text(checkpoint.stage_error_file(worker.cfg, worker.job.stage), str(err))
        except StageCancelled as err:
            worker.say(str(err))


def run_train(worker: Worker, stage: TrainStage) -> None:
    cfg = worker.cfg
    method = TrainMethod(stage, worker.job.threshold, seed=cfg.seed)
    net = worker.model()
    params = method.prepare(net)
    net = worker.place(net)
    ddp = ray.train.torch.prepare_model(net, move_to_device=False) if worker.world > 1 else net
    loader = worker.train_loader()
    steps = len(loader)
    opt = torch.optim.SGD(params, lr=stage.lr, momentum=stage.momentum, nesterov=stage.nesterov and stage.momentum > 0,
                          weight_decay=stage.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=(stage.schedule_epochs or stage.epochs) * steps)
    rng.seed_all(cfg.seed + worker.rank)  # dropout and augmentation draw differently on each rank
    start = resume(worker, net, opt, sched, loader)
    evaluation = None
    for epoch in range(start, stage.epochs):
        t0 = time.perf_counter()
        metrics = train_epoch(ddp, net, loader, opt, sched, method, epoch, worker)
        last = epoch == stage.epochs - 1
        if last or (epoch + 1) % stage.eval_every == 0:
            evaluation = worker.evaluate(net, cfg.eval.final_scores if last else cfg.eval.scores)
            if evaluation is not None:
                metrics.update(evaluation.flat())
        metrics["epoch_seconds"] = time.perf_counter() - t0
        worker.say(progress_line(epoch, stage.epochs, metrics, cfg.eval.select))
        worker.report(metrics, epoch, net, training_state(worker, net, opt, sched, loader, epoch))
    if start == stage.epochs:  # resumed from the last epoch's checkpoint: its final artifacts may be missing
        evaluation = worker.evaluate(net, cfg.eval.final_scores)
    log_final_artifacts(worker.log, evaluation, worker.bench, cfg.eval, stage.epochs - 1)


def training_state(worker: Worker, net: FeatureNet, opt, sched, loader, epoch: int) -> dict[str, Any]:
    """What an exact resume needs: model, optimizer, scheduler, the loader's next epoch, every rank's RNGs."""
    states = [rng.get_state()] * worker.world
    if dist.is_initialized():
        dist.all_gather_object(states, states[0])
    return {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "epoch": epoch, "loader_epoch": loader.next_epoch, "rng": states}


def resume(worker: Worker, net: FeatureNet, opt, sched, loader) -> int:
    """Restore the stage's newest checkpoint, if it has one (a retry or a rerun); return the first epoch to run.

    Rank 0 logs that checkpoint's metrics if the attempt that wrote it died before logging them.
    """
    found = checkpoint.newest_training_state(worker.cfg, worker.job.stage)
    if found is None:
        return 0
    state, meta = found
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    loader.next_epoch = state["loader_epoch"]
    if len(state["rng"]) == worker.world:
        rng.set_state(state["rng"][worker.rank])
    else:
        worker.say(f"the checkpoint has RNG states of {len(state['rng'])} ranks, this run {worker.world}: reseeded")
    epoch = int(state["epoch"])
    worker.log_once(meta["metrics"], epoch)
    if worker.log is not None:  # when training went on: the metric's timestamp (recovery time = it - the fault)
        worker.log.metrics({RESUMED: epoch + 1}, step=epoch)
    worker.say(f"resumed after epoch {epoch + 1}")
    return epoch + 1


def train_epoch(ddp: torch.nn.Module, net: FeatureNet, loader, opt, sched, method: TrainMethod, epoch: int,
                worker: Worker) -> dict[str, float]:
    ddp.train()
    totals: dict[str, float] = {}
    seen = correct = 0
    for step, (x, y) in enumerate(loader):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=worker.cfg.ray.amp):
            logits, _, fmap = ddp(x)
        loss, stats = method.loss(logits.float(), fmap.float(), y, net.classifier, epoch)
        if not finite_everywhere(loss):
            raise StageError(f"the loss is not finite (nan or inf) at epoch {epoch + 1}, step {step + 1}; nothing "
                             "after the last checkpoint was saved. Lower the learning rate or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        worker.first_step_done()
        stats["loss"] = loss.detach()
        for k, v in stats.items():  # tensors stay on the device (the finiteness check is the one per-step sync)
            totals[k] = totals.get(k, 0.0) + v * len(y)
        seen += len(y)
        correct = correct + (logits.argmax(1) == y).sum()
    # float64 on the worker's device: NCCL reduces CUDA tensors only
    sums = torch.tensor([seen, float(correct), *map(float, totals.values())], dtype=torch.float64, device=worker.device)
    if dist.is_initialized():
        dist.all_reduce(sums)
    seen_all = sums[0].item()
    out = {f"train/{k}": v / seen_all for k, v in zip(totals, sums[2:].tolist())}
    out["train/acc"] = 100 * sums[1].item() / seen_all
    out["lr"] = sched.get_last_lr()[0]
    return out


def finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank: one 1-element all-reduce, so all ranks stop at the same step."""
    flag = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def progress_line(epoch: int, epochs: int, m: dict[str, float], select: str) -> str:
    ood = f"{select} fpr95 val {m[f'ood/{select}/val/fpr95']:.1f} all {m[f'ood/{select}/all/fpr95']:.1f}" \
        if f"ood/{select}/val/fpr95" in m else ""
    acc = f"id_acc {m['id_acc']:.1f}" if "id_acc" in m else ""
    return (f"epoch {epoch + 1}/{epochs}  loss {m['train/loss']:.3f}  train_acc {m['train/acc']:.1f}  "
            f"{acc}  {ood}  ({m['epoch_seconds']:.1f}s)")


def run_estimate(worker: Worker, stage: EstimateStage) -> None:
    """l_hat = mean train CE of the init model under a random mask (eval mode), reduced as sum and count."""
    net = worker.model()
    attach_masks(net.model, stage.mask_ratio, torch.Generator().manual_seed(worker.cfg.seed))
    net = worker.place(net).eval()
    loader = worker.train_loader(augment=stage.augment, sequential=True)
    total = len(loader.indices)
    mine = len(range(worker.rank, total, worker.world))  # the rest of this shard is DistributedSampler padding
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            take = min(len(y), mine - count)
            logits = net(x)[0][:take]
            loss_sum += F.cross_entropy(logits.float(), y[:take], reduction="sum").item()
            count += take
            worker.first_step_done()
    sums = torch.tensor([loss_sum, count], dtype=torch.float64, device=worker.device)
    if dist.is_initialized():
        dist.all_reduce(sums)
    threshold = sums[0].item() / sums[1].item()
    worker.say(f"forgetting threshold {threshold:.4f} (mask_ratio {stage.mask_ratio}, {int(sums[1].item())} samples)")
    worker.report({"forget_threshold": threshold, "estimate/samples": sums[1].item()}, epoch=0)


def run_eval(worker: Worker) -> None:
    net = worker.place(worker.model())
    evaluation = worker.evaluate(net, worker.cfg.eval.final_scores)
    worker.report(evaluation.flat() if evaluation is not None else {}, epoch=0)
    log_final_artifacts(worker.log, evaluation, worker.bench, worker.cfg.eval, None)
