"""FFCV .beton files: atomic writes with a manifest, and a cheap header/metadata inspection.

Every beton has two fields: `image` (RGBImageField) and `label` (IntField, -1 for OOD sets).
A write goes to a hidden temp file beside the target and is renamed into place only when complete,
so an interrupted write never leaves a file that looks finished. The manifest `<file>.json` records
what was written (count, options, a caller's stamp) so callers can tell a stale file from a current one.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.reader import Reader
from ffcv.writer import DatasetWriter

from oodlab.atomic import atomic_path, write_text
from oodlab.datapipes.sources import ImageSource

FIELDS = ("image", "label")


@dataclass(frozen=True)
class ImageOptions:
    """FFCV RGBImageField options, as the ffcv-imagenet recipe exposes them."""

    write_mode: Literal["raw", "jpg", "smart", "proportion"] = "raw"
    max_resolution: int | None = None  # longest side after resizing at write time
    jpeg_quality: int = 90
    compress_probability: float = 0.5  # write_mode=proportion: fraction JPEG-compressed
    smart_threshold: int | None = None  # write_mode=smart: compress when raw is this many times bigger

    def __post_init__(self) -> None:
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality: {self.jpeg_quality} is outside 1..100")
        if not 0 <= self.compress_probability <= 1:
            raise ValueError(f"compress_probability: {self.compress_probability} is outside 0..1")
        if self.max_resolution is not None and self.max_resolution < 8:
            raise ValueError(f"max_resolution: {self.max_resolution} is too small (at least 8)")


class BetonError(ValueError):
    """A .beton file is missing, truncated or not an oodlab image/label file."""


def manifest_path(path: Path) -> Path:
    return Path(f"{path}.json")


def write(source: ImageSource, path: str | Path, options: ImageOptions = ImageOptions(),
          workers: int = 1, stamp: dict[str, Any] | None = None) -> Path:
    """Write `source` to `path` atomically (FFCV shows a progress bar); return the path."""
    path = Path(path)
    if len(source) == 0:
        raise ValueError(f"{source.name}: nothing to write (0 images)")
    fields = {
        "image": RGBImageField(options.write_mode, options.max_resolution, options.smart_threshold,
                               options.jpeg_quality, options.compress_probability),
        "label": IntField(),
    }
    with atomic_path(path) as tmp:
        DatasetWriter(str(tmp), fields, num_workers=workers).from_indexed_dataset(source)
    manifest = {"source": source.name, "count": len(source), "classes": source.classes,
                "options": asdict(options), "stamp": stamp or {}}
    write_text(manifest_path(path), json.dumps(manifest, indent=1))
    return path


def is_current(path: Path, stamp: dict[str, Any]) -> bool:
    """True when `path` exists with a manifest carrying exactly this stamp."""
    meta = manifest_path(path)
    if not (path.is_file() and meta.is_file()):
        return False
    try:
        return json.loads(meta.read_text()).get("stamp") == json.loads(json.dumps(stamp))
    except json.JSONDecodeError:
        return False


@dataclass
class BetonInfo:
    path: Path
    count: int
    fields: list[str]
    label_counts: dict[int, int]
    min_size: tuple[int, int]  # (height, width) of the smallest stored image
    max_size: tuple[int, int]

    def describe(self) -> str:
        labels = ", ".join(f"{k}: {v}" for k, v in sorted(self.label_counts.items()))
        return (f"{self.path}: {self.count} samples, fields {', '.join(self.fields)}\n"
                f"  image sizes {self.min_size} .. {self.max_size} (HxW)\n  labels {{{labels}}}")


def read_info(path: str | Path) -> BetonInfo:
    """Header and metadata of a beton (no image decoding); BetonError if it is not a readable one."""
    path = Path(path)
    if not path.is_file():
        raise BetonError(f"{path}: no such file")
    try:
        reader = Reader(str(path))
        meta = reader.metadata
        names = reader.field_names
        fields = {n: meta[f"f{i}"] for i, n in enumerate(names)}
        images = fields["image"]
        labels = np.asarray(fields["label"])
        _check_allocations(reader, path)
    except BetonError:
        raise
    except Exception as err:  # FFCV raises assorted errors on damaged files
        raise BetonError(f"{path}: not a readable .beton ({type(err).__name__}: {err}); rewrite it") from None
    if names != list(FIELDS):
        raise BetonError(f"{path}: fields {names}, expected {list(FIELDS)}; write it with `oodlab data write`")
    sizes = np.stack([images["height"], images["width"]], axis=1)
    return BetonInfo(
        path=path, count=int(reader.num_samples), fields=names,
        label_counts=dict(sorted(Counter(labels.tolist()).items())),
        min_size=tuple(int(v) for v in sizes.min(axis=0)), max_size=tuple(int(v) for v in sizes.max(axis=0)),
    )


def _check_allocations(reader: Reader, path: Path) -> None:
    """A truncated file has allocations pointing past its end."""
    table = reader.alloc_table
    if len(table) == 0:
        return
    end = int((table["ptr"] + table["size"]).max())
    if end > path.stat().st_size:
        raise BetonError(f"{path}: truncated ({path.stat().st_size} bytes, data ends at {end}); rewrite it")
