"""Science on Fashion-MNIST: the parity-checked LeNet-style CNN trained to memorise its training set, then Unleashing
Mask, UMAP and the background loss (and every other train stage of the config) against it, over seeds, per OOD set
beside its pixel floor and the published numbers.

    python bench/science_fmnist.py [key.sub=value ...] [--seeds 0 1 2] [--results bench/RESULTS.md]

Builds the fmnist betons once, runs configs/fmnist_science.yaml through the Ray Train pipeline once per seed
(`oodlab train` in-process), reads every number back from the pipeline state and MLflow, and writes into RESULTS.md
(between the science_fmnist markers, rewritten after every seed) and bench/science_fmnist.png:
- the premise: the baseline's train accuracy per epoch (UM needs a model that has memorised its atypical samples);
- the baseline on every OOD set, every main score, beside each set's pixel floor and the published numbers;
- UM's first finding: the epoch the OOD validation split picks (the product's rule: lowest validation FPR95 among
  epochs within 5 points of the best ID validation accuracy) against the final epoch, on every test set;
- each fine-tuned model against the baseline: mean +- std over seeds and the per-seed paired differences.
Test sets choose nothing: they are read after training, for the tables only.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from harness import write_section

from oodlab import config
from oodlab.datapipes.benchmarks import Benchmark, floors, get_benchmark
from oodlab.report import markdown

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "fmnist_science.yaml"
SCORES = ["msp", "energy", "knn", "mahalanobis"]  # compared for every method
BASELINE_SCORES = [*SCORES, "maxlogit", "gen", "odin", "react", "ash", "scale", "nnguide", "fdbd", "vim", "featnorm"]  # for the baseline
BASELINE = "baseline"
PREMISE = 99.0  # train accuracy (percent) the baseline must reach: UM's memorising model
FIGURE = ROOT / "bench" / "science_fmnist.png"


def rows_of(bench: Benchmark) -> list[tuple[str, str]]:
    """(row, group) in table order: each group's sets then its mean, `all` after the groups it averages, `val`."""
    rows = []
    for averaged in (True, False):
        for group, sets in bench.groups.items():
            if (group in bench.outside_all) != averaged:
                rows += [(s, group) for s in sets] + [(group, "(mean)")]
        if averaged:
            rows.append(("all", "(mean)"))
    return rows + [("val", "(validation)")]


def run_seed(seed: int, overrides: list[str]) -> dict:
    """One fresh pipeline run: every stage's final metrics, the baseline's per-epoch history, wall seconds."""
    from mlflow.tracking import MlflowClient

    from oodlab.datapipes.build import build
    from oodlab.distributed import pipeline

    cfg = config.load(CONFIG, [f"seed={seed}", f"name=fmnist-science-s{seed}", *overrides], base=ROOT)
    bench = get_benchmark(cfg.data.benchmark)
    build(bench, cfg.data.root, progress=False)
    start = time.perf_counter()
    state = pipeline.run(cfg)
    seconds = time.perf_counter() - start
    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = state.stages[BASELINE].run_id
    keys = ["train/acc", "id_acc", "id_val_acc", "best_ood_epoch"]
    keys += [f"ood/{s}/{r}/{m}" for s in cfg.eval.scores for r, _ in rows_of(bench) for m in ("auroc", "fpr95")]
    history = {k: {m.step: m.value for m in client.get_metric_history(run, k)} for k in keys}
    return {"final": pipeline.results(state), "history": history, "seconds": seconds, "cfg": cfg, "bench": bench}


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.2f} +- {np.std(values):.2f}"


def paired(values: list[float]) -> str:
    """Mean +- std of per-seed differences, and each seed's."""
    return f"{np.mean(values):+.2f} +- {np.std(values):.2f} ({', '.join(f'{v:+.1f}' for v in values)})"


def premise_table(runs: list[dict], seeds: list[int]) -> str:
    head = ["seed", "epochs", "train acc, last epoch", f"first epoch >= {PREMISE:g}%", "test acc", "minutes"]
    rows = []
    for seed, r in zip(seeds, runs):
        acc = r["history"]["train/acc"]
        reached = [e + 1 for e, v in sorted(acc.items()) if v >= PREMISE]
        rows.append([seed, len(acc), f"{acc[max(acc)]:.2f}", reached[0] if reached else "never",
                     f"{r['final'][BASELINE]['id_acc']:.2f}", f"{r['seconds'] / 60:.1f}"])
    return markdown(head, rows)


def baseline_table(runs: list[dict], bench: Benchmark, floor: dict[str, float]) -> str:
    finals = [r["final"][BASELINE] for r in runs]
    scores = [s for s in BASELINE_SCORES if f"ood/{s}/all/auroc" in finals[0]]
    head = ["set", "group", "pixel floor", *(f"{s} AUROC" for s in scores)]
    rows = [[name, group, _fmt(floor.get(name)), *(mean_std([f[f"ood/{s}/{name}/auroc"] for f in finals]) for s in scores)]
            for name, group in rows_of(bench)]
    published = {(p.set, p.score): p for p in bench.spec.published}
    rows += [[f"published: {p.set}", "", "", *(f"{p.auroc} ({p.source})" if (p.set, s) == key else "" for s in scores)]
             for key, p in published.items()]
    return markdown(head, rows)


def first_finding_table(runs: list[dict], bench: Benchmark, floor: dict[str, float], scores: list[str]) -> str:
    picked = [int(r["history"]["best_ood_epoch"][max(r["history"]["best_ood_epoch"])]) - 1 for r in runs]
    last = [max(r["history"]["train/acc"]) for r in runs]
    head = ["set", "pixel floor"] + [f"{s} AUROC {w}" for s in scores for w in ("picked epoch", "final", "picked - final")]
    rows = [["epoch (per seed)", "", *(", ".join(str(e + 1) for e in epochs) if w != "picked - final" else ""
                                      for _ in scores for w, epochs in (("picked", picked), ("final", last), ("picked - final", last)))]]
    for name, _ in rows_of(bench):
        cells = [name, _fmt(floor.get(name))]
        for s in scores:
            series = [r["history"][f"ood/{s}/{name}/auroc"] for r in runs]
            at_pick, at_last = [h[e] for h, e in zip(series, picked)], [h[e] for h, e in zip(series, last)]
            cells += [mean_std(at_pick), mean_std(at_last), paired([a - b for a, b in zip(at_pick, at_last)])]
        rows.append(cells)
    return markdown(head, rows)


def method_tables(runs: list[dict], bench: Benchmark, floor: dict[str, float], methods: list[str]) -> list[str]:
    out = []
    base = [r["final"][BASELINE] for r in runs]
    for score in SCORES:
        head = ["set", "pixel floor", f"{BASELINE} {score}", *(f"{m} - {BASELINE}" for m in methods)]
        keys = [("id_acc", "id_acc", None)] + [(name, f"ood/{score}/{name}/auroc", floor.get(name)) for name, _ in rows_of(bench)]
        rows = [[name, _fmt(fl), mean_std([b[key] for b in base]),
                 *(paired([r["final"][m][key] - b[key] for r, b in zip(runs, base)]) for m in methods)]
                for name, key, fl in keys]
        out += [f"AUROC of **{score}** (id_acc: test accuracy), method minus baseline in points, mean +- std over seeds "
                "(per-seed differences in brackets):", "", markdown(head, rows), ""]
    return out


def summary_table(runs: list[dict], models: list[str], bench: Benchmark) -> str:
    columns = bench.table_columns
    head = ["model", "score", *(f"{c} AUROC" for c in columns)]
    rows = [[m, s, *(f"{np.mean([r['final'][m][f'ood/{s}/{c}/auroc'] for r in runs]):.1f}" for c in columns)]
            for m in models for s in SCORES]
    return markdown(head, rows)


def curves_figure(runs: list[dict], bench: Benchmark, select: str) -> None:
    """Per-epoch train accuracy and the selected score's AUROC per group (mean over seeds), picked epochs marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    acc_ax, ood_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    epochs = np.arange(1, len(runs[0]["history"]["train/acc"]) + 1)
    for key, label in (("train/acc", "train"), ("id_acc", "test"), ("id_val_acc", "ID validation")):
        acc_ax.plot(epochs, np.mean([[r["history"][key][e - 1] for e in epochs] for r in runs], 0), label=label)
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="baseline accuracy (mean over seeds)")
    for column in [*bench.table_columns, "val"]:
        ood_ax.plot(epochs, np.mean([[r["history"][f"ood/{select}/{column}/auroc"][e - 1] for e in epochs] for r in runs], 0),
                    label=column, linestyle="--" if column == "val" else "-")
    for r in runs:
        ood_ax.axvline(r["history"]["best_ood_epoch"][max(r["history"]["best_ood_epoch"])], color="gray", lw=0.8)
    ood_ax.set(xlabel="epoch", ylabel=f"{select} AUROC (%)", title="OOD per epoch (gray: epochs picked on val)")
    for ax in (acc_ax, ood_ax):
        ax.legend(fontsize="small")
    fig.savefig(FIGURE, dpi=90)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(runs: list[dict], seeds: list[int], command: str, minutes: float) -> str:
    cfg, bench = runs[0]["cfg"], runs[0]["bench"]
    floor = floors(bench, cfg.data.root)
    methods = [name for name, stage in cfg.train_stages().items() if name != BASELINE]
    stage = cfg.stages[BASELINE]
    head = (f"## Science: Fashion-MNIST (`bench/science_fmnist.py`)\n\nCommand: `{command}` "
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; seeds {seeds} in {minutes:.1f} min on this machine, "
            f"load average {os.getloadavg()[0]:.1f}). Config configs/fmnist_science.yaml: `{cfg.model.name}` on the fmnist "
            f"benchmark ({cfg.data.train_limit or 'all'} id_train images), baseline {stage.epochs} epochs of SGD lr "
            f"{stage.lr}, cosine, weight decay {stage.weight_decay}, batch {cfg.data.batch_size}, no augmentation; then "
            f"{', '.join(methods)} from it. Percent; pixel floor: the best AUROC of no-network pixel statistics against "
            "ID test (a reference, not a filter). Test sets choose nothing.\n")
    parts = [head, "**Premise** (Unleashing Mask needs a model that has memorised its training set):", "",
             premise_table(runs, seeds), "",
             "**Baseline** on every OOD set (mean +- std over seeds; groups are equal-weight means of their sets; "
             f"{', '.join(bench.outside_all) or 'no group'} reported on its own, not in all; val: the OOD validation split):",
             "", baseline_table(runs, bench, floor), "",
             "**UM's first finding**: the epoch the OOD validation split picks against the final epoch, on every test "
             f"set (scores evaluated every epoch: {', '.join(cfg.eval.scores)}). Per-epoch curves: "
             f"[{FIGURE.name}]({FIGURE.name}).", "", first_finding_table(runs, bench, floor, cfg.eval.scores), "",
             "**The methods against the baseline**:", "", *method_tables(runs, bench, floor, methods),
             "**Summary**: AUROC per group, mean over seeds:", "", summary_table(runs, [BASELINE, *methods], bench)]
    curves_figure(runs, bench, cfg.eval.select)
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. stages.baseline.epochs=4")
    args = parser.parse_args()
    start = time.perf_counter()
    storage = ROOT / ".oodlab" / "science" / time.strftime("%Y%m%d-%H%M%S")  # fresh: never resumes an older run
    command = " ".join(["python bench/science_fmnist.py", *args.overrides, "--seeds", *map(str, args.seeds)])
    runs: list[dict] = []
    for seed in args.seeds:  # the tables are rewritten after every seed: an interrupted run keeps its seeds
        runs.append(run_seed(seed, [f"ray.storage_path={storage}", *args.overrides]))
        text = report(runs, args.seeds[:len(runs)], command, (time.perf_counter() - start) / 60)
        write_section(args.results, "science_fmnist", text)
    print(text)


if __name__ == "__main__":
    main()
