"""Benchmarks as data: a YAML file names the ID train / val / test sets, the OOD validation set and the
OOD test sets in groups. `load_benchmark(ref)` takes a built-in name (a YAML shipped in
`builtin_benchmarks/`) or the path of the user's own YAML; both go through the same schema.

```yaml
name: mybench                # folder <root>/<name>/ and MLflow tags
image_size: 32               # every set is resized (shorter side) + center-cropped to this
id:
  train: id/train            # a source (see SourceSpec); relative paths: relative to the YAML's folder
  test: id/test
  val: 0.1                   # a source, or the fraction of train held out (stratified, deterministic)
ood:
  val: ood_val               # the OOD validation set: the only OOD data any tuning may see
  near: {mnist59: near/mnist59}
  far: {textures: far/textures}
```

Built files live at `<root>/<name>/<split>.beton`; `<root>/<name>/benchmark.json` records the class
count and the pixel mean / std computed from id.train when the YAML gives none (`oodlab data build`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Discriminator, Field, Tag, ValidationError, model_validator

from oodlab import bounded_yaml
from oodlab.config import Classes, Config, Name, Samples, Section, describe_errors
from oodlab.datapipes import floor
from oodlab.datapipes.glyphs import CANVAS, FONT_COLLECTIONS
from oodlab.limits import (MAX_CLASSES, MAX_CROPS_BYTES, MAX_IMAGE_SIDE, MAX_IMAGE_SIZE,
                           MAX_WORKER_BATCH_BYTES, batch_cost, count, human_bytes, image_bytes, image_cost)

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin_benchmarks"
ID_SPLITS = ("id_train", "id_val", "id_test")
OOD_VAL = "ood_val"
OUTLIERS = "outliers"  # outlier exposure's training data: built, never evaluated
RESERVED_GROUPS = ("all", "val")  # metric names ood/<score>/all|val/... are taken
STATS_FILE = "benchmark.json"
FLOOR_FILE = "pixel_floor.json"  # oodlab.datapipes.floor

Unit = Annotated[float, Field(gt=0, le=1)]
Unit0 = Annotated[float, Field(ge=0, le=1)]
ImageSize = count(MAX_IMAGE_SIZE, "px", image_cost, low=8)
StoredSide = count(MAX_IMAGE_SIDE, "px", image_cost, low=8)
Label = Annotated[int, Field(ge=0, lt=MAX_CLASSES)]
CROP_PICTURE_SIDE = 512  # the short side of scikit-image's largest sample pictures (astronaut: 512 x 512)


class BenchmarkError(ValueError):
    """A benchmark YAML is malformed or inconsistent; the message names the key or path and the fix."""


KINDS = ("path", "package", "crops", "glyphs", "parts")


class SourceSpec(Section):
    """One set's images. Exactly one of `path` (a class folder, flat folder, image list .txt, CIFAR
    pickles folder, SVHN .mat, .npz or IDX file), `package` (real images a PyPI package ships, see
    `oodlab.datapipes.packaged`), `crops` (random crops of sample pictures), `glyphs` (characters rendered
    from fonts, see `oodlab.datapipes.glyphs`) or `parts` (several sources, one after another; in YAML a
    plain list of sources means the same)."""

    path: str | None = None
    package: str | None = None
    crops: list[str] | None = None
    glyphs: Annotated[str, Field(min_length=1, max_length=1000)] | None = None  # the characters to draw
    parts: list[SourceSpec] | None = None
    split: Literal["train", "test"] | None = None  # CIFAR pickles and packages: which official split
    labels: str | None = None  # IDX: the labels file (default: beside the images, official naming)
    only_labels: list[Label] | None = None  # keep the samples with these labels (e.g. MNIST digits 5-9)
    limit: Samples | None = None  # a deterministic subset: the first N of a seeded shuffle
    count: Samples = 300  # crops and glyphs: how many (held in memory while the benchmark builds: see _one_kind)
    scale: tuple[Unit, Unit] = (0.06, 0.3)  # crops: side as a fraction of the picture's shorter side
    invert: bool = False  # crops: 255 - pixels (dark ink on light paper -> light on dark)
    fonts: list[str] = ["matplotlib"]  # glyphs: font collections (see glyphs.FONT_COLLECTIONS) or .ttf/.otf files
    pad: Unit0 = 0.0  # black border on each side, a fraction of the longer side

    def shares_data_with(self, other: SourceSpec) -> bool:
        """Same file or folder (or one inside the other), same packaged set, a picture in common, or a glyph
        drawn from a font in common; a source of parts shares data when one of its parts does."""
        if self.parts or other.parts:
            mine, theirs = self.parts or [self], other.parts or [other]
            return any(a.shares_data_with(b) for a in mine for b in theirs)
        if self.path and other.path:
            a, b = (Path(p).expanduser() for p in (self.path, other.path))
            return a == b or a in b.parents or b in a.parents
        if self.package and other.package:
            return self.package == other.package and self.split == other.split
        if self.glyphs and other.glyphs:
            return bool(set(self.glyphs) & set(other.glyphs) and font_names(self.fonts) & font_names(other.fonts))
        return bool(self.crops and other.crops and set(self.crops) & set(other.crops))

    @model_validator(mode="after")
    def _one_kind(self) -> SourceSpec:
        kinds = [k for k in KINDS if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(f"set exactly one of {', '.join(KINDS)} (a string is a path, a list is parts)")
        if self.scale[0] > self.scale[1]:
            raise ValueError("scale: [low, high] needs low <= high")
        if self.crops or self.glyphs:
            side = round(self.scale[1] * CROP_PICTURE_SIDE) if self.crops else CANVAS
            most = self.count * image_bytes(side)
            if most > MAX_CROPS_BYTES:
                what = f"crops of up to {side}x{side} px (scale {self.scale[1]} of a {CROP_PICTURE_SIDE} px picture)" \
                    if self.crops else f"glyphs of {side}x{side} px"
                raise ValueError(f"count: {self.count:,} {what} may take {human_bytes(most)} in memory while the "
                                 f"benchmark builds, more than the {human_bytes(MAX_CROPS_BYTES)} oodlab accepts; "
                                 "lower count" + (" or scale" if self.crops else ""))
        return self


def font_names(fonts: list[str]) -> set[str]:
    """The font file names a `fonts:` list stands for (collections expanded), to compare two glyph sources."""
    return {n for f in fonts for n in (FONT_COLLECTIONS[f][1] if f in FONT_COLLECTIONS else [Path(f).name])}


def _as_source(value: Any) -> Any:
    if isinstance(value, list):
        return {"parts": [_as_source(v) for v in value]}
    return {"path": value} if isinstance(value, str) else value


Source = Annotated[SourceSpec, BeforeValidator(_as_source)]


class HeldOut(Section):
    """ID validation carved out of another ID split: per class min(cap, ceil(fraction * count)) samples."""

    fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    of: Literal["train", "test"] = "train"  # test: for pretrained weights that saw all of train (ImageNet)
    cap_per_class: Samples | None = None


def _val_kind(value: Any) -> str:
    held = isinstance(value, (int, float)) or isinstance(value, HeldOut) or (isinstance(value, dict) and "fraction" in value)
    return "held_out" if held else "source"


def _as_held_out(value: Any) -> Any:
    return {"fraction": value} if isinstance(value, (int, float)) else value


IdVal = Annotated[Union[Annotated[HeldOut, BeforeValidator(_as_held_out), Tag("held_out")], Annotated[Source, Tag("source")]],
                  Discriminator(_val_kind)]


class IdSpec(Section):
    train: Source
    test: Source
    val: IdVal = HeldOut()


class OodSpec(Section, extra="allow"):
    """`val` plus any number of named groups, each a mapping of set name -> source."""

    val: Source
    val_overlaps: list[str] = []  # test sets that share data with `val`: marked, and left out of every average
    all_groups: list[str] | None = None  # the groups the `all` average covers (default: every group)
    __pydantic_extra__: dict[str, dict[Name, Source]]


class WriteSpec(Section):
    mode: Literal["raw", "jpg"] = "raw"
    max_resolution: StoredSide | None = None  # longest side stored (with square: false)
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 90
    square: bool = True  # resize + center-crop to image_size when writing; false: crop when loading (ImageNet)


class Published(Section):
    """A published number to print beside oodlab's own: AUROC of `score` on OOD test set `set` (percent)."""

    set: Name
    score: str
    auroc: Annotated[float, Field(ge=0, le=100)]
    source: str  # the model and where the number comes from


def _as_outliers(value: Any) -> Any:
    """`outliers:` is one source (a path, a list, a mapping with a source's keys) or a mapping of names to sources."""
    one = isinstance(value, (str, list)) or (isinstance(value, dict) and bool(set(value) & set(SourceSpec.model_fields)))
    return {OUTLIERS: value} if one else value


class BenchmarkSpec(Section):
    name: Name
    image_size: ImageSize
    id: IdSpec
    ood: OodSpec
    num_classes: Classes | None = None  # default: the class count of id.train
    mean: tuple[Unit0, Unit0, Unit0] | None = None  # 0..1 scale; default: computed from id.train at build time
    std: tuple[Unit, Unit, Unit] | None = None
    augment: Literal["pad-crop", "random-resized-crop", "flip", "none"] = "pad-crop"  # train-time augmentation
    eval_crop: Unit = 1.0  # center-crop fraction of the shorter side at evaluation (ImageNet: 0.875)
    color: Literal["rgb", "gray"] = "rgb"  # gray: every set is converted to grayscale (3 equal channels)
    write: WriteSpec = WriteSpec()
    about: str = ""  # one line for humans: where the data comes from
    published: list[Published] = []  # published numbers the result tables print beside oodlab's
    # outlier exposure's training data (the `oe` method), one .beton of all parts; disjoint from every OOD set
    outliers: Annotated[dict[Name, Source], BeforeValidator(_as_outliers)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> BenchmarkSpec:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean: give both mean and std, or neither (then both are computed from id.train)")
        seen: dict[str, str] = {}
        for group, sets in self.groups().items():
            if group in RESERVED_GROUPS:
                raise ValueError(f"ood.{group}: '{group}' is reserved for the averages; name the group differently")
            if not isinstance(sets, dict) or not sets:
                raise ValueError(f"ood.{group}: a group maps set names to sources, e.g. {group}: {{myset: path/to/images}}")
            for name in sets:
                if name in seen or name in (*ID_SPLITS, OOD_VAL):
                    where = f"ood.{seen[name]}.{name}" if name in seen else "the reserved split names"
                    raise ValueError(f"ood.{group}.{name}: set name used twice (also in {where}); every set needs its "
                                     "own name: it names the file <root>/<name>/<set>.beton")
                seen[name] = group
        if not seen:
            raise ValueError("ood: no OOD test sets; add a group, e.g. far: {textures: path/to/textures}")
        unknown = [g for g in self.ood.all_groups or [] if g not in self.groups()]
        if unknown or self.ood.all_groups == []:
            raise ValueError(f"ood.all_groups: {unknown or '[]'} must name groups of this benchmark "
                             f"({sorted(self.groups())}); leave it out to average every group into `all`")
        unknown = [p.set for p in self.published if p.set not in seen]
        if unknown:
            raise ValueError(f"published: {unknown} are not OOD test sets of this benchmark ({sorted(seen)})")
        unknown = [s for s in self.ood.val_overlaps if s not in seen]
        if unknown:
            raise ValueError(f"ood.val_overlaps: {unknown} are not OOD test sets of this benchmark ({sorted(seen)})")
        evaluated = {"ood.val (the OOD validation split)": self.ood.val} | {
            f"ood.{group}.{name}": self.groups()[group][name] for name, group in seen.items()}
        for part, source in (self.outliers or {}).items():
            shared = [where for where, other in evaluated.items() if source.shares_data_with(other)]
            if shared:
                raise ValueError(f"outliers.{part}: shares its source with {', '.join(shared)}; outlier exposure would "
                                 "train on the data it is scored on. Give outliers data that no OOD set uses")
        for name, group in seen.items():
            if name not in self.ood.val_overlaps and self.ood.val.shares_data_with(self.groups()[group][name]):
                raise ValueError(f"ood.val: the OOD validation set shares its source with the test set ood.{group}.{name}; "
                                 "tuning on it would flatter that test set. Use disjoint data, or declare "
                                 f"`val_overlaps: [{name}]` under ood (reports then leave {name} out of every average)")
        return self

    def groups(self) -> dict[str, dict[str, SourceSpec]]:
        return dict(self.ood.__pydantic_extra__ or {})


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark: its spec, where relative source paths start, and what loaders and reports need."""

    spec: BenchmarkSpec
    ref: str  # what the user wrote: a built-in name or a YAML path
    base: Path | None  # folder that relative source paths are relative to (None: built-ins, given by --root)
    num_classes: int | None = None  # None until known: from the YAML or the built files
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def augment(self) -> str:
        return self.spec.augment

    @property
    def eval_crop_ratio(self) -> float:
        return self.spec.eval_crop

    @property
    def groups(self) -> dict[str, list[str]]:
        """Group -> the OOD test sets averaged into it (sets that overlap the OOD validation set are left out)."""
        return {g: [s for s in sets if s not in self.val_overlaps] for g, sets in self.spec.groups().items()}

    @property
    def all_sets(self) -> list[str]:
        """The OOD test sets the `all` average covers: those of `ood.all_groups` (default every group)."""
        return [s for g in self.groups if g not in self.outside_all for s in self.groups[g]]

    @property
    def outside_all(self) -> list[str]:
        """Groups reported on their own, left out of the `all` average (not in `ood.all_groups`)."""
        chosen = self.spec.ood.all_groups
        return [] if chosen is None else [g for g in self.groups if g not in chosen]

    @property
    def table_columns(self) -> list[str]:
        """Result-table columns: the groups `all` averages, `all`, then the groups reported on their own."""
        return [*(g for g in self.groups if g not in self.outside_all), "all", *self.outside_all]

    @property
    def val_overlaps(self) -> tuple[str, ...]:
        return tuple(self.spec.ood.val_overlaps)

    @property
    def ood_test(self) -> tuple[str, ...]:
        return tuple(s for sets in self.spec.groups().values() for s in sets)

    @property
    def splits(self) -> tuple[str, ...]:
        return (*ID_SPLITS, OOD_VAL, *self.ood_test)

    @property
    def files(self) -> tuple[str, ...]:
        """Every split the build writes: the evaluated ones, and the outliers when the benchmark has some."""
        return (*self.splits, OUTLIERS) if self.spec.outliers else self.splits

    def path(self, root: Path, split: str) -> Path:
        if split not in self.files:
            raise ValueError(f"benchmark {self.name} has no split '{split}'; splits: {', '.join(self.files)}")
        return Path(root) / self.name / f"{split}.beton"

    def missing(self, root: Path) -> list[str]:
        return [s for s in self.files if not self.path(root, s).is_file()]

    def build_command(self, root: Path) -> str:
        data = " --root YOUR_DATA" if self.base is None and self.needs_root() else ""
        return f"oodlab data build {self.ref}{data} --out {root}"

    def needs_root(self) -> bool:
        """True when some source is a relative path (built-ins: relative to the user's --root)."""
        return any(s.path and not Path(s.path).expanduser().is_absolute() for _, _, s in source_specs(self.spec))

    def require(self, root: Path) -> None:
        """Raise FileNotFoundError listing every missing .beton and the command that builds them."""
        missing = self.missing(root)
        if missing:
            lines = [f"  {self.path(root, s)}" for s in missing]
            raise FileNotFoundError(f"data.root: benchmark '{self.name}' is missing {len(missing)} file(s):\n"
                                    + "\n".join(lines) + f"\nBuild them with `{self.build_command(root)}`.")


def source_specs(spec: BenchmarkSpec) -> list[tuple[str, str, SourceSpec]]:
    """(split, YAML key, source) for every split read from a source of its own (a held-out id_val is not)."""
    found = [("id_train", "id.train", spec.id.train), ("id_test", "id.test", spec.id.test)]
    if isinstance(spec.id.val, SourceSpec):
        found.append(("id_val", "id.val", spec.id.val))
    found.append((OOD_VAL, "ood.val", spec.ood.val))
    found += [(name, f"ood.{group}.{name}", src) for group, sets in spec.groups().items() for name, src in sets.items()]
    if spec.outliers:
        parts = list(spec.outliers.values())
        found.append((OUTLIERS, OUTLIERS, parts[0] if len(parts) == 1 else SourceSpec(parts=parts)))
    return found


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def is_yaml_ref(ref: str) -> bool:
    return ref.endswith((".yaml", ".yml"))


def parse(raw: Any, where: str) -> BenchmarkSpec:
    """Validate a benchmark document; BenchmarkError naming every bad key."""
    if not isinstance(raw, dict):
        raise BenchmarkError(f"{where}: the top level must be a mapping (name, image_size, id, ood, ...)")
    try:
        return BenchmarkSpec.model_validate(raw)
    except ValidationError as err:
        raise BenchmarkError(f"invalid benchmark {where}:\n" + describe_errors(err, BenchmarkSpec)) from None


def get_benchmark(ref: str | Path, root: Path | None = None) -> Benchmark:
    """A built-in name or a YAML path -> Benchmark; with `root`, class count and pixel stats of built files are read."""
    ref = str(ref)
    if is_yaml_ref(ref):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise BenchmarkError(f"data.benchmark: benchmark file {path} does not exist; built-ins: {', '.join(builtin_names())}")
        base: Path | None = path.resolve().parent
    else:
        path = BUILTIN_DIR / f"{ref}.yaml"
        if not path.is_file():
            raise BenchmarkError(f"data.benchmark: unknown benchmark '{ref}'; built-ins: {', '.join(builtin_names())}, "
                                 "or the path of your own benchmark .yaml")
        base = None
    try:
        raw = bounded_yaml.read(path)
    except bounded_yaml.YamlError as err:
        raise BenchmarkError(str(err)) from None
    bench = from_dict(raw, ref, base, where=str(path))
    return with_built_stats(bench, root) if root is not None else bench


def from_dict(raw: Any, ref: str, base: Path | None = None, where: str | None = None) -> Benchmark:
    """A Benchmark from an already-parsed YAML document."""
    spec = parse(raw, where or ref)
    return Benchmark(spec, ref, base, spec.num_classes, spec.mean, spec.std)


def for_config(cfg: Config) -> Benchmark:
    """The config's benchmark with its built files checked: what the pipeline and sweeps start from.

    Refuses pretrained weights that saw id.train when ID validation is carved out of id.train: the
    tuning objective and fitted score parameters would then be computed on memorised images.
    """
    bench = get_benchmark(cfg.data.benchmark)
    val = bench.spec.id.val
    if cfg.model.pretrained and cfg.model.weights_saw_id_train and isinstance(val, HeldOut) and val.of == "train":
        raise BenchmarkError(
            f"model.pretrained: the weights were trained on id.train of benchmark '{bench.name}', and its id.val is "
            "held out of that same train set. Take id.val from data the weights never saw (in the benchmark YAML: "
            "`val: {fraction: 0.2, of: test}` or a separate source), or set model.weights_saw_id_train=false if "
            "the weights come from other data")
    check_batch_memory(cfg, bench)
    bench.require(cfg.data.root)
    bench = with_built_stats(bench, cfg.data.root)
    check_built(bench, cfg.data.root)
    return bench


def check_batch_memory(cfg: Config, bench: Benchmark) -> None:
    """Refuse a batch that one worker could not hold: its float32 images at the benchmark's image_size."""
    for key in ("batch_size", "eval_batch_size"):
        per_worker = -(-getattr(cfg.data, key) // cfg.ray.num_workers)
        if per_worker * image_bytes(bench.image_size, itemsize=4) > MAX_WORKER_BATCH_BYTES:
            raise BenchmarkError(f"data.{key}: {getattr(cfg.data, key):,} images over {cfg.ray.num_workers} workers is "
                                 f"{per_worker:,} per worker, and {batch_cost(per_worker, bench.image_size)} on each, "
                                 f"more than the {human_bytes(MAX_WORKER_BATCH_BYTES)} oodlab accepts; lower "
                                 f"data.{key} or add workers")


def check_built(bench: Benchmark, root: Path) -> None:
    """Refuse ID files whose labels fall outside [0, num_classes) or whose images are smaller than the
    benchmark's image_size (headers only, no decoding): both mean files built for another benchmark."""
    from oodlab.datapipes.beton import read_info

    for split in ID_SPLITS:
        path = bench.path(root, split)
        if path.suffix != ".beton" or not bench.num_classes:
            continue
        info = read_info(path)
        bad = sorted(label for label in info.label_counts if not 0 <= label < bench.num_classes)
        if bad:
            raise BenchmarkError(f"{path}: labels {bad[:5]} are outside [0, {bench.num_classes}) (num_classes of benchmark "
                                 f"'{bench.name}'); rebuild it with `{bench.build_command(root)} --force` or fix num_classes")
        if min(info.min_size) < bench.image_size:
            raise BenchmarkError(f"{path}: images of {info.min_size[0]}x{info.min_size[1]} px, smaller than image_size "
                                 f"{bench.image_size} of benchmark '{bench.name}'; rebuild it with "
                                 f"`{bench.build_command(root)} --force` or set image_size")


def stats_path(bench: Benchmark, root: Path) -> Path:
    return Path(root) / bench.name / STATS_FILE


def floor_path(bench: Benchmark, root: Path) -> Path:
    """Where the build writes every OOD set's pixel floor (oodlab.datapipes.floor)."""
    return Path(root) / bench.name / FLOOR_FILE


def floors(bench: Benchmark, root: Path) -> dict[str, float]:
    """The built pixel floors by table column: each set, group, `all` and `val` ({} if the build wrote none)."""
    return floor.columns(floor.read(floor_path(bench, root)), bench.groups, bench.all_sets)


def with_built_stats(bench: Benchmark, root: Path) -> Benchmark:
    """Fill in the class count and pixel stats recorded by the build (the YAML's own values win)."""
    try:
        built = json.loads(stats_path(bench, root).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return bench
    return replace(bench, num_classes=bench.num_classes or built["num_classes"],
                   mean=bench.mean or tuple(built["mean"]), std=bench.std or tuple(built["std"]))
