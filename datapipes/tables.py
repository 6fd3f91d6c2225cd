"""A benchmark's result table as the terminal shows it after a run (`oodlab demo`, `train`, a sweep's best trial):
AUROC of the main scores per group beside the pixel floors, the sets of each group with their sizes and floors,
and the benchmark's published numbers beside what the models here reach."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from oodlab.datapipes import floor
from oodlab.datapipes.benchmarks import Benchmark, floor_path, floors
from oodlab.report import FLOOR_NOTE, auroc_table, markdown, published_lines, set_listing

SHOWN_SCORES = ("msp", "energy", "knn", "mahalanobis")  # shown when evaluated; else the config's selected score


def results_text(bench: Benchmark, root: Path, runs: Mapping[str, Mapping[str, float]], select: str) -> str:
    """The models' (name -> flat metrics, percent) AUROC per group, then the sets, then the published numbers."""
    scored = {name: m for name, m in runs.items() if "id_acc" in m}
    if not scored:
        return ""
    scores = [s for s in SHOWN_SCORES if any(f"ood/{s}/all/auroc" in m for m in scored.values())] or [select]
    by_column = floors(bench, root)
    published = [p.model_dump() for p in bench.spec.published]
    columns = [*bench.table_columns, *dict.fromkeys(p["set"] for p in published)]
    sizes = {name: f["images"] for name, f in floor.read(floor_path(bench, root)).items()}
    lines = [f"\nAUROC per group of OOD sets (percent, ID test vs OOD; 50 = chance; {FLOOR_NOTE})",
             markdown(*auroc_table(scored, scores, columns, by_column)),
             "Sets (images, pixel floor):", set_listing(bench.groups, sizes, by_column, bench.outside_all)]
    if published:
        lines += ["Published numbers beside these:", *published_lines(published, scored, by_column)]
    if any(m.get(f"ood/{s}/{c}/auroc", 50) < 50 for m in scored.values() for s in scores for c in columns):
        lines.append("Below 50: the model ranks that set as more in-distribution than ID itself (see the README: "
                     "what the pixel floor tells).")
    return "\n".join(lines)

