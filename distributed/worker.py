"""The worker side of a worker group: config in, metrics and checkpoints out.

Each Ray Train worker runs `serve`: it takes the stage jobs of its group's board (`jobs.JobBoard`) in order and runs
each with a recipe over a `StageContext`, in the manner of torchtune's recipes: `setup`, then per epoch
`train_epoch`, `evaluate` and `end_epoch` (save the checkpoint, publish the epoch's result to the driver, log it
to MLflow). One recipe per stage kind: `TrainRecipe` (every training method: `oodlab.methods.TrainMethod`),
`EstimateRecipe`, `EvalRecipe`. Rank 0 hands the driver the stage's outcome: its last checkpoint and metrics, or
the error that stopped it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from oodlab import rng
from oodlab.config import Config
from oodlab.datapipes.benchmarks import OUTLIERS, Benchmark, get_benchmark
from oodlab.datapipes.beton import read_info
from oodlab.datapipes.loaders import LoaderSpec, build_loader
from oodlab.distributed import checkpoint, tracking
from oodlab.distributed.artifacts import log_final_artifacts
from oodlab.distributed.evaluate import Evaluation, evaluate
from oodlab.distributed.jobs import END, SKIP, Epoch, Job, StageResult
from oodlab.errors import DiskFull
from oodlab.masking import attach_masks, dense_state_dict
from oodlab.methods import Step, TrainMethod
from oodlab.models import FeatureNet, create_model

log = logging.getLogger("oodlab")

RESUMED = "resumed_after_epoch"  # logged by a resumed stage, once per resume
STARTUP = "stage_startup_seconds"  # logged once per attempt of a stage


class StageError(Exception):
    """A deterministic failure every rank sees at the same step (a NaN loss): the stage stops, not retried."""


class StageCancelled(Exception):
    """The driver no longer wants the stage: every rank stops at the same step."""


def serve(config: dict[str, Any]) -> None:
    """Ray Train entry point: run the jobs of the group's board in order, until the driver closes it."""
    worker = WorkerProcess(config["board"])
    index = ray.get(worker.board.start.remote())  # after Ray Train restarted the group: the job in progress
    while (job := ray.get(worker.board.take.remote(index))) != END:
        result = StageResult(cancelled=True) if job == SKIP else worker.run(job, index)
        if worker.rank == 0:
            ray.get(worker.board.finish.remote(index, result))
        index += 1


class WorkerProcess:
    """This Ray Train worker across the jobs of its run: its rank and device, its group's board, its data loaders."""

    def __init__(self, board: Any):
        ctx = ray.train.get_context()
        self.board = board
        self.rank, self.local_rank, self.world = ctx.get_world_rank(), ctx.get_local_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.loaders = LoaderCache()

    def run(self, job: Job, index: int) -> StageResult:
        """One stage on this worker; its outcome (rank 0's is the one the driver gets). The first worker on each node
        logs that node's system metrics to the stage's run.

        A StageError ends the stage normally with its message as the outcome: Ray retries only system failures (a
        raised exception would be retried `ray.max_failures` times, failing the same way).
        """
        ctx = StageContext(self, job, index)
        recipe = RECIPES[ctx.stage.kind](ctx)
        monitor = (tracking.system_metrics(ctx.cfg.mlflow.tracking_uri, job.run_id, ctx.node_id[:8])
                   if self.local_rank == 0 else contextlib.nullcontext())
        with monitor:
            try:
                recipe.setup()
                recipe.run()
            except StageError as err:
                ctx.say(f"stopped: {err}")
                return StageResult(error=str(err))
            except StageCancelled as err:
                ctx.say(str(err))
                return StageResult(cancelled=True)
        return recipe.result


class LoaderCache:
    """A worker process's loaders by spec, kept across epochs and the stages of its group (a pipeline's, a sweep's
    trials): FFCV compiles each pipeline (seconds), and freeing compiled pipelines makes numba print errors. A loader
    starts at epoch 0 each time it is handed out (a resumed stage then sets its epoch)."""

    def __init__(self) -> None:
        self.loaders: dict[LoaderSpec, Any] = {}

    def get(self, bench: Benchmark, spec: LoaderSpec) -> Any:
        if spec not in self.loaders:
            self.loaders[spec] = build_loader(bench, spec)
        self.loaders[spec].next_epoch = 0
        return self.loaders[spec]


class StageContext:
    """What one stage's recipe works with on this worker: its job, config and benchmark, the worker's rank and device,
    the loaders, the stage's MLflow run (rank 0) and the line to the driver."""

    def __init__(self, worker: WorkerProcess, job: Job, index: int):
        self.job, self.index, self.board, self.loaders = job, index, worker.board, worker.loaders
        self.cfg = Config.model_validate(job.config)
        self.stage = self.cfg.stages[job.stage]
        self.rank, self.world, self.device = worker.rank, worker.world, worker.device
        torch.set_num_threads(max(1, int(self.cfg.ray.cpus_per_worker)))
        rng.seed_all(self.cfg.seed)  # the same initial weights on every rank; then seed + rank (TrainRecipe.setup)
        self.node_id = check_data_root(self.cfg.data.root)
        self.bench: Benchmark = get_benchmark(self.cfg.data.benchmark, self.cfg.data.root)
        self.log = (tracking.RunLogger(self.cfg.mlflow.tracking_uri, job.run_id, tracking.buffer_folder(self.cfg))
                    if self.rank == 0 else None)
        # rank 0 keeps this call pending while the stage runs: it answers once the driver cancels the job
        self.cancelled = self.board.until_cancelled.remote(index) if self.rank == 0 else None
        self.started = False
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

    def spec(self, split: str, batch_size: int, **kw: Any) -> LoaderSpec:
        data = self.cfg.data
        return LoaderSpec(self.bench.path(data.root, split), batch_size, distributed=self.world > 1,
                          threads=data.loader_threads, os_cache=data.os_cache, device=self.device,
                          channels_last=self.cfg.model.channels_last, seed=self.cfg.seed, **kw)

    def loader(self, split: str, batch_size: int, **kw: Any) -> Any:
        return self.loaders.get(self.bench, self.spec(split, batch_size, **kw))

    def wanted(self) -> bool:
        """Whether the driver still wants the stage, as rank 0 sees it now (no round trip); True on other ranks."""
        return self.cancelled is None or not ray.wait([self.cancelled], timeout=0)[0]

    def publish(self, epoch: int, metrics: dict[str, float]) -> None:
        """Rank 0 hands the driver an epoch's result."""
        if self.rank == 0:
            ray.get(self.board.hand.remote(self.index, Epoch(epoch, metrics)))

    def log_once(self, metrics: dict[str, float], epoch: int) -> None:
        """Rank 0: log an epoch's metrics unless an earlier attempt of this stage logged them."""
        if self.log is not None:
            self.log.metrics_once(metrics, step=epoch)

    def first_step_done(self) -> None:
        """Rank 0 logs `stage_startup_seconds` (driver launch -> first step done: Ray workers, imports, data
        loaders, FFCV's compilation) once per attempt of the stage."""
        if self.started:
            return
        self.started = True
        if self.log is not None and self.job.launched_at:
            self.log.metrics({STARTUP: time.time() - self.job.launched_at}, step=0)

    def say(self, text: str) -> None:
        """A progress line from rank 0 (through logging: Ray Train tees print() into its logs twice)."""
        if self.rank == 0:
            log.info("[%s] %s", self.job.stage, text)


def check_data_root(root: Path) -> str:
    """This worker's Ray node id, once the data root is found here (every node reads the .beton files)."""
    node = ray.get_runtime_context().get_node_id()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} does not exist on Ray node {node} (host {socket.gethostname()}); "
                                "every node reads it: put the .beton files on storage that all nodes mount")
    return node


class Recipe:
    """One stage on one worker: `setup`, then `run`; what every stage kind shares (model, loaders, evaluation, the end
    of an epoch). `result` is the stage's outcome as rank 0 knows it: the checkpoint it saved last."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.result = StageResult()

    def setup(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        raise NotImplementedError

    # -- model and data ----------------------------------------------------------------------------------------
    def load_model(self) -> FeatureNet:
        m = self.ctx.cfg.model
        net = FeatureNet(create_model(m.name, self.ctx.bench.num_classes, m.pretrained, **m.kwargs))
        if self.ctx.job.init is not None:
            net.model.load_state_dict(checkpoint.load(self.ctx.job.init))
        return net

    def place(self, net: FeatureNet) -> FeatureNet:
        net = net.to(self.ctx.device)
        return net.to(memory_format=torch.channels_last) if self.ctx.cfg.model.channels_last else net

    def train_loader(self, augment: bool = True, sequential: bool = False) -> Any:
        """Shuffled, augmented, full batches; or (`sequential`) every sample exactly once, for estimation."""
        per_worker = self.ctx.cfg.data.batch_size // self.ctx.world
        if sequential:
            return self.ctx.loader("id_train", per_worker, augment=augment, indices=self.train_indices)
        return self.ctx.loader("id_train", per_worker, augment=True, order=self.ctx.cfg.data.order, drop_last=True,
                               indices=self.train_indices)

    def outlier_loader(self) -> Any:
        """The benchmark's outliers (outlier exposure's data), shuffled and sharded like the ID training data, a batch
        of the same size."""
        ctx = self.ctx
        per_worker = ctx.cfg.data.batch_size // ctx.world
        loader = ctx.loader(OUTLIERS, per_worker, augment=True, order=ctx.cfg.data.order, drop_last=True)
        if len(loader) == 0:
            raise StageError(f"the benchmark's outliers ({len(loader.indices)} images) hold less than one batch of "
                             f"{per_worker} per worker; add outlier images or lower data.batch_size")
        return loader

    @functools.cached_property
    def train_indices(self) -> tuple[int, ...] | None:
        """The id_train samples trained on: all (None), or `data.train_limit` of them (see DataConfig)."""
        limit, root = self.ctx.cfg.data.train_limit, self.ctx.cfg.data.root
        count = read_info(self.ctx.bench.path(root, "id_train")).count
        if limit is None or limit >= count:
            return None
        return tuple(np.sort(np.random.default_rng(0).permutation(count)[:limit]).tolist())

    @functools.cached_property
    def eval_loaders(self) -> dict[str, Any]:
        """One sequential loader per split (the id_train one over the kNN bank), looked up once per stage."""
        ctx = self.ctx
        per_worker = max(1, ctx.cfg.data.eval_batch_size // ctx.world)
        loaders = {s: ctx.loader(s, per_worker) for s in ctx.bench.splits if s != "id_train"}
        trained = self.train_indices or range(read_info(ctx.bench.path(ctx.cfg.data.root, "id_train")).count)
        bank = np.linspace(0, len(trained) - 1, min(len(trained), ctx.cfg.eval.knn_bank_size)).round().astype(int)
        loaders["id_train"] = ctx.loader("id_train", per_worker, indices=tuple(trained[i] for i in bank))
        return loaders

    # -- evaluation and the end of an epoch --------------------------------------------------------------------
    def evaluate(self, net: FeatureNet, scores: list[str]) -> Evaluation | None:
        """Score every split with exactly the model rank 0 saves: its BatchNorm statistics on every rank. Rank 0 gets
        the evaluation, the other ranks None."""
        if dist.is_initialized():
            for buffer in net.buffers():
                dist.broadcast(buffer, 0)
        loaders = self.eval_loaders
        sizes = {s: len(loader.indices) for s, loader in loaders.items()}
        start = time.perf_counter()
        evaluation = evaluate(net, loaders, sizes, self.ctx.bench, scores, self.ctx.cfg.eval.params)
        self.ctx.say(f"evaluated {len(scores)} scores on {len(loaders)} splits in {time.perf_counter() - start:.1f}s")
        return evaluation

    def end_epoch(self, epoch: int, metrics: dict[str, float], net: FeatureNet | None = None,
                  train_state: dict[str, Any] | None = None) -> None:
        """Save the epoch's checkpoint, publish its result to the driver, log its metrics (in that order: metrics
        reach MLflow only once their checkpoint is written; a worker that dies in between logs them when it resumes
        from that checkpoint, `log_once`)."""
        self.save(epoch, metrics, net, train_state)
        self.ctx.publish(epoch, metrics)
        self.ctx.log_once(metrics, epoch)

    def save(self, epoch: int, metrics: dict[str, float], net: FeatureNet | None = None,
             train_state: dict[str, Any] | None = None) -> None:
        """Rank 0 writes the epoch's checkpoint (the dense model, what resuming needs, the metrics) and prunes old ones.
        One that does not fit on its disk stops the stage on every rank (StageError: a retry would fill the disk
        again), its previous checkpoint intact."""
        ctx = self.ctx
        full = None
        if ctx.rank == 0:
            meta = {"stage": ctx.job.stage, "epoch": epoch, "metrics": metrics}
            model_state = None if net is None else dense_state_dict(net.model)
            try:
                written = checkpoint.write(ctx.cfg, ctx.job.stage, epoch, model_state, meta, train_state)
                checkpoint.prune(ctx.cfg, ctx.job.stage)
                self.result = StageResult(str(written), metrics)
            except DiskFull as err:
                full = err
        if not from_rank0(ctx.device, full is None):
            raise StageError(str(full or "rank 0 could not write the checkpoint: its disk is full"))


class TrainRecipe(Recipe):
    """A training stage: the method's parameters and loss (`TrainMethod`), SGD on a cosine schedule, DDP, exact resume."""

    def setup(self) -> None:
        ctx, stage = self.ctx, self.ctx.stage
        self.method = TrainMethod(stage, ctx.job.threshold, seed=ctx.cfg.seed)
        net = self.load_model()
        params = self.method.prepare(net)
        self.net = self.place(net)
        self.ddp = ray.train.torch.prepare_model(self.net, move_to_device=False) if ctx.world > 1 else self.net
        self.loader = self.train_loader()
        self.outliers = self.outlier_loader() if self.method.needs_outliers else None
        self.opt = torch.optim.SGD(params, lr=stage.lr, momentum=stage.momentum,
                                   nesterov=stage.nesterov and stage.momentum > 0, weight_decay=stage.weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt, T_max=(stage.schedule_epochs or stage.epochs) * len(self.loader))
        rng.seed_all(ctx.cfg.seed + ctx.rank)  # dropout and augmentation draw differently on each rank
        self.start = self.resume()

    def run(self) -> None:
        ctx, stage, ev = self.ctx, self.ctx.stage, self.ctx.cfg.eval
        evaluation = None
        for epoch in range(self.start, stage.epochs):
            t0 = time.perf_counter()
            metrics = self.train_epoch(epoch)
            last = epoch == stage.epochs - 1
            if last or (epoch + 1) % stage.eval_every == 0:
                evaluation = self.evaluate(self.net, ev.final_scores if last else ev.scores)
                if evaluation is not None:
                    metrics.update(evaluation.flat())
            metrics["epoch_seconds"] = time.perf_counter() - t0
            ctx.say(progress_line(epoch, stage.epochs, metrics, ev.select))
            self.end_epoch(epoch, metrics, self.net, self.training_state(epoch))
        if self.start == stage.epochs:  # resumed from the last epoch's checkpoint: its final artifacts may be missing
            evaluation = self.evaluate(self.net, ev.final_scores)
        log_final_artifacts(ctx.log, evaluation, ctx.bench, ctx.cfg.data.root, ev, stage.epochs - 1)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        ctx = self.ctx
        self.ddp.train()
        totals: dict[str, float] = {}
        seen = correct = 0
        outliers = self.outlier_batches(epoch) if self.outliers is not None else None
        for step, (x, y) in enumerate(self.loader):
            inputs = x if outliers is None else torch.cat([x, next(outliers)])  # one forward for both batches
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.cfg.ray.amp):
                logits, _, fmap = self.ddp(inputs)
            outlier_logits = None if outliers is None else logits[len(y):].float()
            logits, fmap = logits[:len(y)], fmap[:len(y)]
            loss, stats = self.method.loss(Step(y, logits.float(), fmap.float(), self.net.position_logits, epoch,
                                                ctx.job.threshold, outlier_logits))
            finite, wanted = agreed_flags(ctx.device, torch.isfinite(loss.detach()), ctx.wanted())
            if not finite:
                raise StageError(f"the loss is not finite (nan or inf) at epoch {epoch + 1}, step {step + 1}; "
                                 "nothing after the last checkpoint was saved. Lower the learning rate or check the data")
            if not wanted:
                raise StageCancelled(f"cancelled by the driver at epoch {epoch + 1}, step {step + 1}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            ctx.first_step_done()
            stats["loss"] = loss.detach()
            for k, v in stats.items():  # tensors stay on the device (the flags above are the one per-step sync)
                totals[k] = totals.get(k, 0.0) + v * len(y)
            seen += len(y)
            correct = correct + (logits.argmax(1) == y).sum()
        if outliers is not None:
            outliers.close()  # ends the outlier loader's epoch now: the next one starts from a clean iterator
        # float64 on the worker's device: NCCL reduces CUDA tensors only
        sums = torch.tensor([seen, float(correct), *map(float, totals.values())], dtype=torch.float64, device=ctx.device)
        if dist.is_initialized():
            dist.all_reduce(sums)
        seen_all = sums[0].item()
        out = {f"train/{k}": v / seen_all for k, v in zip(totals, sums[2:].tolist())}
        out["train/acc"] = 100 * sums[1].item() / seen_all
        out["lr"] = self.sched.get_last_lr()[0]
        return out

    def outlier_batches(self, epoch: int) -> Iterator[torch.Tensor]:
        """One outlier batch per training step: the outlier loader's epochs k * epoch, ..., k * epoch + k - 1 (k of them
        cover a training epoch). The draws are a function of the training epoch, so a resumed stage draws the same."""
        cycles = -(-len(self.loader) // len(self.outliers))
        for outlier_epoch in range(epoch * cycles, (epoch + 1) * cycles):
            self.outliers.next_epoch = outlier_epoch
            for x, _ in self.outliers:
                yield x

    def training_state(self, epoch: int) -> dict[str, Any]:
        """What an exact resume needs: model, optimizer, scheduler, the loader's next epoch, every rank's RNGs."""
        states = [rng.get_state()] * self.ctx.world
        if dist.is_initialized():
            dist.all_gather_object(states, states[0])
        return {"model": self.net.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "epoch": epoch, "loader_epoch": self.loader.next_epoch, "rng": states}

    def resume(self) -> int:
        """Restore the stage's newest checkpoint, if it has one (a retry or a rerun); return the first epoch to run.

        Rank 0 logs that checkpoint's metrics if the attempt that wrote it died before logging them.
        """
        ctx = self.ctx
        found = checkpoint.newest_training_state(ctx.cfg, ctx.job.stage)
        if found is None:
            return 0
        path, state, meta = found
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.loader.next_epoch = state["loader_epoch"]
        if len(state["rng"]) == ctx.world:
            rng.set_state(state["rng"][ctx.rank])
        else:
            ctx.say(f"the checkpoint has RNG states of {len(state['rng'])} ranks, this run {ctx.world}: reseeded")
        epoch = int(state["epoch"])
        ctx.log_once(meta["metrics"], epoch)
        if ctx.log is not None:  # when training went on: the metric's timestamp (recovery time = it - the fault)
            ctx.log.metrics({RESUMED: epoch + 1}, step=epoch)
        ctx.say(f"resumed after epoch {epoch + 1}")
        self.result = StageResult(str(path), meta["metrics"])
        return epoch + 1


def from_rank0(device: torch.device, flag: bool) -> bool:
    """Rank 0's flag on every rank (so that all stop at the same point)."""
    if not dist.is_initialized():
        return flag
    shared = torch.tensor([float(flag)], device=device)
    dist.broadcast(shared, 0)
    return bool(shared.item())


def agreed_flags(device: torch.device, finite: torch.Tensor, wanted: bool) -> tuple[bool, bool]:
    """Whether the loss is finite and the driver still wants the stage, on every rank: one 2-element all-reduce, so
    that all ranks stop at the same step."""
    flags = torch.stack([finite.to(torch.float32).reshape(()), torch.tensor(float(wanted), device=device)])
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    finite_all, wanted_all = flags.tolist()
    return bool(finite_all), bool(wanted_all)


def progress_line(epoch: int, epochs: int, m: dict[str, float], select: str) -> str:
    ood = f"{select} fpr95 val {m[f'ood/{select}/val/fpr95']:.1f} all {m[f'ood/{select}/all/fpr95']:.1f}" \
        if f"ood/{select}/val/fpr95" in m else ""
    acc = f"id_acc {m['id_acc']:.1f}" if "id_acc" in m else ""
    return (f"epoch {epoch + 1}/{epochs}  loss {m['train/loss']:.3f}  train_acc {m['train/acc']:.1f}  "
            f"{acc}  {ood}  ({m['epoch_seconds']:.1f}s)")


class EstimateRecipe(Recipe):
    """l_hat = mean train CE of the init model under a random mask (eval mode), reduced as sum and count."""

    def setup(self) -> None:
        ctx = self.ctx
        net = self.load_model()
        attach_masks(net.model, ctx.stage.mask_ratio, torch.Generator().manual_seed(ctx.cfg.seed))
        self.net = self.place(net).eval()
        self.loader = self.train_loader(augment=ctx.stage.augment, sequential=True)

    def run(self) -> None:
        ctx = self.ctx
        total = len(self.loader.indices)
        mine = len(range(ctx.rank, total, ctx.world))  # the rest of this shard is DistributedSampler padding
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for x, y in self.loader:
                take = min(len(y), mine - count)
                logits = self.net(x)[0][:take]
                loss_sum += F.cross_entropy(logits.float(), y[:take], reduction="sum").item()
                count += take
                ctx.first_step_done()
        sums = torch.tensor([loss_sum, count], dtype=torch.float64, device=ctx.device)
        if dist.is_initialized():
            dist.all_reduce(sums)
        threshold = sums[0].item() / sums[1].item()
        ctx.say(f"forgetting threshold {threshold:.4f} (mask_ratio {ctx.stage.mask_ratio}, {int(sums[1].item())} samples)")
        self.end_epoch(0, {"forget_threshold": threshold, "estimate/samples": sums[1].item()})


class EvalRecipe(Recipe):
    """Every final score of the init checkpoint."""

    def setup(self) -> None:
        self.net = self.place(self.load_model())

    def run(self) -> None:
        ctx = self.ctx
        evaluation = self.evaluate(self.net, ctx.cfg.eval.final_scores)
        self.end_epoch(0, evaluation.flat() if evaluation is not None else {})
        log_final_artifacts(ctx.log, evaluation, ctx.bench, ctx.cfg.data.root, ctx.cfg.eval, None)


RECIPES: dict[str, type[Recipe]] = {"train": TrainRecipe, "estimate": EstimateRecipe, "eval": EvalRecipe}
