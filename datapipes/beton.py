"""FFCV .beton files: atomic, supervised writes with a manifest, and a cheap structural inspection.

Every beton has two fields: `image` (RGBImageField) and `label` (IntField, -1 for OOD sets).
A write goes to a hidden temp file beside the target and is renamed into place only when complete,
so an interrupted write never leaves a file that looks finished; the manifest `<file>.json` is written
after the rename and records what was written (count, options, skipped images, a caller's stamp), so
callers can tell a stale file from a current one. Decoding every image is `oodlab.datapipes.verify`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.reader import Reader
from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

from oodlab.atomic import atomic_path, write_text
from oodlab.datapipes.sources import ImageSource
from oodlab.datapipes.writer import SupervisedWriter

FIELDS = ("image", "label")
WRITE_MODES = ("raw", "jpg", "smart", "proportion")
_LISTED_LABELS = 20  # describe() draws a bar per label up to this many labels
_LISTED_SKIPPED = 5
_FIX = "rewrite it with `oodlab data write`"


@dataclass(frozen=True)
class ImageOptions:
    """FFCV RGBImageField options, as the ffcv-imagenet recipe exposes them."""

    write_mode: Literal["raw", "jpg", "smart", "proportion"] = "raw"
    max_resolution: int | None = None  # longest side after resizing at write time (only shrinks)
    jpeg_quality: int = 90
    compress_probability: float = 0.5  # write_mode=proportion: fraction JPEG-compressed
    smart_threshold: int | None = None  # write_mode=smart: JPEG-compress images whose raw size exceeds this (bytes)

    def __post_init__(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise ValueError(f"write_mode: {self.write_mode!r}; use one of {', '.join(WRITE_MODES)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality: {self.jpeg_quality} is outside 1..100")
        if not 0 <= self.compress_probability <= 1:
            raise ValueError(f"compress_probability: {self.compress_probability} is outside 0..1")
        if self.max_resolution is not None and self.max_resolution < 8:
            raise ValueError(f"max_resolution: {self.max_resolution} is too small (at least 8)")

    def fields(self) -> dict[str, Any]:
        return {
            "image": RGBImageField(self.write_mode, self.max_resolution, self.smart_threshold, self.jpeg_quality,
                                   self.compress_probability),
            "label": IntField(),
        }


class BetonError(ValueError):
    """A .beton file is missing, incomplete, truncated, corrupt or not an oodlab image/label file."""


def manifest_path(path: Path) -> Path:
    return Path(f"{path}.json")


def write(source: ImageSource, path: str | Path, options: ImageOptions = ImageOptions(), workers: int = 1,
          stamp: dict[str, Any] | None = None, skip_bad: bool = False, progress: bool = True) -> Path:
    """Write `source` to `path` atomically with a progress bar; return the path.

    An unreadable image stops the write with WriteError naming it (nothing is left at `path`); with
    skip_bad=True it is left out and listed in the manifest's "skipped". Never hangs on a failing worker.
    """
    path = Path(path)
    if len(source) == 0:
        raise ValueError(f"{source.name}: nothing to write (0 images)")
    if workers < 1:
        raise ValueError(f"workers: {workers}; use at least 1 writer process")
    manifest_path(path).unlink(missing_ok=True)  # a manifest never describes a file other than the one beside it
    with atomic_path(path) as tmp:
        desc = f"{source.name} -> {path.name}"
        writer = SupervisedWriter(str(tmp), options.fields(), workers, skip_bad, progress, desc)
        skipped = writer.write(source)
    manifest = {"source": source.name, "count": len(source) - len(skipped), "classes": source.classes,
                "options": asdict(options), "skipped": [f.message for f in skipped], "stamp": stamp or {}}
    write_text(manifest_path(path), json.dumps(manifest, indent=1))
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest written beside `path`, or {} when there is none (e.g. a beton written by other tools)."""
    meta = manifest_path(Path(path))
    try:
        return json.loads(meta.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def is_current(path: Path, stamp: dict[str, Any]) -> bool:
    """True when `path` exists with a manifest carrying exactly this stamp."""
    if not Path(path).is_file():
        return False
    return read_manifest(path).get("stamp") == json.loads(json.dumps(stamp))


@dataclass
class BetonInfo:
    path: Path
    count: int
    fields: list[str]
    label_counts: dict[int, int]
    min_size: tuple[int, int]  # (height, width) of the smallest stored image
    max_size: tuple[int, int]
    jpeg_count: int = 0  # images stored as JPEG (the rest raw)
    file_bytes: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        size = f"{self.file_bytes / 2**20:.1f} MiB"
        lines = [f"{self.path}: {self.count} samples, fields {', '.join(self.fields)}, {size}",
                 f"  images: {self.count - self.jpeg_count} raw, {self.jpeg_count} jpg; "
                 f"sizes {self.min_size[0]}x{self.min_size[1]} .. {self.max_size[0]}x{self.max_size[1]} (HxW)"]
        lines += label_histogram(self.label_counts)
        if self.manifest:
            lines.append(f"  written from {self.manifest.get('source')} with {self.manifest.get('options')}")
            skipped = self.manifest.get("skipped", [])
            if skipped:
                lines.append(f"  skipped {len(skipped)} unreadable images, e.g.:")
                lines += [f"    {m}" for m in skipped[:_LISTED_SKIPPED]]
        return "\n".join(lines)


def label_histogram(counts: dict[int, int], width: int = 40) -> list[str]:
    """Text histogram: one bar per label for few labels, else min / median / max per label."""
    if not counts:
        return ["  labels: none"]
    if list(counts) == [-1]:
        return ["  labels: all -1 (unlabeled OOD set)"]
    if len(counts) > _LISTED_LABELS:
        values = np.array(list(counts.values()))
        lo, hi = min(counts, key=counts.get), max(counts, key=counts.get)
        return [f"  labels: {len(counts)} distinct; per label min {counts[lo]} (label {lo}), "
                f"median {np.median(values):g}, max {counts[hi]} (label {hi})"]
    top = max(counts.values())
    bars = [f"  {label:>6} {n:>8} {'#' * max(1, round(width * n / top))}" for label, n in counts.items()]
    return ["  labels:", *bars]


def read_info(path: str | Path) -> BetonInfo:
    """Header, metadata and allocation table of a beton (no image decoding); BetonError if it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise BetonError(f"{path}: no such file")
    size = path.stat().st_size
    _check_header(path, size)
    try:
        reader = Reader(str(path))
    except Exception as err:  # FFCV raises assorted errors on damaged files
        raise BetonError(f"{path}: not a readable .beton ({type(err).__name__}: {err}); {_FIX}") from None
    names = reader.field_names
    if names != list(FIELDS):
        raise BetonError(f"{path}: fields {names}, expected {list(FIELDS)}; write it with `oodlab data write`")
    _check_tables(reader, path)
    images, labels = reader.metadata["f0"], np.asarray(reader.metadata["f1"])
    sizes = np.stack([images["height"], images["width"]], axis=1).astype(int)
    values, counts = np.unique(labels, return_counts=True)
    return BetonInfo(
        path=path, count=int(reader.num_samples), fields=names,
        label_counts={int(v): int(c) for v, c in zip(values, counts)},
        min_size=tuple(int(v) for v in sizes.min(axis=0)), max_size=tuple(int(v) for v in sizes.max(axis=0)),
        jpeg_count=int((images["mode"] == 0).sum()), file_bytes=size, manifest=read_manifest(path),
    )


def _check_header(path: Path, size: int) -> None:
    """The header is complete and points at an allocation table that lies inside the file."""
    if size < HeaderType.itemsize:
        raise BetonError(f"{path}: truncated or empty ({size} bytes, shorter than the header); {_FIX}")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise BetonError(f"{path}: not an FFCV v{CURRENT_VERSION} .beton (format version {header['version']}); {_FIX}")
    table_ptr = int(header["alloc_table_ptr"])
    if header["num_samples"] == 0 or table_ptr == 0:
        raise BetonError(f"{path}: incomplete (the write never finished: no allocation table); {_FIX}")
    if table_ptr > size or (size - table_ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise BetonError(f"{path}: truncated ({size} bytes; the allocation table starts at {table_ptr}); {_FIX}")
    rows = (size - table_ptr) // ALLOC_TABLE_TYPE.itemsize  # every sample's image has one at least
    if header["num_samples"] > rows:
        raise BetonError(f"{path}: corrupt (its header says {header['num_samples']:,} samples, its allocation table "
                         f"has {rows:,} rows); {_FIX}")


def _check_tables(reader: Reader, path: Path) -> None:
    """Every sample has its metadata row and image data, inside the data region."""
    n, table = int(reader.num_samples), reader.alloc_table
    if len(reader.metadata) != n:
        raise BetonError(f"{path}: truncated or corrupt ({len(reader.metadata)} metadata rows for {n} samples); {_FIX}")
    if len(table) and int((table["ptr"] + table["size"]).max()) > int(reader.header["alloc_table_ptr"]):
        raise BetonError(f"{path}: corrupt (image data runs past the allocation table); {_FIX}")
    images = reader.metadata["f0"]
    if not np.isin(images["data_ptr"], table["ptr"]).all() or (images["mode"] > 1).any():
        raise BetonError(f"{path}: corrupt (the image records of its {n} samples do not match the data); {_FIX}")
