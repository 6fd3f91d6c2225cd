"""Build every .beton of a named benchmark from the user's folders (`oodlab data benchmark NAME`).

Expected layout under ROOT (nothing downloads; each set is looked up at one place, see `LAYOUTS`):

  cifar10 / cifar100 (all sets written raw at 32x32; other sizes: Resize 32 + CenterCrop 32):
    ROOT/cifar10/    the CIFAR-10 python pickles (cifar-10-batches-py/ inside, or its files directly)
    ROOT/cifar100/   the CIFAR-100 python pickles (cifar-100-python/ inside, or its files directly)
    ROOT/tin/        TinyImageNet test-OOD images (image folder, any depth; or ROOT/tin.txt image list)
    ROOT/tin_val/    TinyImageNet OOD-validation images, classes disjoint from tin/ (or ROOT/tin_val.txt)
    ROOT/mnist/  ROOT/textures/  ROOT/places365/   image folders (or ROOT/<name>.txt image lists)
    ROOT/svhn/test_32x32.mat   the SVHN cropped-digits test file
  imagenet1k (written as JPEG, longest side <= 512; decoded at 224 by the loaders):
    ROOT/imagenet/train/   ImageNet-1k train, one folder per class (wnid)
    ROOT/imagenet/val/     ImageNet-1k val sorted into the same class folders
    ROOT/ssb_hard/  ROOT/ninco/  ROOT/inaturalist/  ROOT/textures/  ROOT/openimage_o/  ROOT/openimage_o_val/
                           image folders (or ROOT/<name>.txt image lists, OpenOOD style, relative to ROOT)

ID splits: id_test is the official test (CIFAR) or val (ImageNet) set; id_val is a deterministic,
stratified held-out part of the official train set (per class min(cap, 10%): CIFAR-10 500, CIFAR-100
50, ImageNet 10 per class), and id_train is the rest. OOD sets are written with label -1. Every missing
input is reported, with this layout, before anything is written; current files (same inputs and
options, per the manifest stamp) are kept, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from oodlab.datapipes import beton
from oodlab.datapipes.benchmarks import OOD_VAL, Benchmark, get_benchmark
from oodlab.datapipes.sources import (CifarSource, ImageFolderSource, ImageListSource, ImageSource, SourceError,
                                      SvhnSource, find_cifar_dir)
from oodlab.datapipes.views import SquareSource, SubsetSource, held_out_split

RECIPE_VERSION = 1  # bump when anything below changes what gets written: current files are then rewritten
VAL_FRACTION = 0.1
VAL_CAP_PER_CLASS = {"cifar10": 500, "cifar100": 50, "imagenet1k": 10}
DEFAULT_OPTIONS = {
    "cifar10": beton.ImageOptions("raw"),
    "cifar100": beton.ImageOptions("raw"),
    "imagenet1k": beton.ImageOptions("jpg", max_resolution=512, jpeg_quality=90),
}


@dataclass(frozen=True)
class Input:
    """One data set as it lies under ROOT: `rel` is a folder, a file, or a folder/`.txt` list for images."""

    rel: str
    kind: str  # cifar10 | cifar100 | svhn | images (image folder or image list) | classes (class folders)
    hint: str

    def locate(self, root: Path) -> Path | None:
        """The path this input was found at, or None."""
        path = root / self.rel
        if self.kind in ("cifar10", "cifar100"):
            return path if path.is_dir() and find_cifar_dir(path, self.kind) is not None else None
        if self.kind == "svhn":
            return path if path.is_file() else None
        if path.is_dir():
            return path
        listed = path.with_name(path.name + ".txt")
        return listed if self.kind == "images" and listed.is_file() else None

    def open(self, root: Path, split: str = "test") -> ImageSource:
        path = self.locate(root)
        if path is None:
            raise SourceError(f"missing {root / self.rel}: {self.hint}")
        if self.kind in ("cifar10", "cifar100"):
            return CifarSource(path, split=split, variant=self.kind)
        if self.kind == "svhn":
            return SvhnSource(path)
        if self.kind == "classes":
            return ImageFolderSource(path)
        if path.suffix == ".txt":
            return ImageListSource(path, root=root, name=self.rel)
        return ImageFolderSource(path, name=self.rel, ood=True)


@dataclass(frozen=True)
class Recipe:
    """How one split is made: which input, which part of it (train | val | test), ID or OOD."""

    input: Input
    part: str = "test"
    ood: bool = True


def _image_set(rel: str, what: str) -> Input:
    return Input(rel, "images", f"{what}: an image folder (any depth) or an image list {rel}.txt")


CIFAR10 = Input("cifar10", "cifar10", "the CIFAR-10 'python version' pickles (cifar-10-batches-py/)")
CIFAR100 = Input("cifar100", "cifar100", "the CIFAR-100 'python version' pickles (cifar-100-python/)")
CIFAR_OOD = {
    "tin": Recipe(_image_set("tin", "TinyImageNet test-OOD images")),
    "mnist": Recipe(_image_set("mnist", "MNIST test images")),
    "svhn": Recipe(Input("svhn/test_32x32.mat", "svhn", "the SVHN cropped-digits test file test_32x32.mat")),
    "textures": Recipe(_image_set("textures", "Describable Textures (DTD) images")),
    "places365": Recipe(_image_set("places365", "Places365 images")),
    OOD_VAL: Recipe(_image_set("tin_val", "TinyImageNet OOD-validation images (classes disjoint from tin/)")),
}
IMAGENET_TRAIN = Input("imagenet/train", "classes", "ImageNet-1k train: one folder per class")
IMAGENET_VAL = Input("imagenet/val", "classes", "ImageNet-1k val sorted into the train class folders")

LAYOUTS: dict[str, dict[str, Recipe]] = {
    "cifar10": {"id_train": Recipe(CIFAR10, "train", False), "id_val": Recipe(CIFAR10, "val", False),
                "id_test": Recipe(CIFAR10, "test", False), "cifar100": Recipe(CIFAR100), **CIFAR_OOD},
    "cifar100": {"id_train": Recipe(CIFAR100, "train", False), "id_val": Recipe(CIFAR100, "val", False),
                 "id_test": Recipe(CIFAR100, "test", False), "cifar10": Recipe(CIFAR10), **CIFAR_OOD},
    "imagenet1k": {
        "id_train": Recipe(IMAGENET_TRAIN, "train", False), "id_val": Recipe(IMAGENET_TRAIN, "val", False),
        "id_test": Recipe(IMAGENET_VAL, "test", False),
        "ssb_hard": Recipe(_image_set("ssb_hard", "SSB-hard images")),
        "ninco": Recipe(_image_set("ninco", "NINCO images")),
        "inaturalist": Recipe(_image_set("inaturalist", "iNaturalist OOD images")),
        "textures": Recipe(_image_set("textures", "Describable Textures (DTD) images")),
        "openimage_o": Recipe(_image_set("openimage_o", "OpenImage-O test images")),
        OOD_VAL: Recipe(_image_set("openimage_o_val", "OpenImage-O validation images")),
    },
}


def layout(name: str) -> dict[str, Recipe]:
    if name not in LAYOUTS:
        raise ValueError(f"benchmark: '{name}' cannot be built from folders; buildable: {', '.join(LAYOUTS)} "
                         "(the demo is written by `oodlab demo`)")
    return LAYOUTS[name]


def default_options(name: str) -> beton.ImageOptions:
    """How the benchmark's images are stored: raw 32x32 for CIFAR benchmarks, JPEG <= 512 px for ImageNet."""
    layout(name)
    return DEFAULT_OPTIONS[name]


def describe_layout(name: str, root: Path) -> str:
    """One line per input: found or missing, where it is expected, what goes there."""
    inputs = sorted({r.input for r in layout(name).values()}, key=lambda i: i.rel)
    return "\n".join(f"  {'found  ' if i.locate(root) else 'MISSING'}  {root / i.rel}  ({i.hint})" for i in inputs)


def missing_inputs(name: str, root: Path) -> list[Input]:
    """Every input of the benchmark that is not where the layout expects it (each listed once)."""
    missing = {r.input for r in layout(name).values() if r.input.locate(root) is None}
    return sorted(missing, key=lambda i: i.rel)


def check_inputs(name: str, root: Path) -> None:
    """Raise FileNotFoundError naming every missing input, within the whole expected layout."""
    missing = missing_inputs(name, root)
    if missing:
        total = len({r.input for r in layout(name).values()})
        raise FileNotFoundError(f"benchmark {name}: {len(missing)} of {total} inputs missing under {root}; nothing was "
                                f"written. Expected layout:\n{describe_layout(name, root)}")


def open_splits(name: str, root: Path) -> dict[str, ImageSource]:
    """Every split's source, ready to write (held-out ID val, OOD labels -1, CIFAR sets squared to 32)."""
    bench = get_benchmark(name)
    recipes = layout(name)
    opened: dict[tuple[Input, str], ImageSource] = {}
    errors: list[str] = []
    sources: dict[str, ImageSource] = {}
    for split, recipe in recipes.items():
        key = (recipe.input, "train" if recipe.part == "val" else recipe.part)
        try:
            if key not in opened:
                opened[key] = recipe.input.open(root, key[1])
            sources[split] = _select(bench, split, recipe, opened[key])
        except SourceError as err:
            errors.append(f"  {split}: {err}")
    if errors:
        raise SourceError(f"benchmark {name}: cannot read {len(errors)} split(s):\n" + "\n".join(errors))
    _check_same_classes(sources)
    return sources


def _select(bench: Benchmark, split: str, recipe: Recipe, source: ImageSource) -> ImageSource:
    if recipe.part in ("train", "val"):
        train, val = held_out_split(source.labels, VAL_FRACTION, VAL_CAP_PER_CLASS[bench.name])
        source = SubsetSource(source, train if recipe.part == "train" else val, f"{source.name}-{recipe.part}")
    if recipe.ood:
        source = source.as_ood()
    return SquareSource(source, bench.image_size) if bench.train_crop == "pad" else source


def _check_same_classes(sources: dict[str, ImageSource]) -> None:
    ids = {s: sources[s] for s in ("id_train", "id_val", "id_test")}
    if len({tuple(src.classes) for src in ids.values()}) != 1:
        counts = ", ".join(f"{s}: {len(src.classes)} classes" for s, src in ids.items())
        raise SourceError(f"ID splits disagree on their classes ({counts}); the test folders must use the train "
                          "class folder names, or labels would not match")


def build(name: str, root: str | Path, out: str | Path, options: beton.ImageOptions | None = None,
          workers: int = 1, skip_bad: bool = False, force: bool = False, progress: bool = True,
          log: Callable[[str], None] = lambda line: None) -> dict[str, Path]:
    """Write every split of `name` to out/<name>/<split>.beton; return {split: path} of those written now."""
    root, out = Path(root), Path(out)
    check_inputs(name, root)
    sources = open_splits(name, root)
    bench = get_benchmark(name)
    options = options or default_options(name)
    written = {}
    for split, source in sources.items():
        path = bench.path(out, split)
        stamp = {"recipe": RECIPE_VERSION, "root": str(root.resolve()), "split": split, "options": asdict(options)}
        if not force and beton.is_current(path, stamp):
            log(f"{split}: current ({path})")
            continue
        log(f"{split}: {len(source)} images from {source.name}")
        written[split] = beton.write(source, path, options, workers, stamp=stamp, skip_bad=skip_bad, progress=progress)
    return written


def open_for_write(spec: str | Path, ood: bool = False, square: int | None = None,
                   split: str | None = None) -> ImageSource:
    """The source `oodlab data write` writes: `open_source(spec)`, optionally unlabeled and squared to `square`.

    split picks the CIFAR pickles (train | test); unreadable images are handled by the writer (skip_bad).
    """
    from oodlab.datapipes.sources import open_source

    source = open_source(spec, ood=ood, **({"split": split} if split else {}))
    return SquareSource(source, square) if square else source
