"""The GPU check that bench/gpu_check.sh runs: ResNet-50 speed, the science config, a checkpoint on GPU and CPU.

    bash bench/gpu_check.sh [--dry-run] [--images 20000] [--epochs 2] [--work .oodlab/gpu-check]

Every step goes through oodlab's own pipeline (`pipeline.run`: Ray Train, FFCV, MLflow):
1. resnet50: random-pattern 256px JPEGs in 1000 class folders plus a benchmark YAML, built into .beton
   files by `oodlab.datapipes.build`; configs/gpu_check_resnet50.yaml trains ResNet-50 at 224px with one Ray
   Train worker per GPU (NCCL), bf16 autocast, channels_last and FFCV's ToDevice. Images/s per GPU come
   from the epochs that do not evaluate (the first warms up), beside FFCV's published ResNet-50 figure.
2. science: configs/fmnist_science.yaml, every stage, a few epochs, on the GPUs.
3. eval: the science baseline's last checkpoint, scored by an eval stage on the GPU and on the CPU (gloo),
   both in fp32: every score's AUROC, per OOD group, must agree within 0.1 points.
--dry-run runs the same steps on a CPU machine at tiny sizes: gloo, fp32, 2 workers x 1 CPU, 32 images of
10 classes for step 1 and the digits benchmark for steps 2 and 3 (the "GPU" evaluation is then a second
CPU one). It checks everything short of CUDA. Exit status 1 when the AUROC check fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import build_benchmark, epoch_seconds, images_per_epoch, private_ray, steady_rate, write_benchmark
from oodlab import config
from oodlab.report import markdown

ROOT = Path(__file__).resolve().parent.parent
RESNET50 = ROOT / "configs" / "gpu_check_resnet50.yaml"
SCIENCE = ROOT / "configs" / "fmnist_science.yaml"
PUBLISHED = "~3,000 img/s per A100 (FFCV's ResNet-50 runs on 8 x A100, ffcv-imagenet)"
AUROC_TOLERANCE = 0.1  # percent points


@dataclass(frozen=True)
class Machine:
    dry_run: bool
    gpus: int
    cpus: int
    name: str

    def ray_overrides(self, gpu: bool = True) -> list[str]:
        """One Ray Train worker per GPU sharing this machine's CPUs (bf16); else CPU workers on gloo (fp32)."""
        if self.dry_run:
            return ["ray.use_gpu=false", "ray.amp=false", "ray.num_workers=2", "ray.cpus_per_worker=1",
                    "data.loader_threads=1"]
        workers = self.gpus if gpu else 2
        cpus = self.cpus // workers
        return [f"ray.use_gpu={str(gpu).lower()}", f"ray.amp={str(gpu).lower()}", f"ray.num_workers={workers}",
                f"ray.cpus_per_worker={cpus}", f"data.loader_threads={max(1, cpus - 1)}"]


def detect(dry_run: bool) -> Machine:
    cpus = len(os.sched_getaffinity(0))
    if dry_run:
        return Machine(True, 0, cpus, f"CPU only, {cpus} cores (dry run)")
    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device; run it on a GPU machine, or use --dry-run on a CPU machine")
    gpus = torch.cuda.device_count()
    return Machine(False, gpus, cpus, f"{gpus} x {torch.cuda.get_device_name(0)}, {cpus} CPU cores")


def say(text: str) -> None:
    from oodlab import console

    console.say(f"gpu_check: {text}")


def run_pipeline(cfg: config.Config, log: Path):
    """The config's stages through oodlab's pipeline, Ray's output in `log`; the pipeline state."""
    from oodlab import console
    from oodlab.distributed import pipeline

    with console.output_to(log):
        return pipeline.run(cfg, restart=True)


def work_overrides(work: Path, name: str) -> list[str]:
    return [f"name={name}", f"data.root={work / 'data'}", f"ray.storage_path={work / 'runs'}",
            f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}"]


def resnet50(machine: Machine, args: argparse.Namespace) -> str:
    """Step 1: write and build the synthetic ImageNet-size benchmark, train ResNet-50, return the speed line."""
    from oodlab.datapipes.beton import read_info

    folder = args.work / "imagenet-synthetic"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    classes, test_per_class, ood = (10, 4, 8) if machine.dry_run else (1000, 2, 500)
    benchmark = write_benchmark(folder, "synthetic-imagenet", classes=classes, train=args.images,
                                test_per_class=test_per_class, ood=ood, side=256, image_size=224,
                                augment="random-resized-crop", workers=machine.cpus,
                                write={"mode": "jpg", "jpeg_quality": 90, "max_resolution": 256, "square": False})
    bench = build_benchmark(benchmark, args.work / "data", workers=machine.cpus)
    seconds = time.perf_counter() - start
    say(f"{args.images} synthetic 256px JPEGs ({classes} classes) written and built in {seconds:.0f} s")
    overrides = [f"data.benchmark={benchmark}", f"stages.train.epochs={args.epochs + 2}",
                 f"stages.train.eval_every={args.epochs + 3}", *machine.ray_overrides(),
                 *work_overrides(args.work, "gpu-check-resnet50")]
    if machine.dry_run:
        overrides += ["data.batch_size=16", "data.eval_batch_size=32"]
    cfg = config.load(RESNET50, overrides, base=ROOT)
    state = run_pipeline(cfg, args.work / "ray.log")
    count = read_info(bench.path(cfg.data.root, "id_train")).count
    seconds = epoch_seconds(cfg.mlflow.tracking_uri, state.stages["train"].run_id)[1:-1]
    rate = steady_rate(images_per_epoch(count, cfg.data.batch_size, cfg.ray.num_workers), seconds)
    precision = "bf16 autocast" if cfg.ray.amp else "fp32"
    unit = "GPU" if cfg.ray.use_gpu else f"worker ({cfg.ray.cpus_per_worker:g} CPU)"
    return (f"ResNet-50 224px, {precision}, channels_last, global batch {cfg.data.batch_size}, {cfg.ray.num_workers} "
            f"worker(s): {rate / cfg.ray.num_workers:.0f} img/s per {unit} on {machine.name}; published: {PUBLISHED}")


def science_overrides(machine: Machine, args: argparse.Namespace) -> list[str]:
    data = ["data.benchmark=digits"] if machine.dry_run else []
    return [*data, *work_overrides(args.work, "gpu-check-science")]


def science(machine: Machine, args: argparse.Namespace):
    """Step 2: every stage of the science config, a few epochs each; the config and pipeline state."""
    from oodlab.cli import print_comparison
    from oodlab.datapipes.benchmarks import get_benchmark
    from oodlab.datapipes.build import build
    from oodlab.distributed import pipeline

    epochs = [f"stages.baseline.epochs={args.science_epochs}"]
    epochs += [f"stages.{name}.epochs=1" for name in ("um", "umap", "background")]
    cfg = config.load(SCIENCE, [*science_overrides(machine, args), *epochs, *machine.ray_overrides()], base=ROOT)
    build(get_benchmark(cfg.data.benchmark), cfg.data.root, workers=machine.cpus, progress=False)
    state = run_pipeline(cfg, args.work / "ray.log")
    print_comparison(cfg, pipeline.results(state))
    return cfg, state


def gpu_vs_cpu(machine: Machine, args: argparse.Namespace, checkpoint: str) -> tuple[str, bool]:
    """Step 3: one checkpoint scored by an eval stage on the GPU and on the CPU; the table and whether AUROCs agree."""
    from oodlab.datapipes.benchmarks import get_benchmark

    metrics = {}
    for device, gpu in (("GPU", True), ("CPU", False)):
        stage = f"stages={{eval: {{kind: eval, init: '{checkpoint}'}}}}"
        cfg = config.load(SCIENCE, [*science_overrides(machine, args), stage, *machine.ray_overrides(gpu),
                                    f"name=gpu-check-eval-{device.lower()}"], base=ROOT)
        metrics[device] = run_pipeline(cfg, args.work / "ray.log").stages["eval"].metrics
    groups = [*get_benchmark(cfg.data.benchmark).groups, "all", "val"]
    rows, worst = [], 0.0
    for score in cfg.eval.final_scores:
        keys = [f"ood/{score}/{g}/auroc" for g in groups]
        diff = max(abs(metrics["GPU"][k] - metrics["CPU"][k]) for k in keys)
        worst = max(worst, diff)
        rows.append([score] + [f"{metrics['GPU'][k]:.2f} / {metrics['CPU'][k]:.2f}" for k in keys] + [f"{diff:.3f}"])
    table = markdown(["score"] + [f"{g} AUROC GPU / CPU" for g in groups] + ["max |diff|"], rows)
    verdict = f"\nlargest AUROC difference {worst:.3f} points (tolerance {AUROC_TOLERANCE})"
    if machine.dry_run:
        verdict += "; dry run: the GPU column ran on the CPU too"
    return table + verdict, worst <= AUROC_TOLERANCE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPUs (gloo, fp32): all but CUDA")
    parser.add_argument("--images", type=int, help="ResNet-50 training images (default 20000; dry run 32)")
    parser.add_argument("--epochs", type=int, default=2, help="timed ResNet-50 epochs, after a warm-up epoch")
    parser.add_argument("--science-epochs", type=int, help="science baseline epochs (default 2; dry run 1)")
    parser.add_argument("--work", type=Path, default=ROOT / ".oodlab" / "gpu-check",
                        help="scratch folder; its data/ is kept between runs, runs and MLflow store are not")
    args = parser.parse_args()
    args.images = args.images or (32 if args.dry_run else 20_000)
    args.science_epochs = args.science_epochs or (1 if args.dry_run else 2)
    args.work = args.work.resolve()
    machine = detect(args.dry_run)
    for stale in ("runs", "mlflow.db", "mlruns", "ray.log"):
        path = args.work / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    say(f"{machine.name}; torch {torch.__version__}; Ray's output goes to {args.work / 'ray.log'}")
    steps: list[tuple[str, float]] = []
    with private_ray():
        start = time.perf_counter()
        speed = resnet50(machine, args)
        steps.append(("resnet50", time.perf_counter() - start))
        say(speed)
        start = time.perf_counter()
        cfg, state = science(machine, args)
        steps.append(("science", time.perf_counter() - start))
        start = time.perf_counter()
        table, agree = gpu_vs_cpu(machine, args, state.stages["baseline"].checkpoint)
        steps.append(("eval GPU + CPU", time.perf_counter() - start))
    print(f"\n## gpu_check summary ({machine.name})\n\n{speed}\n\n"
          f"{cfg.name} baseline checkpoint scored on the GPU and on the CPU:\n\n{table}\n")
    print("step seconds: " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in steps))
    print(f"AUROC GPU vs CPU: {'PASS' if agree else 'FAIL'}")
    sys.exit(0 if agree else 1)


if __name__ == "__main__":
    main()
