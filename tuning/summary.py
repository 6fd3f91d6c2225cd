"""A finished sweep as data and text: the trial table, the best trial, its config, a plot, the retrain command."""

from __future__ import annotations

import csv
import io
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from oodlab.config import Config, Dist, to_dict
from oodlab.datapipes.benchmarks import get_benchmark
from oodlab.datapipes.tables import results_text
from oodlab.report import markdown
from oodlab.scores import fit_splits
from oodlab.tuning.space import overrides, sampled_config

ENDED = ("done", "stopped", "error")


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]  # the sampled values, by override path
    status: str  # done | stopped (early, by the scheduler) | error | pending
    epochs: int  # epochs of the tuned stage reported to Tune
    objective: float | None
    metric: float | None  # search.metric at the last reported epoch
    id_val_acc: float | None


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    rows: list[TrialRow]
    expected: int  # trials of a complete sweep
    ended: int  # trials that finished, were stopped early, or failed
    best: TrialRow | None = None
    best_run_id: str | None = None  # the best trial's MLflow run
    best_runs: dict[str, dict[str, float]] = field(default_factory=dict)  # its stages' final metrics, test sets too

    @property
    def interrupted(self) -> bool:
        return self.ended < self.expected


def trial_row(trial_id: str, params: Mapping[str, Any], metrics: Mapping[str, Any], failed: bool, planned: int,
              metric: str) -> TrialRow:
    """One trial from Tune's last result for it (validation metrics only: that is all Tune holds)."""
    done = int(metrics.get("training_iteration", 0))
    status = "error" if failed else "pending" if not done else "done" if done >= planned else "stopped"
    return TrialRow(trial_id, dict(params), status, done, metrics.get("objective"), metrics.get(metric),
                    metrics.get("id_val_acc"))


def pick_best(rows: Sequence[TrialRow], mode: str) -> TrialRow | None:
    """Best objective among trials that trained every epoch (early-stopped ones only if none did)."""
    scored = [r for r in rows if r.objective is not None and r.status != "error"]
    pool = [r for r in scored if r.status == "done"] or scored
    if not pool:
        return None
    return (min if mode == "min" else max)(pool, key=lambda r: r.objective)


def columns(keys: Sequence[str], metric: str) -> list[str]:
    return ["trial", "status", "epochs", *keys, "objective", metric, "id_val_acc"]


def trials_csv(rows: Sequence[TrialRow], keys: Sequence[str], metric: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns(keys, metric))
    for r in rows:
        writer.writerow([r.trial_id, r.status, r.epochs, *(r.params[k] for k in keys), _raw(r.objective), _raw(r.metric),
                         _raw(r.id_val_acc)])
    return out.getvalue()


def trials_table(rows: Sequence[TrialRow], keys: Sequence[str], metric: str,
                 best: TrialRow | None) -> tuple[list[str], list[list[Any]]]:
    body = [[f"{r.trial_id}{' (best)' if r is best else ''}", r.status, r.epochs, *(_short(r.params[k]) for k in keys),
             _pct(r.objective), _pct(r.metric), _pct(r.id_val_acc)] for r in rows]
    return columns(keys, metric), body


def trials_markdown(rows: Sequence[TrialRow], keys: Sequence[str], metric: str, best: TrialRow | None) -> str:
    return markdown(*trials_table(rows, keys, metric, best))


def objective_figure(name: str, rows: Sequence[TrialRow], space: Mapping[str, Dist], best: TrialRow | None,
                     metric: str, mode: str) -> Figure:
    """Objective against each searched value, one panel per dimension; the best trial starred."""
    scored = [r for r in rows if r.objective is not None]
    ncols = min(3, len(space))
    nrows = -(-len(space) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"{name}: objective {metric}, validation ({'lower' if mode == 'min' else 'higher'} is better)")
    for i, (key, dist) in enumerate(space.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        xs, ticks = _positions([r.params[key] for r in scored])
        for status, marker in (("done", "o"), ("stopped", "x"), ("error", "s")):
            picked = [(x, r.objective) for x, r in zip(xs, scored) if r.status == status]
            if picked:
                ax.scatter(*zip(*picked), marker=marker, label=status)
        if best is not None and best in scored:
            ax.scatter([xs[scored.index(best)]], [best.objective], marker="*", s=220, color="red", label="best")
        if ticks:
            ax.set_xticks(range(len(ticks)), ticks)
        elif dist.dist == "loguniform":
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel="objective")
        if scored:
            ax.legend(fontsize="small")
    return fig


SELECTION_HEAD = ["split", "read for", "file"]


def selection(cfg: Config) -> tuple[str, list[list[str]]]:
    """Which data chooses the winner: a sentence, and per split the search reads, why and its file.

    Only validation splits (and the ID splits the objective's score is fitted on) reach the objective, ASHA and
    the searcher.
    """
    search, bench = cfg.search, get_benchmark(cfg.data.benchmark)
    uses: dict[str, list[str]] = {}
    if search.metric == "id_val_acc":
        uses["id_val"] = ["the objective id_val_acc"]
    else:
        score = search.metric.split("/")[1]
        uses["ood_val"] = [f"the objective {search.metric} (OOD side)"]
        uses["id_val"] = [f"the objective {search.metric} (ID side)"]
        if search.max_id_acc_drop is not None:
            uses["id_val"].append(f"id_val_acc (the {search.max_id_acc_drop:g}-point bound)")
        for split in fit_splits([score]):
            uses.setdefault(split, []).append(f"fitting the {score} score")
    rows = [[split, "; ".join(why), str(bench.path(cfg.data.root, split))] for split, why in uses.items()]
    tests = ", ".join(["id_test", *bench.ood_test])
    sentence = (f"Which data chooses the winner: {' and '.join(s for s in uses if s != 'id_train')} of benchmark "
                f"{cfg.data.benchmark}, through {search.metric} ({search.mode}) only; its test sets ({tests}) are read "
                "after the choice:")
    return sentence, rows


def best_config_yaml(cfg: Config, params: Mapping[str, Any]) -> str:
    """The sweep's config with the best trial's values, named for retraining, without the search section."""
    raw = to_dict(cfg) | {"name": retrain_name(cfg), "search": None}
    return yaml.safe_dump(to_dict(sampled_config(raw, params)), sort_keys=False)


def retrain_name(cfg: Config) -> str:
    return f"{cfg.name}-best"


def retrain_command(config_path: str | Path, cli_overrides: Sequence[str], cfg: Config, best: TrialRow) -> str:
    return shlex.join(["oodlab", "train", str(config_path), *cli_overrides, *overrides(best.params),
                       f"name={retrain_name(cfg)}"])


def text(result: SweepResult, cfg: Config, config_path: str | Path, cli_overrides: Sequence[str]) -> str:
    """What `oodlab tune` prints at the end."""
    search = cfg.search
    counts = {s: sum(r.status == s for r in result.rows) for s in ENDED}
    bound = (f"; penalised beyond a {search.max_id_acc_drop:g}-point ID val accuracy drop"
             if search.max_id_acc_drop is not None else "")
    lines = [f"\nSweep {result.name}: {result.ended}/{result.expected} trials ended ({counts['done']} done, "
             f"{counts['stopped']} stopped early, {counts['error']} failed); objective {search.metric} "
             f"({search.mode}){bound}; best: among the trials that trained every epoch",
             trials_markdown(result.rows, list(search.space), search.metric, result.best)]
    sentence, rows = selection(cfg)
    lines += [sentence, markdown(SELECTION_HEAD, rows)]
    if result.interrupted:
        lines.append("Interrupted: rerun the same command to resume (finished trials are kept, not rerun).")
    elif result.best is not None:
        table = results_text(get_benchmark(cfg.data.benchmark), cfg.data.root, result.best_runs, cfg.eval.select)
        lines += [f"Best trial {result.best.trial_id} (MLflow run {result.best_run_id}); its test OOD sets, read only "
                  "now that validation chose it:", table,
                  "Retrain it at full scale (raise the epochs if the sweep shortened them):",
                  "  " + retrain_command(config_path, cli_overrides, cfg, result.best)]
    return "\n".join(lines)


def _positions(values: list[Any]) -> tuple[list[float], list[str]]:
    """Numbers stay numbers; anything else becomes categories (positions plus tick labels)."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], []
    labels = sorted({str(v) for v in values})
    return [float(labels.index(str(v))) for v in values], labels


def _raw(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
