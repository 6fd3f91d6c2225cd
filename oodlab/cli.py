"""The front door: `oodlab demo | train | eval | tune | ui`. The only core module that reaches the upper layers.

Configs are validated here, before Ray starts; Ray, FFCV and MLflow are imported only by the commands
that need them, so `oodlab --help` and config errors are instant.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from oodlab import config as config_mod
from oodlab.errors import DiskFull, StageFailed
from oodlab.limits import MAX_IMAGE_SIDE, MAX_IMAGE_SIZE, MAX_THREADS
from oodlab.report import FLOOR_NOTE, markdown, set_table
from oodlab.storage import local_root

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (config_mod.ConfigError, FileNotFoundError, ValueError, ConnectionError) as err:
        print(f"oodlab: error: {err}", file=sys.stderr)
        return 2
    except (StageFailed, DiskFull) as err:
        print(f"oodlab: error: {err}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oodlab", description="Train image classifiers that know what they don't know.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = sub.add_parser("demo", help="write the demo data, train baseline / UM / UMAP / background, print the table")
    demo.add_argument("--config", type=Path, default=CONFIGS / "demo.yaml", help="demo config (default: configs/demo.yaml)")
    demo.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    demo.add_argument("--restart", action="store_true", help="run every stage again instead of resuming")
    _verbose_argument(demo)
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser("train", help="run (or resume) the stages of a config on Ray")
    _config_arguments(train, "stages.train.epochs=3", "run every stage again instead of resuming")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="score a checkpoint with every post-hoc score and print the table")
    ev.add_argument("config", type=Path)
    ev.add_argument("--checkpoint", required=True, help="a checkpoint directory or its model.pt (a path or s3://... URI)")
    ev.add_argument("--scores", help="comma-separated scores (default: eval.final_scores)")
    ev.add_argument("overrides", nargs="*")
    ev.set_defaults(func=cmd_eval)

    tune = sub.add_parser("tune", help="Ray Tune sweep over the config's search space (rerun to resume it)")
    _config_arguments(tune, "search.num_samples=8", "start the sweep afresh instead of resuming it")
    tune.set_defaults(func=cmd_tune)

    ui = sub.add_parser("ui", help="open the MLflow UI on 127.0.0.1 against the configured store")
    ui.add_argument("config", type=Path, nargs="?", default=CONFIGS / "demo.yaml")
    ui.add_argument("--port", type=in_range(1, 65535), default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    ui.set_defaults(func=cmd_ui)

    upload = sub.add_parser("mlflow-upload", help="send MLflow the records a run kept on disk while the server was away")
    upload.add_argument("config", type=Path)
    upload.add_argument("overrides", nargs="*", help="key.sub=value overrides the run was started with")
    upload.set_defaults(func=cmd_mlflow_upload)
    add_data_commands(sub)
    add_cluster_commands(sub)
    return parser


def in_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in low..high (argparse names the option and exits 2 otherwise)."""

    def number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    return number


def _config_arguments(parser: argparse.ArgumentParser, example: str, restart_help: str) -> None:
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", help=f"key.sub=value overrides, e.g. {example}")
    parser.add_argument("--restart", action="store_true", help=restart_help)
    _verbose_argument(parser)


def _verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show Ray's own output here as it comes (by default "
                        "it goes to a log file, whose path is printed)")


@contextlib.contextmanager
def ray_output(args: argparse.Namespace, cfg: config_mod.Config, command: str) -> Iterator[None]:
    """Where Ray's own output goes while the command runs: the terminal with --verbose, else a log file.

    A local Ray instance that the command started is shut down before the terminal is given back, so that
    Ray's last words go to the log file too.
    """
    import ray

    from oodlab import console

    started_here = not ray.is_initialized()
    log = local_root(cfg.ray.storage_path) / cfg.name / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    if not args.verbose:
        print(f"Ray's output goes to {log}  (--verbose shows it here)", flush=True)
    with contextlib.nullcontext() if args.verbose else console.output_to(log):
        try:
            yield
        finally:
            if started_here and ray.is_initialized():
                ray.shutdown()


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config, args.overrides)
    from oodlab.distributed import pipeline

    checked = pipeline.preflight(cfg, args.restart)  # bad input fails here: before any log file, run folder or Ray
    with ray_output(args, cfg, "train"):
        state = pipeline.run(cfg, restart=args.restart, checked=checked)
    print_comparison(cfg, pipeline.results(state))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config, args.overrides)
    from oodlab.datapipes.benchmarks import get_benchmark
    from oodlab.datapipes.build import build
    from oodlab.distributed import pipeline

    bench = get_benchmark(cfg.data.benchmark)
    written = build(bench, cfg.data.root, log=print)
    print(f"demo data: {len(written)} file(s) written under {cfg.data.root / bench.name}" if written
          else f"demo data: current files under {cfg.data.root / bench.name}")
    checked = pipeline.preflight(cfg, args.restart)
    with ray_output(args, cfg, "demo"):
        state = pipeline.run(cfg, restart=args.restart, checked=checked)
    print_comparison(cfg, pipeline.results(state))
    print(f"\nCompare the runs in the MLflow UI:  oodlab ui {args.config}   (then open the address it prints)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.scores:
        overrides.append(f"eval.final_scores=[{args.scores}]")
    cfg = config_mod.load(args.config, overrides)
    raw = config_mod.to_dict(cfg)
    raw["name"] = f"{cfg.name}-eval"
    raw["stages"] = {"eval": {"kind": "eval", "init": str(args.checkpoint)}}
    cfg = config_mod.validate(raw, Path.cwd())
    from oodlab.datapipes.benchmarks import floors, get_benchmark
    from oodlab.distributed import pipeline

    state = pipeline.run(cfg, restart=True)
    flat = state.stages["eval"].metrics
    bench = get_benchmark(cfg.data.benchmark)
    print(f"\nID accuracy {flat['id_acc']:.2f}%. Per OOD set and group ({FLOOR_NOTE}; val = the OOD validation split):")
    print(markdown(*set_table(flat, cfg.eval.final_scores, bench.groups, bench.outside_all,
                              floors(bench, cfg.data.root))))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config, args.overrides)
    from oodlab.tuning import summary, sweep

    base = sweep.preflight(cfg, args.restart)  # bad input fails here: before any log file or Ray
    with ray_output(args, cfg, "tune"):
        result = sweep.run(cfg, restart=args.restart, base=base)
    print(summary.text(result, cfg, args.config, args.overrides))
    return 130 if result.interrupted else 0


def cmd_ui(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    uri = cfg.mlflow.tracking_uri
    from oodlab.distributed import tracking

    experiment = tracking.client(uri).get_experiment_by_name(cfg.mlflow.experiment)
    page = f"http://{args.host}:{args.port}"
    if experiment is not None:
        page = tracking.runs_url(page, experiment.experiment_id)
    print(f"MLflow UI for {tracking.redact(uri)}: open {page}  (Ctrl-C to stop)", flush=True)
    # The store's URI goes through the environment: a command line (with any credentials in it) is visible to
    # every user of the machine.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_BACKEND_STORE_URI": uri}
    # One server process: enough for one user, quicker to start, and not restarted by uvicorn's worker health
    # checks when the machine is busy training.
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", args.host, "--port", str(args.port), "--workers", "1"]
    return subprocess.call(cmd, env=env)


def cmd_mlflow_upload(args: argparse.Namespace) -> int:
    """Send the buffered records of the config's runs (and its sweep's trials): 0 once none are left."""
    cfg = config_mod.load(args.config, args.overrides)
    from oodlab.distributed import tracking

    waiting = tracking.buffered(cfg)
    if not waiting:
        print(f"nothing to upload: no MLflow records wait under {tracking.buffer_folder(cfg)}")
        return 0
    tracking.check_reachable(cfg.mlflow.tracking_uri)  # not answering: exit 2, naming the (redacted) URI
    try:
        left = tracking.upload_buffers(cfg)
    except tracking.ReplayError as err:
        print(f"oodlab: error: {err}; it stays on disk", file=sys.stderr)
        return 1
    print(f"sent {sum(waiting.values()) - sum(left.values())} records of {len(waiting)} runs to MLflow at "
          f"{tracking.redact(cfg.mlflow.tracking_uri)}")
    if left:
        print(f"oodlab: error: {sum(left.values())} records of {len(left)} runs are still on disk (the server stopped "
              "answering); run the command again", file=sys.stderr)
        return 1
    return 0


def print_comparison(cfg: config_mod.Config, runs: dict[str, dict[str, float]]) -> None:
    from oodlab.datapipes.benchmarks import get_benchmark
    from oodlab.datapipes.tables import results_text

    text = results_text(get_benchmark(cfg.data.benchmark), cfg.data.root, runs, cfg.eval.select)
    if text:
        print(text)


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    """`oodlab data write | inspect | benchmark`: the user's data -> checked .beton files (logic: oodlab.datapipes)."""
    data = sub.add_parser("data", help="write, inspect and build .beton files from your own data")
    data.set_defaults(func=lambda _: data.print_help() or 2)
    cmds = data.add_subparsers(title="data commands", metavar="COMMAND")

    write = cmds.add_parser("write", help="write one source to a .beton (atomic; a bad image stops it, named)")
    write.add_argument("source", type=Path, help="image folder, image list .txt, CIFAR folder, SVHN .mat or .npz")
    write.add_argument("out", type=Path, help="the .beton to write")
    write.add_argument("--ood", action="store_true", help="label every image -1 (an OOD set; flat folders allowed)")
    write.add_argument("--square", type=in_range(8, MAX_IMAGE_SIZE), metavar="SIZE",
                       help="Resize + CenterCrop to SIZE (32: CIFAR OOD sets)")
    write.add_argument("--split", choices=["train", "test"], help="CIFAR pickles: which split (default train)")
    _add_write_options(write)
    write.set_defaults(func=cmd_data_write)

    inspect = cmds.add_parser("inspect", help="fields, count, label histogram and image sizes of a .beton")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--verify", action="store_true", help="also decode every image through an FFCV Loader")
    inspect.add_argument("--threads", type=in_range(1, MAX_THREADS), default=1,
                         help="decoding threads for --verify (default 1)")
    inspect.set_defaults(func=cmd_data_inspect)

    build = cmds.add_parser("build", aliases=["benchmark"], help="build every .beton of a benchmark (YAML or built-in)")
    build.add_argument("benchmark", help="a benchmark YAML, or a built-in: cifar10, cifar100, imagenet1k, fmnist, ...")
    build.add_argument("--out", type=Path, required=True, help="data root to write OUT/NAME/<split>.beton under")
    build.add_argument("--root", type=Path, help="folder that relative source paths start from (default: the "
                       "YAML's folder; built-ins with relative paths need it)")
    build.add_argument("--force", action="store_true", help="rewrite files that are already current")
    build.add_argument("--workers", type=in_range(1, MAX_THREADS), default=1, help="writer processes (default 1)")
    build.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed in the manifest)")
    build.set_defaults(func=cmd_data_build)


def _add_write_options(parser: argparse.ArgumentParser) -> None:
    """FFCV RGBImageField options as in the ffcv-imagenet recipe; unset ones keep the default of the command."""
    parser.add_argument("--write-mode", choices=["raw", "jpg", "smart", "proportion"])
    parser.add_argument("--max-resolution", type=in_range(8, MAX_IMAGE_SIDE),
                        help="shrink images so the longest side is at most this")
    parser.add_argument("--jpeg-quality", type=in_range(1, 100), help="JPEG quality 1..100 (default 90)")
    parser.add_argument("--compress-probability", type=float, help="write-mode proportion: fraction stored as JPEG")
    parser.add_argument("--workers", type=in_range(1, MAX_THREADS), default=1, help="writer processes (default 1)")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed in the manifest)")


def _image_options(args: argparse.Namespace, base):
    """`base` (an ImageOptions) with the options given on the command line."""
    from dataclasses import replace

    names = ("write_mode", "max_resolution", "jpeg_quality", "compress_probability")
    return replace(base, **{k: getattr(args, k) for k in names if getattr(args, k) is not None})


def cmd_data_write(args: argparse.Namespace) -> int:
    import time

    from oodlab.datapipes.sources import open_source
    from oodlab.datapipes.views import SquareSource

    source = open_source(args.source, ood=args.ood, **({"split": args.split} if args.split else {}))
    source = SquareSource(source, args.square) if args.square else source
    print(source.describe(), flush=True)
    from oodlab.datapipes import beton  # FFCV: seconds to import, once the source is known to be good
    start = time.perf_counter()
    beton.write(source, args.out, _image_options(args, beton.ImageOptions()), args.workers, skip_bad=args.skip_bad)
    seconds = time.perf_counter() - start
    info = beton.read_info(args.out)
    print(f"{info.describe()}\nwrote {info.count} images in {seconds:.1f} s ({info.count / seconds:.0f} images/s)")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from oodlab.datapipes import beton, verify

    info = verify.verify(args.file, threads=args.threads) if args.verify else beton.read_info(args.file)
    print(info.describe() + (f"\nverified: all {info.count} images decode" if args.verify else ""))
    return 0


def cmd_data_build(args: argparse.Namespace) -> int:
    from oodlab.datapipes.benchmarks import get_benchmark

    bench = get_benchmark(args.benchmark)
    from oodlab.datapipes.build import build  # FFCV: seconds to import, once the YAML is known to be good

    written = build(bench, args.out, args.root, args.workers, args.skip_bad, args.force, log=print)
    print(f"{len(written)} file(s) written under {args.out / bench.name}")
    return 0


def add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    """`oodlab submit` and `oodlab jobs list | logs | stop`: Ray jobs on a cluster (logic: oodlab.distributed.submit)."""
    address = argparse.ArgumentParser(add_help=False)
    address.add_argument("--address", help="the cluster's job server, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
                         "then $RAY_ADDRESS); with RAY_AUTH_MODE=token, Ray sends $RAY_AUTH_TOKEN or ~/.ray/auth_token")

    submit = sub.add_parser("submit", parents=[address], help="run a config on a Ray cluster as a Ray job "
                            "(this project's code and the config travel with it)")
    submit.add_argument("config", type=Path)
    submit.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. stages.train.epochs=3")
    submit.add_argument("--tune", action="store_true", help="run `oodlab tune` (the config's sweep) instead of `train`")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs; exit 0 only if it succeeds")
    submit.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="list, follow and stop the cluster's Ray jobs")
    jobs.set_defaults(func=lambda _: jobs.print_help() or 2)
    cmds = jobs.add_subparsers(title="jobs commands", metavar="COMMAND")
    cmds.add_parser("list", parents=[address], help="every job: id, status, start, command").set_defaults(func=cmd_jobs_list)
    logs = cmds.add_parser("logs", parents=[address], help="a job's logs so far (or --follow them to its end)")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends; exit 0 only if it succeeded")
    logs.set_defaults(func=cmd_jobs_logs)
    stop = cmds.add_parser("stop", parents=[address], help="stop a job and wait until it has stopped")
    stop.add_argument("job_id")
    stop.set_defaults(func=cmd_jobs_stop)


def cmd_submit(args: argparse.Namespace) -> int:
    import tempfile

    from oodlab.distributed import cluster_python, submit
    from oodlab.distributed.tracking import redact

    address = submit.resolve_address(args.address)
    job = submit.check(args.config, args.overrides)
    if args.tune:
        from oodlab.tuning import sweep

        sweep.check(job.cfg)
    with tempfile.TemporaryDirectory(prefix="oodlab-submit-") as tmp:
        package = submit.package(job, "tune" if args.tune else "train", Path(tmp))
        if _job_server(lambda: cluster_python.check(address)) is None:  # (its ClusterPythonError: exit 2)
            return 1
        job_id = _job_server(lambda: submit.submit(address, package))
    if job_id is None:
        return 1
    print(f"submitted job {job_id} to {address}: oodlab {'tune' if args.tune else 'train'} {args.config} "
          f"(config '{job.cfg.name}', MLflow {redact(job.tracking_uri)})\n"
          f"  follow: oodlab jobs logs {job_id} --follow --address {address}\n"
          f"  stop:   oodlab jobs stop {job_id} --address {address}", flush=True)
    return _follow(address, job_id) if args.follow else 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from datetime import datetime

    from oodlab.distributed import submit
    from oodlab.distributed.cluster_python import is_check

    jobs = _job_server(lambda: submit.list_jobs(submit.resolve_address(args.address)))
    if jobs is None:
        return 1
    rows = [[j.submission_id or j.job_id, str(j.status), datetime.fromtimestamp(j.start_time / 1000).strftime("%Y-%m-%d %H:%M")
             if j.start_time else "-", j.entrypoint] for j in jobs if not is_check(j)]  # (submit's check of the python)
    print(markdown(["job", "status", "started", "command"], rows) if rows else "no jobs")
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    from oodlab.distributed import submit

    address = submit.resolve_address(args.address)
    if args.follow:
        return _follow(address, args.job_id)
    text = _job_server(lambda: submit.logs(address, args.job_id))
    if text is None:
        return 1
    print(text, end="")
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    from oodlab.distributed import submit

    state = _job_server(lambda: submit.stop(submit.resolve_address(args.address), args.job_id))
    if state is None:
        return 1
    print(f"job {args.job_id}: {state}")
    return 0 if state == submit.JobStatus.STOPPED else 1


def _follow(address: str, job_id: str) -> int:
    """Stream a job's logs to its end: 0 if it succeeded, 1 if not, 130 on Ctrl-C (the job goes on)."""
    from oodlab.distributed import submit

    try:
        state = _job_server(lambda: submit.follow(address, job_id))
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. Stop it with: oodlab jobs stop {job_id} --address {address}")
        return 130
    if state is None:
        return 1
    print(f"job {job_id}: {state}")
    return 0 if state == submit.JobStatus.SUCCEEDED else 1


def _job_server(action):
    """`action()`, or None after printing why the job server failed (exit status 1, not a config error)."""
    from oodlab.distributed.submit import JobServerError

    try:
        return action()
    except JobServerError as err:
        print(f"oodlab: error: {err}", file=sys.stderr)
        return None


if __name__ == "__main__":
    sys.exit(main())
