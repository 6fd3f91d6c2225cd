"""`oodlab data build BENCH.yaml|NAME --out ROOT`: every .beton of a benchmark, from the sources its YAML names.

Every source is opened first: all that are missing or unreadable, class folders that differ between
ID train and test, and a class count that differs from `num_classes` are reported together before
anything is written. Then `<out>/<name>/benchmark.json` (class count, pixel mean / std of id.train)
and one .beton per split are written atomically, each stamped with what made it, so a rerun keeps
current files and an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from oodlab.atomic import write_text
from oodlab.datapipes import beton, floor
from oodlab.datapipes.benchmarks import (ID_SPLITS, OOD_VAL, Benchmark, BenchmarkError, HeldOut, SourceSpec, floor_path,
                                         source_specs, stats_path)
from oodlab.datapipes.glyphs import glyph_images
from oodlab.datapipes.packaged import crops, open_packaged
from oodlab.datapipes.sources import ImageSource, SourceError, open_source
from oodlab.datapipes.views import (ConcatSource, GraySource, PadSource, SquareSource, SubsetSource, first_of_shuffle,
                                   held_out_split, keep_labels)

RECIPE_VERSION = 1  # bump when anything below changes what gets written: current files are then rewritten
STATS_SAMPLES = 5000  # id.train images (evenly spaced) that the pixel mean / std are computed from


def source_base(bench: Benchmark, data_root: Path | None) -> Path | None:
    """Where relative source paths start: --root if given, else the YAML's folder (built-ins need --root)."""
    return Path(data_root).expanduser().resolve() if data_root is not None else bench.base


def resolve_path(spec: SourceSpec, base: Path | None) -> Path | None:
    if spec.path is None:
        return None
    path = Path(spec.path).expanduser()
    return path if path.is_absolute() or base is None else base / path


def open_spec(spec: SourceSpec, base: Path | None, name: str, ood: bool) -> ImageSource:
    """One source as the YAML describes it (labels -1 for OOD sets)."""
    if spec.parts:
        if not ood:
            raise SourceError("a list of sources (parts) is for OOD sets; ID splits need one labelled source")
        source: ImageSource = ConcatSource([open_spec(p, base, f"{name}-{i}", ood) for i, p in enumerate(spec.parts)],
                                           name)
        return _limited(source, spec)
    path = resolve_path(spec, base)
    if path is not None:
        try:
            found = path.exists()
        except OSError as err:  # a name too long for the file system, say
            raise SourceError(f"cannot look up {path}: {err.strerror}") from None
        if not found:
            raise SourceError(f"missing {path}")
        options = {k: v for k, v in (("split", spec.split), ("labels", spec.labels)) if v is not None}
        try:
            source = open_source(path, ood=ood and spec.only_labels is None, **options)
        except TypeError:
            raise SourceError(f"{path}: {', '.join(options)} does not apply to this kind of source") from None
    elif spec.package is not None:
        source = open_packaged(spec.package, spec.split)
    elif spec.glyphs is not None:
        source = glyph_images(spec.glyphs, spec.fonts, spec.count, name, base)
    else:
        source = crops(spec.crops or [], spec.count, spec.scale, spec.invert, name)
    if spec.only_labels is not None:
        source = keep_labels(source, spec.only_labels)
    source = _limited(source, spec)
    if spec.pad:
        source = PadSource(source, spec.pad)
    return source.as_ood() if ood and source.classes else source


def _limited(source: ImageSource, spec: SourceSpec) -> ImageSource:
    return source if spec.limit is None else first_of_shuffle(source, spec.limit)


def open_splits(bench: Benchmark, base: Path | None) -> dict[str, ImageSource]:
    """Every split's source, ready to write; SourceError listing every problem at once."""
    sources: dict[str, ImageSource] = {}
    errors = []
    for split, key, spec in source_specs(bench.spec):
        try:
            sources[split] = open_spec(spec, base, split, ood=split not in ID_SPLITS)
        except SourceError as err:
            errors.append(f"  {key}: {err}")
    if errors:
        raise SourceError(f"benchmark {bench.name}: {len(errors)} source(s) cannot be read; nothing was written:\n"
                          + "\n".join(errors))
    if isinstance(bench.spec.id.val, HeldOut):
        _hold_out(sources, bench.spec.id.val)
    _check_classes(bench, sources)
    return {split: _shaped(bench, sources[split]) for split in bench.files}


def _hold_out(sources: dict[str, ImageSource], val: HeldOut) -> None:
    """id_val = a stratified, deterministic part of id_train (or id_test), which keeps the rest."""
    split = f"id_{val.of}"
    source = sources[split]
    rest, held = held_out_split(source.labels, val.fraction, val.cap_per_class or len(source))
    sources[split] = SubsetSource(source, rest, source.name)
    sources["id_val"] = SubsetSource(source, held, f"{source.name}-val")


def _check_classes(bench: Benchmark, sources: dict[str, ImageSource]) -> None:
    train = sources["id_train"].classes
    for split in ("id_val", "id_test"):
        other = sources[split].classes
        if other != train:
            only_train, only_other = sorted(set(train) - set(other)), sorted(set(other) - set(train))
            raise SourceError(f"benchmark {bench.name}: {split} has {len(other)} classes, id_train {len(train)} "
                              f"(only in id_train: {only_train[:5]}, only in {split}: {only_other[:5]}); ID splits "
                              "must use the same class folders, or labels would not match")
    if bench.spec.num_classes is not None and bench.spec.num_classes != len(train):
        raise SourceError(f"num_classes: {bench.spec.num_classes}, but id.train has {len(train)} classes; fix "
                          "num_classes or the class folders")


def _shaped(bench: Benchmark, source: ImageSource) -> ImageSource:
    if bench.spec.color == "gray":
        source = GraySource(source)
    return SquareSource(source, bench.image_size) if bench.spec.write.square else source


def pixel_stats(source: ImageSource, samples: int = STATS_SAMPLES) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 scale) over up to `samples` evenly spaced images."""
    picks = np.unique(np.linspace(0, len(source) - 1, min(samples, len(source))).round().astype(int))
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for i in picks:
        pixels = source.load(int(i)).reshape(-1, 3).astype(np.float64) / 255
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


def write_options(bench: Benchmark) -> beton.ImageOptions:
    w = bench.spec.write
    return beton.ImageOptions(w.mode, w.max_resolution, w.jpeg_quality)


def stamps(bench: Benchmark, base: Path | None) -> dict[str, dict[str, Any]]:
    """What makes each split's file: its source(s), shape and write options (all ID splits share the ID spec)."""
    spec = bench.spec
    shape = {"recipe": RECIPE_VERSION, "image_size": spec.image_size, "color": spec.color,
             "write": spec.write.model_dump(mode="json"), "base": str(base)}
    id_spec = spec.id.model_dump(mode="json")
    out = {split: {**shape, "split": split, "id": id_spec} for split in ID_SPLITS}
    for split, _, src in source_specs(spec):
        if split not in ID_SPLITS:
            out[split] = {**shape, "split": split, "source": src.model_dump(mode="json")}
    return out


def build(bench: Benchmark, out: str | Path, data_root: str | Path | None = None, workers: int = 1,
          skip_bad: bool = False, force: bool = False, progress: bool = True,
          log: Callable[[str], None] = lambda line: None) -> dict[str, Path]:
    """Write every split of `bench` to out/<name>/<split>.beton; return {split: path} of those written now."""
    out = Path(out)
    base = source_base(bench, None if data_root is None else Path(data_root))
    if base is None and bench.needs_root():
        raise BenchmarkError(f"benchmark {bench.name}: its sources are paths relative to the folder that holds your data "
                             f"sets; pass it: `{bench.build_command(out)}`")
    sources = open_splits(bench, base)
    stamp = stamps(bench, base)
    _write_stats(bench, out, sources["id_train"], stamp["id_train"], log)
    written = {}
    for split, source in sources.items():
        path = bench.path(out, split)
        if not force and beton.is_current(path, stamp[split]):
            log(f"{split}: current ({path})")
            continue
        log(f"{split}: {len(source)} images from {source.name}")
        written[split] = beton.write(source, path, write_options(bench), workers, stamp=stamp[split],
                                     skip_bad=skip_bad, progress=progress)
    _write_floors(bench, out, sources, stamp, force, log)
    return written


def _write_floors(bench: Benchmark, out: Path, sources: dict[str, ImageSource], stamp: dict[str, dict[str, Any]],
                  force: bool, log: Callable[[str], None]) -> None:
    """pixel_floor.json: every OOD set's pixel floor against id_test (see oodlab.datapipes.floor)."""
    groups = {OOD_VAL: floor.VAL_GROUP} | {s: g for g, sets in bench.spec.groups().items() for s in sets}
    hashes = {s: floor.stamp_hash([floor.VERSION, stamp["id_test"], stamp[s]]) for s in groups}
    path = floor_path(bench, out)
    if not force and floor.is_current(path, hashes):
        return
    floors = floor.write(path, sources["id_test"], {s: (g, sources[s]) for s, g in groups.items()}, bench.image_size,
                         hashes)
    log("pixel floor (best AUROC of no-network pixel statistics vs id_test): "
        + ", ".join(f"{s} {f['auroc']:.1f}" for s, f in floors.items()))


def _write_stats(bench: Benchmark, out: Path, train: ImageSource, stamp: dict[str, Any],
                 log: Callable[[str], None]) -> None:
    """benchmark.json: class count and names, pixel mean / std (the YAML's, or computed from id.train)."""
    path = stats_path(bench, out)
    try:
        if json.loads(path.read_text()).get("stamp") == json.loads(json.dumps(stamp)):
            return
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    if bench.spec.mean is not None and bench.spec.std is not None:
        mean, std = list(bench.spec.mean), list(bench.spec.std)
    else:
        mean, std = pixel_stats(train)
        log(f"id_train pixel mean {mean}, std {std} (from {min(len(train), STATS_SAMPLES)} images)")
    stats = {"name": bench.name, "num_classes": len(train.classes), "classes": train.classes, "mean": mean,
             "std": std, "stamp": stamp}
    write_text(path, json.dumps(stats, indent=1))
