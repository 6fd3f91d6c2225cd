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


FLOOR = "pixel floor"  # the row of the no-network pixel-statistics AUROC (oodlab.datapipes.floor)
FLOOR_NOTE = ("pixel floor: the best AUROC of no-network pixel statistics (brightness, border brightness, near-black "
              "fraction, pixel std) against ID test; a score far below it fails on a change of format")


def metrics_markdown(metrics: Metrics, id_acc: float, columns: Sequence[str], floors: Mapping[str, float]) -> str:
    """Scores as rows (the pixel floor first); for each set/group in `columns`, FPR95 (ID positive) and AUROC."""
    head = ["score"] + [f"{c} {m}" for c in columns for m in ("fpr95", "auroc")]
    rows = [[FLOOR] + [_fmt(floors.get(c)) if m == "auroc" else "" for c in columns for m in ("fpr95", "auroc")]]
    rows += [[score] + [f"{100 * per_set[c][m]:.2f}" for c in columns for m in ("fpr95", "auroc")]
             for score, per_set in metrics.items()]
    note = (f"ID accuracy {100 * id_acc:.2f}%. fpr95: OOD samples accepted at 95% ID recall (ID positive; "
            f"lower is better). {FLOOR_NOTE}. Full metrics (fpr95_oodpos, aupr_in, aupr_out) in metrics.csv.\n\n")
    return note + markdown(head, rows)


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def auroc_table(runs: Mapping[str, Mapping[str, float]], scores: Sequence[str], columns: Sequence[str],
                floors: Mapping[str, float]) -> tuple[list[str], list[list[str]]]:
    """Models x scores as rows, AUROC (percent) per set or group in `columns`; the pixel floor as the first row."""
    head = ["model", "id_acc", "score", *columns]
    rows = [[FLOOR, "", "", *(_fmt(floors.get(c)) for c in columns)]] if floors else []
    for name, flat in runs.items():
        for i, score in enumerate(scores):
            first = i == 0
            rows.append([name if first else "", _fmt(flat.get("id_acc")) if first else "", score,
                         *(_fmt(flat.get(f"ood/{score}/{c}/auroc")) for c in columns)])
    return head, rows


def set_table(flat: Mapping[str, float], scores: Sequence[str], groups: Mapping[str, Sequence[str]],
              outside_all: Collection[str], floors: Mapping[str, float]) -> tuple[list[str], list[list[str]]]:
    """One model's flat metrics with OOD sets and their groups as rows (`all` after the groups it averages, the
    groups reported on their own after it, then `val`): the pixel floor, then each score's AUROC and FPR95."""
    head = ["set", "group", "floor", *(f"{s} auroc" for s in scores), *(f"{s} fpr95" for s in scores)]
    rows: list[list[str]] = []

    def add(name: str, group: str) -> None:
        rows.append([name, group, _fmt(floors.get(name)), *(_fmt(flat.get(f"ood/{s}/{name}/{m}"))
                                                          for m in ("auroc", "fpr95") for s in scores)])

    for averaged in (True, False):
        for group, sets in groups.items():
            if (group in outside_all) != averaged:
                for name in sets:
                    add(name, group)
                add(group, "(mean)")
        if averaged:
            add("all", "(mean)")
    add("val", "(validation)")
    return head, rows


def set_listing(groups: Mapping[str, Sequence[str]], sizes: Mapping[str, int], floors: Mapping[str, float],
                outside_all: Collection[str]) -> str:
    """One line per group naming its sets with their image counts and pixel floors."""
    lines = []
    for group, sets in groups.items():
        listed = ", ".join(f"{s} ({sizes[s]:,} images, floor {_fmt(floors.get(s))})" if s in sizes else s for s in sets)
        lines.append(f"  {group}: {listed}" + ("  [reported on its own, not in all]" if group in outside_all else ""))
    return "\n".join(lines)


def published_lines(published: Sequence[Mapping[str, object]], runs: Mapping[str, Mapping[str, float]],
                    floors: Mapping[str, float]) -> list[str]:
    """Each published number beside what every model here reaches on the same set and score, and the set's floor."""
    lines = []
    for p in published:
        key = f"ood/{p['score']}/{p['set']}/auroc"
        here = ", ".join(f"{name} {flat[key]:.1f}" for name, flat in runs.items() if key in flat)
        lines.append(f"  {p['set']} {p['score']} AUROC: published {p['auroc']} ({p['source']}); here: {here or '-'}; "
                     f"pixel floor {_fmt(floors.get(str(p['set'])))}")
    return lines


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


def score_table(runs: Mapping[str, Mapping[str, float]], score: str, columns: Sequence[str],
                floors: Mapping[str, float]) -> str:
    """One score across runs (flat metrics, percent): id_acc, then FPR95 and AUROC per set / group in `columns`,
    the pixel floor as the first row; the best value of each column in bold (lowest FPR95, highest AUROC and
    accuracy)."""
    keys = ["id_acc", *(f"ood/{score}/{c}/{m}" for c in columns for m in ("fpr95", "auroc"))]
    head = ["run", "id_acc", *(f"{c} {m}" for c in columns for m in ("fpr95", "auroc"))]
    best = {}
    for key in keys:
        values = [flat[key] for flat in runs.values() if key in flat]
        if values:
            best[key] = min(values) if key.endswith("fpr95") else max(values)
    rows = [[FLOOR, "", *(_fmt(floors.get(c)) if m == "auroc" else "" for c in columns for m in ("fpr95", "auroc"))]]
    rows += [[name, *(_fmt(flat.get(k)) for k in keys)] for name, flat in runs.items()]
    strong = {(1 + i, 1 + j) for i, flat in enumerate(runs.values()) for j, k in enumerate(keys)
              if k in flat and flat[k] == best[k]}
    return html_table(head, rows, strong)


def _bold(cell: str, on: bool) -> str:
    return f"<b>{cell}</b>" if on else cell
