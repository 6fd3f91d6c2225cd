"""Plain-text results: long CSV and markdown tables of OOD metrics (values in percent)."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence


Metrics = Mapping[str, Mapping[str, Mapping[str, float]]]  # score -> set | group -> metric -> fraction


def metrics_csv(metrics: Metrics, id_acc: float) -> str:
    """One row per (score, set or group, metric); the convention is named in the header."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["score", "set", "metric", "percent"])
    writer.writerow(["-", "id_test", "id_acc", f"{100 * id_acc:.4f}"])
    for score, per_set in metrics.items():
        for where, values in per_set.items():
            for name, value in values.items():
                writer.writerow([score, where, name, f"{100 * value:.4f}"])
    return out.getvalue()


def metrics_markdown(metrics: Metrics, id_acc: float, columns: Sequence[str]) -> str:
    """Scores as rows; for each set/group in `columns`, FPR95 (ID positive) and AUROC."""
    head = ["score"] + [f"{c} {m}" for c in columns for m in ("fpr95", "auroc")]
    rows = [[score] + [f"{100 * per_set[c][m]:.2f}" for c in columns for m in ("fpr95", "auroc")]
            for score, per_set in metrics.items()]
    note = (f"ID accuracy {100 * id_acc:.2f}%. fpr95: OOD samples accepted at 95% ID recall (ID positive; "
            "lower is better). Full metrics (fpr95_oodpos, aupr_in, aupr_out) in metrics.csv.\n\n")
    return note + markdown(head, rows)


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def comparison(runs: Mapping[str, Mapping[str, float]], score: str, groups: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Stages side by side from flat metrics (`id_acc`, `ood/<score>/<group>/<metric>`, percent)."""
    head = ["run", "id_acc"] + [f"{g} {m}" for g in groups for m in ("fpr95", "auroc")] + ["all aupr_in"]
    rows = []
    for name, flat in runs.items():
        cells = [name, _fmt(flat.get("id_acc"))]
        cells += [_fmt(flat.get(f"ood/{score}/{g}/{m}")) for g in groups for m in ("fpr95", "auroc")]
        cells.append(_fmt(flat.get(f"ood/{score}/all/aupr_in")))
        rows.append(cells)
    return head, rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


