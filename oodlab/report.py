"""Results as text: long CSV and markdown tables of OOD metrics (values in percent), and a self-contained
HTML page (tables, preformatted text, PNG figures inline as data URIs) for MLflow's artifact viewer."""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Collection, Mapping, Sequence


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


PAGE_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 7px}
td{text-align:right}td:first-child{text-align:left}th{background:#f2f2f2}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}img{max-width:560px;border:1px solid #ddd}
pre{background:#f6f6f6;padding:1em;font-size:12px}"""


def html_page(title: str, intro: str, sections: Sequence[tuple[str, str]]) -> str:
    """A standalone page: a title, an introductory paragraph, then (heading, body HTML) sections."""
    body = "\n".join(f"<h2>{html.escape(heading)}</h2>\n{content}" for heading, content in sections)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n<p>{html.escape(intro)}</p>\n"
            f"{body}\n</body></html>\n")


def html_table(head: Sequence[str], rows: Sequence[Sequence[object]], strong: Collection[tuple[int, int]] = ()) -> str:
    """A table of escaped cells; the (row, column) cells in `strong` are bold."""
    cells = ["<tr>" + "".join(f"<td>{_bold(html.escape(str(c)), (i, j) in strong)}</td>" for j, c in enumerate(row))
             + "</tr>" for i, row in enumerate(rows)]
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>\n" + "\n".join(cells)
            + "</table>")


def html_images(images: Sequence[tuple[str, bytes]]) -> str:
    """PNG images with captions, embedded as data URIs (the page needs no other file)."""
    return "\n".join(f"<figure><img alt=\"{html.escape(caption)}\" src=\"data:image/png;base64,"
                     f"{base64.b64encode(png).decode()}\"><figcaption>{html.escape(caption)}</figcaption></figure>"
                     for caption, png in images) or "<p>none</p>"


def html_pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def score_table(runs: Mapping[str, Mapping[str, float]], score: str, columns: Sequence[str]) -> str:
    """One score across runs (flat metrics, percent): id_acc, then FPR95 and AUROC per set / group in `columns`;
    the best value of each column in bold (lowest FPR95, highest AUROC and accuracy)."""
    keys = ["id_acc", *(f"ood/{score}/{c}/{m}" for c in columns for m in ("fpr95", "auroc"))]
    head = ["run", "id_acc", *(f"{c} {m}" for c in columns for m in ("fpr95", "auroc"))]
    best = {}
    for key in keys:
        values = [flat[key] for flat in runs.values() if key in flat]
        if values:
            best[key] = min(values) if key.endswith("fpr95") else max(values)
    rows = [[name, *(_fmt(flat.get(k)) for k in keys)] for name, flat in runs.items()]
    strong = {(i, 1 + j) for i, flat in enumerate(runs.values()) for j, k in enumerate(keys)
              if k in flat and flat[k] == best[k]}
    return html_table(head, rows, strong)


def _bold(cell: str, on: bool) -> str:
    return f"<b>{cell}</b>" if on else cell
