"""Training images/s of oodlab's 2-worker Ray Train DDP loop against a plain single-process torch loop.

    python bench/bench_train.py [--models resnet_tiny_cifar resnet18_cifar] [--epochs 2] [--images 512]

Both sides train the same model on the same data (a synthetic 32px JPEG benchmark that oodlab's own
build turns into .beton files) with the same global batch, optimiser, schedule and total threads:
- Ray Train: the project's pipeline (`pipeline.run`, one train stage) on 2 workers x 1 CPU: gloo DDP, one
  FFCV thread and one torch thread per worker, each with half the global batch. An epoch's rate is its
  images over the `epoch_seconds` that rank 0 logs to MLflow; only the last epoch evaluates, and it is
  left out.
- plain torch: one process, the same FFCV loader (`LoaderSpec.for_training`) with 2 threads,
  torch.set_num_threads(2), FeatureNet and the stage's loss (`TrainMethod`), SGD with the same schedule.
Each side drops one warm-up epoch (FFCV's JIT, first allocations). The plain loop's measured epochs are
split before and after the Ray run, so load drift on a shared machine hits both sides. Rates are the
median over the measured epochs. The last line is `ratio: R`: Ray Train / plain torch, the smallest over
the models.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from harness import build_benchmark, epoch_seconds, images_per_epoch, private_ray, steady_rate, write_benchmark
from oodlab import config
from oodlab.report import markdown

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2  # Ray Train workers, one CPU each; the plain loop gets the same 2 threads
CLASSES = 10


class PlainLoop:
    """The same training step as the Ray worker loop, in this process, without Ray or DDP."""

    def __init__(self, bench, cfg: config.Config, threads: int):
        from oodlab.datapipes.loaders import LoaderSpec, build_loader
        from oodlab.distributed.stages import TrainMethod
        from oodlab.models import FeatureNet, create_model

        torch.manual_seed(cfg.seed)
        torch.set_num_threads(threads)
        stage = cfg.stages["train"]
        self.method = TrainMethod(stage, threshold=None, seed=cfg.seed)
        self.net = FeatureNet(create_model(cfg.model.name, bench.num_classes))
        spec = LoaderSpec.for_training(bench.path(cfg.data.root, "id_train"), cfg.data.batch_size, threads=threads,
                                       os_cache=cfg.data.os_cache, seed=cfg.seed)
        self.loader = build_loader(bench, spec)
        self.opt = torch.optim.SGD(self.method.prepare(self.net), lr=stage.lr, momentum=stage.momentum,
                                   nesterov=stage.nesterov and stage.momentum > 0, weight_decay=stage.weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=stage.epochs * len(self.loader))
        self.done = 0

    def epoch(self) -> float:
        """Seconds for one training epoch."""
        from oodlab.distributed.stages import Step

        start = time.perf_counter()
        self.net.train()
        for x, y in self.loader:
            logits, _, fmap = self.net(x)
            loss, _ = self.method.loss(Step(y, logits, fmap, self.net.classifier, self.done))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
        self.done += 1
        return time.perf_counter() - start


def stage_config(work: Path, benchmark: Path, model: str, batch: int, epochs: int) -> config.Config:
    """One train stage of `epochs` measured epochs plus a warm-up epoch and a last, evaluated one."""
    raw = {
        "name": f"bench-{model}",
        "data": {"benchmark": str(benchmark), "root": str(work / "data"), "batch_size": batch, "loader_threads": 1},
        "model": {"name": model},
        "eval": {"scores": ["msp"], "final_scores": ["msp"], "select": "msp"},
        "ray": {"num_workers": WORLD, "cpus_per_worker": 1, "storage_path": str(work / "runs")},
        "mlflow": {"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "bench-train"},
        "checkpoint": {"keep_last": 1},
        "stages": {"train": {"epochs": epochs + 2, "lr": 0.05, "eval_every": epochs + 3}},
    }
    return config.validate(raw, work)


def measure(bench, cfg: config.Config, epochs: int, count: int, log: Path) -> dict[str, float]:
    """Plain torch (warm-up, half the epochs), the Ray Train stage, plain torch (the other half).

    Besides the baseline (1 process x 2 threads) a plain loop with 1 thread runs, its epochs alternating
    with the baseline's: on a loaded machine torch's 2-thread parallel regions wait for a descheduled
    thread at every barrier, and this column shows how much of the ratio that is.
    """
    from oodlab import console
    from oodlab.distributed import pipeline

    loops = {threads: PlainLoop(bench, cfg, threads) for threads in (WORLD, 1)}
    seconds: dict[int, list[float]] = {threads: [] for threads in loops}
    for loop in loops.values():
        loop.epoch()

    def plain_epochs(count: int) -> None:
        for _ in range(count):
            for threads, loop in loops.items():  # each loader's iter() sets torch's thread count to its own
                seconds[threads].append(loop.epoch())

    plain_epochs((epochs + 1) // 2)
    start = time.perf_counter()
    with console.output_to(log):
        state = pipeline.run(cfg, restart=True)
    wall = time.perf_counter() - start
    plain_epochs(epochs // 2)
    ray_seconds = epoch_seconds(cfg.mlflow.tracking_uri, state.stages["train"].run_id)[1:-1]
    plain_images = images_per_epoch(count, cfg.data.batch_size, 1)
    return {"plain": steady_rate(plain_images, seconds[WORLD]), "plain_1": steady_rate(plain_images, seconds[1]),
            "ray": steady_rate(images_per_epoch(count, cfg.data.batch_size, WORLD), ray_seconds), "ray_wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet_tiny_cifar", "resnet18_cifar"])
    parser.add_argument("--epochs", type=int, default=2, help="measured epochs per side, after a warm-up epoch")
    parser.add_argument("--images", type=int, default=512, help="training images (32px JPEGs, 10 classes)")
    parser.add_argument("--batch", type=int, default=64, help="global batch (each Ray worker gets half)")
    parser.add_argument("--work", type=Path, default=ROOT / ".oodlab" / "bench-train", help="scratch folder (emptied)")
    args = parser.parse_args()
    if args.epochs < 1 or args.images < 2 * args.batch:
        parser.error("--epochs must be >= 1 and --images >= 2 x --batch (each Ray worker needs a full batch)")

    from oodlab.datapipes.beton import read_info

    shutil.rmtree(args.work, ignore_errors=True)
    benchmark = write_benchmark(args.work / "images", "bench-train", classes=CLASSES, train=args.images,
                                test_per_class=4, ood=32, side=32, image_size=32, augment="pad-crop",
                                write={"mode": "raw"})
    bench = build_benchmark(benchmark, args.work / "data")
    count = read_info(bench.path(args.work / "data", "id_train")).count
    print(f"{count} training images (32px, {CLASSES} classes), global batch {args.batch}, {args.epochs} measured "
          f"epochs per side after 1 warm-up; Ray Train: {WORLD} workers x 1 CPU (gloo DDP), plain torch: 1 process x "
          f"{WORLD} threads; Ray's output goes to {args.work / 'ray.log'}", flush=True)
    rows, ratios = [], []
    with private_ray():
        for model in args.models:
            cfg = stage_config(args.work, benchmark, model, args.batch, args.epochs)
            rate = measure(bench, cfg, args.epochs, count, args.work / "ray.log")
            ratios.append(rate["ray"] / rate["plain"])
            ideal = WORLD * rate["plain_1"]  # two single-thread loops side by side, if nothing else ran
            rows.append([model, f"{rate['plain']:.1f}", f"{rate['plain_1']:.1f}", f"{rate['ray']:.1f}",
                         f"{ratios[-1]:.2f}", f"{rate['ray'] / ideal:.2f}", f"{rate['ray_wall']:.0f}"])
            print(f"{model}: plain {rate['plain']:.1f} img/s, Ray Train {rate['ray']:.1f} img/s", flush=True)
    print()
    print(markdown(["model", f"plain torch img/s (1 x {WORLD} threads)", "plain torch img/s (1 thread)",
                    f"Ray Train img/s ({WORLD} x 1)", "Ray / plain", f"Ray / ({WORLD} x plain 1 thread)",
                    f"Ray stage wall s ({args.epochs + 2} epochs, start-up, eval)"], rows))
    print(f"ratio: {min(ratios):.2f}")


if __name__ == "__main__":
    main()
