"""Named OOD benchmarks: which sets are ID train/val/test, near-OOD, far-OOD and OOD validation.

Files are .beton files under the data root, named `<split>.beton` inside a folder per benchmark
(`<root>/<benchmark>/<split>.beton`). The OOD validation set is the only OOD data any tuning may see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ID_SPLITS = ("id_train", "id_val", "id_test")
OOD_VAL = "ood_val"


@dataclass(frozen=True)
class Benchmark:
    name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    near: tuple[str, ...]
    far: tuple[str, ...]
    train_crop: str = "pad"  # "pad": pad-4 random crop (CIFAR); "rrc": random-resized crop (ImageNet)
    eval_crop_ratio: float = 1.0  # center crop fraction before resizing (ImageNet: 224/256)
    notes: dict[str, str] = field(default_factory=dict)  # per-split hint: what the user should provide

    @property
    def ood_test(self) -> tuple[str, ...]:
        return self.near + self.far

    @property
    def splits(self) -> tuple[str, ...]:
        return (*ID_SPLITS, OOD_VAL, *self.ood_test)

    @property
    def groups(self) -> dict[str, list[str]]:
        return {"near": list(self.near), "far": list(self.far)}

    def path(self, root: Path, split: str) -> Path:
        if split not in self.splits:
            raise ValueError(f"benchmark {self.name} has no split '{split}'; splits: {', '.join(self.splits)}")
        return Path(root) / self.name / f"{split}.beton"

    def missing(self, root: Path) -> list[str]:
        return [s for s in self.splits if not self.path(root, s).is_file()]

    def require(self, root: Path) -> None:
        """Raise FileNotFoundError listing every missing .beton and how to build it."""
        missing = self.missing(root)
        if missing:
            lines = [f"  {self.path(root, s)}  ({self.notes.get(s, 'an image folder of this set')})" for s in missing]
            raise FileNotFoundError(
                f"data.root: benchmark '{self.name}' is missing {len(missing)} file(s):\n" + "\n".join(lines)
                + f"\nBuild them with `oodlab data benchmark {self.name} --root YOUR_DATA --out {root}` "
                "(`oodlab demo` for the demo), or one by one with `oodlab data write SOURCE OUT.beton`."
            )


BENCHMARKS: dict[str, Benchmark] = {
    "demo": Benchmark(
        "demo", 10, 32, CIFAR_MEAN, CIFAR_STD, near=("letters",), far=("textures", "photos"),
        notes={"id_train": "written by `oodlab demo`"},
    ),
    "cifar10": Benchmark(
        "cifar10", 10, 32, CIFAR_MEAN, CIFAR_STD, near=("cifar100", "tin"), far=("mnist", "svhn", "textures", "places365"),
        notes={"id_val": "held-out part of the CIFAR-10 train set", OOD_VAL: "TinyImageNet val classes disjoint from tin"},
    ),
    "cifar100": Benchmark(
        "cifar100", 100, 32, CIFAR_MEAN, CIFAR_STD, near=("cifar10", "tin"), far=("mnist", "svhn", "textures", "places365"),
        notes={"id_val": "held-out part of the CIFAR-100 train set", OOD_VAL: "TinyImageNet val classes disjoint from tin"},
    ),
    "imagenet1k": Benchmark(
        "imagenet1k", 1000, 224, IMAGENET_MEAN, IMAGENET_STD, near=("ssb_hard", "ninco"),
        far=("inaturalist", "textures", "openimage_o"), train_crop="rrc", eval_crop_ratio=224 / 256,
        notes={"id_val": "a held-out subset of ImageNet-1k train", OOD_VAL: "OpenImage-O val split"},
    ),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"data.benchmark: unknown benchmark '{name}'; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
