"""Readers that turn image data as it lies on disk into indexable sources for FFCV's DatasetWriter.

Every source is `source[i] -> (image, label)` with `image` an (H, W, 3) uint8 RGB array and `label` an
int (-1 for unlabeled OOD images), plus `len(source)`: exactly what
`ffcv.writer.DatasetWriter.from_indexed_dataset` consumes. Nothing here downloads; readers only read
what the user placed on disk, and fail with errors that name the path and the fix.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import warnings
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import scipy.io
from PIL import Image

from oodlab.limits import MAX_IMAGE_PIXELS, human_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
OOD_LABEL = -1
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_LISTED_CLASSES = 20  # describe() lists every class's count up to this many classes
_LISTED_PATHS = 5  # errors about many files name this many of them
MAX_PICKLE_BYTES = 1 << 30  # a CIFAR pickle (CIFAR-100's train batch, the largest, is 155 MB)
# An array file that expands more than BOMB_RATIO times, to more than BOMB_MIN_BYTES, is refused as a decompression
# bomb: real image arrays compress a few times at most.
BOMB_RATIO = 100
BOMB_MIN_BYTES = 256 << 20


class SourceError(ValueError):
    """Data on disk is missing, malformed or inconsistent; the message names the path and the fix."""


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 array -> contiguous (H, W, 3) uint8 RGB (alpha dropped)."""
    if image.dtype != np.uint8:
        raise SourceError(f"image dtype is {image.dtype}; convert to uint8 in 0..255 first")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise SourceError(f"image shape {image.shape} is not (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if image.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    return np.array(image[:, :, :3], order="C")


def pil_to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """Any PIL image (L, P, RGBA, CMYK, 1, 16-bit grayscale ...) -> (H, W, 3) uint8 RGB array.

    16-bit grayscale (modes I;16*, I) is scaled to 8 bits (v / 257) instead of PIL's clipping at 255.
    """
    if image.mode == "I" or image.mode.startswith("I;16"):
        wide = np.asarray(image).astype(np.float64)
        return to_rgb_uint8(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8))
    if image.mode == "F":
        raise SourceError("floating-point (mode F) images are not supported; save them as 8-bit images")
    return np.array(image.convert("RGB"), dtype=np.uint8)


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """PIL's lazy image (header read, nothing decoded), refused (SourceError) above MAX_IMAGE_PIXELS."""
    with warnings.catch_warnings():  # PIL warns of big images itself (then refuses them above twice its own limit)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        opened = Image.open(path)
    with opened as image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise SourceError(f"its header says {width}x{height} pixels ({human_bytes(width * height * 3)} decoded as "
                              f"RGB), more than the {MAX_IMAGE_PIXELS:,} pixels oodlab decodes per image")
        yield image


def check_fits(path: Path, nbytes: int, stored: int) -> None:
    """Refuse to load `nbytes` of arrays (declared by a file's headers, from `stored` bytes on disk) when this machine
    could not hold them, or when they would expand like a decompression bomb."""
    available = psutil.virtual_memory().available
    if nbytes > available // 2:
        raise SourceError(f"{path}: its arrays take {human_bytes(nbytes)} in memory (from the sizes in its headers), "
                          f"more than half of the {human_bytes(available)} available here; split it into smaller files")
    if nbytes > BOMB_MIN_BYTES and nbytes > BOMB_RATIO * stored:
        raise SourceError(f"{path}: {human_bytes(stored)} on disk would expand to {human_bytes(nbytes)} "
                          f"({nbytes // max(stored, 1):,} times): real image data compresses a few times at most, so "
                          "this looks like a decompression bomb; save the arrays uncompressed")


def load_image(path: Path) -> np.ndarray:
    """Decode one image file to (H, W, 3) uint8 RGB; SourceError naming the path if it cannot be read."""
    try:
        with open_image(path) as image:
            return pil_to_rgb_uint8(image)
    except _PIL_ERRORS as err:
        raise SourceError(
            f"cannot read image {path}: {err}; fix or remove the file, or pass skip_bad=True to skip unreadable images"
        ) from err


def is_readable_image(path: Path) -> bool:
    """Cheap up-front check: PIL identifies the file and Image.verify() passes (header, PNG checksums).

    verify() does not decode all pixel data, so a truncated JPEG can still pass and then fail at load.
    """
    try:
        with open_image(path) as image:
            image.verify()
        return True
    except _PIL_ERRORS:
        return False


class ImageSource(ABC):
    """An indexable set of images: `source[i] -> (HxWx3 uint8 RGB array, int label)`, `len(source)`.

    Attributes: `name`, `classes` (class names, label k is classes[k]; empty for unlabeled OOD sets),
    `labels` (all labels as an int64 array, -1 = unlabeled) and `skipped` (paths of unreadable images
    dropped with skip_bad=True).
    """

    def __init__(self, name: str, classes: list[str], labels: np.ndarray, skipped: list[str] | None = None):
        self.name = name
        self.classes = list(classes)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.skipped = list(skipped or [])
        self._check_labels()

    def _check_labels(self) -> None:
        if self.labels.ndim != 1:
            raise SourceError(f"{self.name}: labels must be 1-D, got shape {self.labels.shape}")
        if self.labels.size and self.labels.min() < OOD_LABEL:
            raise SourceError(f"{self.name}: labels must be >= -1 (-1 = unlabeled), found {self.labels.min()}")
        if self.labels.size and self.labels.max() >= len(self.classes):
            raise SourceError(
                f"{self.name}: label {self.labels.max()} but only {len(self.classes)} classes; "
                "pass classes= with one name per label"
            )

    @abstractmethod
    def load(self, index: int) -> np.ndarray:
        """The image at a valid, non-negative index as (H, W, 3) uint8 RGB."""

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} images")
        index = index % n
        return self.load(index), int(self.labels[index])

    def label_counts(self) -> dict[int, int]:
        """Number of images per label present (including -1 for unlabeled), sorted by label."""
        values, counts = np.unique(self.labels, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts)}

    def describe(self) -> str:
        """Human-readable summary, e.g. 'cifar10-train: 50000 images, 10 classes' plus per-class counts."""
        counts = self.label_counts()
        kind = f"{len(self.classes)} classes" if self.classes else "unlabeled (label -1)"
        lines = [f"{self.name}: {len(self)} images, {kind}"]
        if self.classes:
            lines += self._class_count_lines(counts)
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} unreadable images, e.g. {self.skipped[0]}")
        return "\n".join(lines)

    def _class_count_lines(self, counts: dict[int, int]) -> list[str]:
        per_class = np.array([counts.get(k, 0) for k in range(len(self.classes))])
        lo, hi = int(per_class.argmin()), int(per_class.argmax())
        lines = [
            f"  per class: min {per_class[lo]} ({self.classes[lo]}), median {np.median(per_class):g}, "
            f"max {per_class[hi]} ({self.classes[hi]})"
        ]
        if len(self.classes) <= _LISTED_CLASSES:
            lines.append("  " + ", ".join(f"{c}={n}" for c, n in zip(self.classes, per_class)))
        if counts.get(OOD_LABEL):
            lines.append(f"  unlabeled (-1): {counts[OOD_LABEL]}")
        return lines

    def as_ood(self) -> ImageSource:
        """The same images with every label -1 and no classes (e.g. CIFAR-100 as near-OOD for CIFAR-10)."""
        return OodSource(self)


class OodSource(ImageSource):
    """A view of another source with all labels set to -1."""

    def __init__(self, inner: ImageSource):
        super().__init__(inner.name, [], np.full(len(inner), OOD_LABEL), inner.skipped)
        self.inner = inner

    def load(self, index: int) -> np.ndarray:
        return self.inner.load(index)


class FileImageSource(ImageSource):
    """Base for sources backed by one image file per sample; decodes lazily in `load`.

    With skip_bad=True every file is checked up-front (`is_readable_image`: PIL open + verify, cheap)
    and unreadable ones are dropped and recorded in `skipped`; a file that passes that check but fails
    to decode later still raises SourceError naming it. With skip_bad=False nothing is checked up-front.
    """

    def __init__(self, name: str, classes: list[str], paths: list[Path], labels: list[int], skip_bad: bool):
        skipped: list[str] = []
        if skip_bad:
            readable = [is_readable_image(p) for p in paths]
            skipped = [str(p) for p, ok in zip(paths, readable) if not ok]
            paths = [p for p, ok in zip(paths, readable) if ok]
            labels = [label for label, ok in zip(labels, readable) if ok]
            if not paths:
                raise SourceError(f"{name}: all {len(skipped)} images are unreadable, e.g. {skipped[0]}")
        super().__init__(name, classes, np.array(labels, dtype=np.int64), skipped)
        self.paths = paths

    def load(self, index: int) -> np.ndarray:
        return load_image(self.paths[index])


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def find_images(root: Path) -> list[Path]:
    """All image files under root (any depth, symlinks followed, hidden files/folders skipped), sorted."""
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found += [Path(folder, f) for f in files if _is_image_file(f)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _require_dir(root: Path, what: str) -> None:
    if not root.is_dir():
        raise SourceError(f"{what}: folder {root} does not exist; pass the folder that holds the data")


class ImageFolderSource(FileImageSource):
    """Images in class folders at any depth under root; the class is the folder's relative path ('a/b').

    Classes are sorted and numbered 0..C-1, images sorted by relative path. With ood=True all labels
    are -1, `classes` is empty and images may lie directly in root. Hidden files and folders are ignored.
    """

    def __init__(self, root: str | Path, name: str | None = None, ood: bool = False, skip_bad: bool = False):
        root = Path(root)
        _require_dir(root, "ImageFolderSource")
        paths = find_images(root)
        if not paths:
            raise SourceError(
                f"ImageFolderSource: no images found under {root}; accepted extensions (any case): "
                f"{' '.join(IMAGE_EXTENSIONS)}"
            )
        folders = [p.parent.relative_to(root).as_posix() for p in paths]
        if ood:
            classes, labels = [], [OOD_LABEL] * len(paths)
        else:
            classes, labels = self._class_labels(root, folders)
        super().__init__(name or root.resolve().name, classes, paths, labels, skip_bad)
        self.root = root

    @staticmethod
    def _class_labels(root: Path, folders: list[str]) -> tuple[list[str], list[int]]:
        if "." in folders:
            raise SourceError(
                f"ImageFolderSource: images lie directly in {root}; put them in class folders, "
                "or pass ood=True for an unlabeled OOD set"
            )
        classes = sorted(set(folders))
        index = {c: k for k, c in enumerate(classes)}
        return classes, [index[f] for f in folders]


def parse_list_line(line: str) -> tuple[str, int]:
    """'relative/path label' -> (path, label); no trailing int label -> (line, -1). Paths may hold spaces."""
    parts = line.rsplit(None, 1)
    if len(parts) == 2:
        try:
            return parts[0], int(parts[1])
        except ValueError:
            pass
    return line, OOD_LABEL


class ImageListSource(FileImageSource):
    """OpenOOD-style image list: one 'relative/path label' per line, paths relative to `root`.

    The label is the last whitespace-separated token if it is an integer, else the whole line is the
    path and the label is -1. Blank lines and lines starting with '#' are skipped. root defaults to the
    list file's folder. Every listed file must exist (a missing one usually means a wrong root=).
    Classes are named '0'..'C-1' unless `classes` is given.
    """

    def __init__(
        self,
        list_file: str | Path,
        root: str | Path | None = None,
        name: str | None = None,
        classes: list[str] | None = None,
        skip_bad: bool = False,
    ):
        list_file = Path(list_file)
        if not list_file.is_file():
            raise SourceError(f"ImageListSource: list file {list_file} does not exist; pass the path of the .txt list")
        root = Path(root) if root is not None else list_file.parent
        _require_dir(root, "ImageListSource root")
        entries = self._read_entries(list_file)
        paths = [root / rel for rel, _ in entries]
        labels = [label for _, label in entries]
        self._check_files_exist(list_file, root, paths)
        if classes is None:
            classes = [str(k) for k in range(max(labels) + 1)]
        super().__init__(name or list_file.stem, classes, paths, labels, skip_bad)
        self.root = root

    @staticmethod
    def _read_entries(list_file: Path) -> list[tuple[str, int]]:
        try:
            text = list_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise SourceError(f"ImageListSource: cannot read {list_file} as UTF-8 text ({err}); an image list holds "
                              "'relative/path label' lines") from None
        lines = [line.strip() for line in text.splitlines()]
        entries = [parse_list_line(line) for line in lines if line and not line.startswith("#")]
        if not entries:
            raise SourceError(f"ImageListSource: {list_file} lists no images; expected lines 'relative/path label'")
        return entries

    @staticmethod
    def _check_files_exist(list_file: Path, root: Path, paths: list[Path]) -> None:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise SourceError(
                f"ImageListSource: {len(missing)} of {len(paths)} files listed in {list_file} are missing under "
                f"root {root}, e.g. {missing[:_LISTED_PATHS]}; pass root= as the folder the listed paths are "
                "relative to, or remove those lines"
            )


class ArraySource(ImageSource):
    """Images already in memory: (N, H, W), (N, H, W, 1), (N, H, W, 3) or (N, H, W, 4) uint8.

    labels: (N,) ints, or None for an unlabeled set (all -1). classes default to '0'..'C-1'.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        name: str = "array",
        classes: list[str] | None = None,
    ):
        images = np.asarray(images)
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
            raise SourceError(f"{name}: images shape {images.shape} is not (N, H, W) or (N, H, W, 1|3|4)")
        if images.dtype != np.uint8:
            raise SourceError(f"{name}: images dtype is {images.dtype}; convert to uint8 in 0..255 first")
        labels = np.full(len(images), OOD_LABEL) if labels is None else np.asarray(labels)
        if labels.ndim != 1 or len(labels) != len(images):
            raise SourceError(
                f"{name}: {len(images)} images but labels have shape {labels.shape}; need one label per image"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise SourceError(f"{name}: labels dtype is {labels.dtype}; labels must be integers")
        if classes is None:
            classes = [str(k) for k in range(int(labels.max(initial=OOD_LABEL)) + 1)]
        super().__init__(name, classes, labels)
        self.images = images

    def load(self, index: int) -> np.ndarray:
        return to_rgb_uint8(self.images[index])

    @classmethod
    def from_npz(cls, path: str | Path, name: str | None = None, classes: list[str] | None = None) -> ArraySource:
        """Read an .npz with 'images', optional 'labels' and optional 'classes' (string array); no pickles."""
        path = Path(path)
        if not path.is_file():
            raise SourceError(f"ArraySource.from_npz: file {path} does not exist")
        keys = npz_headers(path)
        if "images" not in keys:
            raise SourceError(f"ArraySource.from_npz: {path} has keys {sorted(keys)}, needs 'images' (and optionally "
                              "'labels')")
        try:
            with np.load(path, allow_pickle=False) as npz:
                images = npz["images"]
                labels = npz["labels"] if "labels" in npz.files else None
                if classes is None and "classes" in npz.files:
                    classes = [str(c) for c in npz["classes"]]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise SourceError(f"ArraySource.from_npz: cannot read {path} ({type(err).__name__}: {err})") from None
        try:
            return cls(images, labels, name or path.stem, classes)
        except SourceError as err:
            raise SourceError(f"{path}: {err}") from err


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array of an .npz as (shape, dtype), from its .npy header (nothing decoded). SourceError naming the file
    if it is no zip of .npy arrays, holds Python objects (never unpickled), or holds more than this machine can."""
    arrays, nbytes, stored = {}, 0, 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                key = info.filename.removesuffix(".npy")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version not in _NPY_HEADER_READERS:
                        raise SourceError(f"{path}: array '{key}' is in .npy format {version}; write it with np.savez")
                    shape, _, dtype = _NPY_HEADER_READERS[version](member)
                if dtype.hasobject:
                    raise SourceError(f"{path}: array '{key}' holds Python objects (dtype {dtype}), which oodlab "
                                      "never unpickles; save numeric arrays (images uint8, labels int), classes as str")
                arrays[key] = (shape, dtype)
                nbytes += math.prod(shape) * dtype.itemsize
                stored += info.compress_size
    except SourceError:
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, zlib.error) as err:
        raise SourceError(f"{path}: not an .npz of numeric arrays ({type(err).__name__}: {err}); write it with "
                          "np.savez(path, images=..., labels=...)") from None
    check_fits(path, nbytes, stored)
    return arrays


_CIFAR_LAYOUT = {
    # variant: (folder, meta file, {split: batch files}, label key, class-names key)
    "cifar10": (
        "cifar-10-batches-py",
        "batches.meta",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        b"labels",
        b"label_names",
    ),
    "cifar100": (
        "cifar-100-python",
        "meta",
        {"train": ["train"], "test": ["test"]},
        b"fine_labels",
        b"fine_label_names",
    ),
}
_CIFAR100_COARSE_KEYS = (b"coarse_labels", b"coarse_label_names")
_CIFAR_PIXELS = 3 * 32 * 32


def find_cifar_dir(root: Path, variant: str) -> Path | None:
    """The folder holding `variant`'s pickles: root/<official folder name> or root itself; None if neither."""
    folder, meta, _, _, _ = _CIFAR_LAYOUT[variant]
    for candidate in (root / folder, root):
        if (candidate / meta).is_file():
            return candidate
    return None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (what the official CIFAR files hold): a pickle that
    names any other class or function, e.g. one that would run a shell command, is refused unread."""

    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise SourceError(f"refusing to unpickle {module}.{name}: CIFAR files hold only numpy arrays and lists")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """An official CIFAR "python version" pickle, through an unpickler that builds numpy arrays and nothing else."""
    if not path.is_file():
        raise SourceError(f"CifarSource: missing {path}; extract the official 'python version' archive there")
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise SourceError(f"CifarSource: {path} is {human_bytes(size)}, more than the {human_bytes(MAX_PICKLE_BYTES)} "
                          "a CIFAR pickle may have (the largest official one is 155 MB); is it the right file?")
    with open(path, "rb") as f:
        try:
            content = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        except SourceError as err:
            raise SourceError(f"CifarSource: {path}: {err}") from None
        except Exception as err:  # a damaged or crafted pickle fails in many ways, all of them this file's fault
            raise SourceError(f"CifarSource: {path} is not a readable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(content, dict):
        raise SourceError(f"CifarSource: {path} holds a {type(content).__name__}, not the official batch dict")
    return content


def _require_keys(content: dict, keys: tuple[bytes, ...], path: Path) -> None:
    missing = [k for k in keys if k not in content]
    if missing:
        raise SourceError(
            f"CifarSource: {path} lacks keys {missing} (has {sorted(content)}); is it an official CIFAR pickle "
            "for this variant?"
        )


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    content = _unpickle(path)
    _require_keys(content, (b"data", label_key), path)
    data, labels = np.asarray(content[b"data"]), np.asarray(content[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise SourceError(f"CifarSource: {path} data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (len(data),):
        raise SourceError(f"CifarSource: {path} has {len(data)} images but {labels.size} labels")
    return data, labels


class CifarSource(ArraySource):
    """CIFAR-10/100 from the official python pickles.

    root is the folder holding cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) or
    cifar-100-python/ (train, test, meta), or that folder itself. coarse=True (CIFAR-100 only) uses the
    20 superclass labels. Name: '<variant>-<split>' ('-coarse' appended for superclasses).
    """

    def __init__(self, root: str | Path, split: str = "train", variant: str = "cifar10", coarse: bool = False):
        root = Path(root)
        if variant not in _CIFAR_LAYOUT:
            raise SourceError(f"CifarSource: variant={variant!r}; use one of {sorted(_CIFAR_LAYOUT)}")
        folder, meta, batches, label_key, names_key = _CIFAR_LAYOUT[variant]
        if split not in batches:
            raise SourceError(f"CifarSource: split={split!r}; use one of {sorted(batches)}")
        if coarse and variant != "cifar100":
            raise SourceError("CifarSource: coarse=True needs variant='cifar100' (CIFAR-10 has no superclasses)")
        if coarse:
            label_key, names_key = _CIFAR100_COARSE_KEYS
        data_dir = find_cifar_dir(root, variant)
        if data_dir is None:
            raise SourceError(
                f"CifarSource: no {variant} pickles at {root / folder} or {root} (looked for {meta}); extract the "
                f"official 'python version' archive from cs.toronto.edu/~kriz/cifar.html into {root}"
            )
        classes = self._read_class_names(data_dir / meta, names_key)
        parts = [_read_cifar_batch(data_dir / batch, label_key) for batch in batches[split]]
        data = np.concatenate([d for d, _ in parts])
        labels = np.concatenate([y for _, y in parts])
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        name = f"{variant}-{split}" + ("-coarse" if coarse else "")
        super().__init__(images, labels, name, classes)
        self.root = data_dir

    @staticmethod
    def _read_class_names(meta_path: Path, names_key: bytes) -> list[str]:
        content = _unpickle(meta_path)
        _require_keys(content, (names_key,), meta_path)
        return [n.decode() if isinstance(n, bytes) else str(n) for n in content[names_key]]


class SvhnSource(ArraySource):
    """SVHN cropped digits from the official .mat (X: 32x32x3xN uint8, y: Nx1 in 1..10, 10 meaning digit 0)."""

    def __init__(self, mat_path: str | Path, name: str | None = None):
        mat_path = Path(mat_path)
        if not mat_path.is_file():
            raise SourceError(f"SvhnSource: file {mat_path} does not exist; pass the path of e.g. test_32x32.mat")
        content = _read_mat(mat_path)
        x, y = content["X"], np.asarray(content["y"]).ravel()
        if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
            raise SourceError(f"SvhnSource: {mat_path} X is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N)")
        if len(y) != x.shape[3]:
            raise SourceError(f"SvhnSource: {mat_path} has {x.shape[3]} images but {len(y)} labels")
        if y.size and (y.min() < 1 or y.max() > 10):
            raise SourceError(f"SvhnSource: {mat_path} labels span {y.min()}..{y.max()}, expected 1..10")
        labels = np.where(y == 10, 0, y).astype(np.int64)
        name = name or "svhn-" + mat_path.stem.removesuffix("_32x32")
        super().__init__(x.transpose(3, 0, 1, 2), labels, name, [str(d) for d in range(10)])
        self.path = mat_path


def _read_mat(mat_path: Path) -> dict[str, np.ndarray]:
    """The 'X' and 'y' variables of an SVHN .mat, their sizes checked from its headers first."""
    try:
        variables = {name: shape for name, shape, _ in scipy.io.whosmat(mat_path)}
        if "X" not in variables or "y" not in variables:
            raise SourceError(f"SvhnSource: {mat_path} has keys {sorted(variables)}, needs 'X' and 'y' (cropped-digits "
                              "format)")
        check_fits(mat_path, math.prod(variables["X"]) + 8 * math.prod(variables["y"]), mat_path.stat().st_size)
        return scipy.io.loadmat(mat_path, variable_names=["X", "y"])
    except SourceError:
        raise
    except Exception as err:  # scipy raises many kinds of error on a damaged file
        raise SourceError(f"SvhnSource: {mat_path} is not a readable MATLAB .mat file ({type(err).__name__}: "
                          f"{err})") from None


_IDX_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST / Fashion-MNIST format; gzipped if it ends in .gz) as a uint8 array; its declared size is
    checked (check_fits) before the data is read."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] != _IDX_UBYTE:
                raise SourceError(f"IdxSource: {path} is not an unsigned-byte IDX file (magic {magic.hex()})")
            dims = f.read(4 * magic[3])
            shape = tuple(int(d) for d in np.frombuffer(dims, ">u4", count=len(dims) // 4))
            count = math.prod(shape)
            if len(shape) != magic[3]:
                raise SourceError(f"IdxSource: {path} ends inside its header (truncated?)")
            check_fits(path, count, path.stat().st_size)
            data = f.read(count + 1)
    except (OSError, EOFError, zlib.error) as err:
        raise SourceError(f"IdxSource: cannot read {path}: {err}") from None
    if len(data) != count:
        raise SourceError(f"IdxSource: {path} declares shape {shape} but holds {len(data)}"
                          f"{'+' if len(data) > count else ''} values (truncated or damaged?)")
    return np.frombuffer(data, np.uint8).reshape(shape)


def idx_labels_path(images: Path) -> Path:
    """train-images-idx3-ubyte(.gz) -> train-labels-idx1-ubyte(.gz), the official naming."""
    return images.with_name(images.name.replace("images-idx3", "labels-idx1"))


class IdxSource(ArraySource):
    """MNIST-format IDX files: images (N, H, W) uint8 and, beside them, labels (N,) named the official way."""

    def __init__(self, images: str | Path, labels: str | Path | None = None, name: str | None = None,
                 classes: list[str] | None = None):
        images = Path(images)
        if not images.is_file():
            raise SourceError(f"IdxSource: file {images} does not exist; pass e.g. train-images-idx3-ubyte.gz")
        labels = Path(labels) if labels is not None else idx_labels_path(images)
        if labels == images or not labels.is_file():
            raise SourceError(f"IdxSource: no labels file {labels} beside {images}; pass labels= explicitly")
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise SourceError(f"IdxSource: images {x.shape} and labels {y.shape} do not match; need (N, H, W) and (N,)")
        stem = images.name.split("-")[0]
        super().__init__(x, y.astype(np.int64), name or f"{images.parent.name}-{stem}", classes)
        self.path = images


ACCEPTED_KINDS = (
    "a folder holding cifar-10-batches-py/ or cifar-100-python/ (or one of those folders)",
    "an SVHN .mat file",
    "an .npz with 'images' (and optional 'labels')",
    "an IDX images file (MNIST format, .gz or raw) with its labels file beside it",
    "a .txt image list ('relative/path label' lines)",
    "a folder of images (class folders, or flat with ood=True)",
)


def _detect_cifar_variant(path: Path) -> str | None:
    found = [v for v in _CIFAR_LAYOUT if find_cifar_dir(path, v) is not None]
    if len(found) > 1:
        raise SourceError(
            f"open_source: {path} holds both CIFAR-10 and CIFAR-100; pass variant='cifar10' or 'cifar100'"
        )
    return found[0] if found else None


def open_source(spec: str | Path, ood: bool = False, **kw) -> ImageSource:
    """Open whatever `spec` points to (see ACCEPTED_KINDS); extra keywords go to the chosen reader.

    ood=True makes every label -1 (flat image folders are then allowed).
    """
    path = Path(spec)
    if not path.exists():
        raise SourceError(f"open_source: {path} does not exist; pass one of: {'; '.join(ACCEPTED_KINDS)}")
    if path.is_dir():
        return _open_dir(path, ood, **kw)
    source = _open_file(path, **kw)
    return source.as_ood() if ood else source


def _open_dir(path: Path, ood: bool, **kw) -> ImageSource:
    """CIFAR pickles if present (or variant= is given), else an image folder."""
    variant = kw.pop("variant", None) or _detect_cifar_variant(path)
    if variant is None:
        return ImageFolderSource(path, ood=ood, **kw)
    source = CifarSource(path, variant=variant, **kw)
    return source.as_ood() if ood else source


def _open_file(path: Path, **kw) -> ImageSource:
    suffix = path.suffix.lower()
    if suffix == ".mat":
        return SvhnSource(path, **kw)
    if suffix == ".npz":
        return ArraySource.from_npz(path, **kw)
    if suffix == ".txt":
        return ImageListSource(path, **kw)
    if "-idx3-" in path.name:
        return IdxSource(path, **kw)
    raise SourceError(f"open_source: cannot read {path} (suffix {suffix!r}); pass one of: {'; '.join(ACCEPTED_KINDS)}")
