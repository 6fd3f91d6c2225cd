"""Round trips for every reader in oodlab.datapipes.sources on real files written to tmp_path."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from oodlab.datapipes.sources import (
    ArraySource,
    CifarSource,
    ImageFolderSource,
    ImageListSource,
    ImageSource,
    SourceError,
    SvhnSource,
    open_source,
)

RNG = np.random.default_rng(0)
JPEG_TOLERANCE = 12  # max per-pixel error allowed after a quality-95 JPEG round trip of a smooth image


def random_rgb(h: int = 6, w: int = 5) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def smooth_rgb(h: int = 24, w: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 6, y * 8, np.full_like(x, 120)], -1).astype(np.uint8)


def save(path: Path, image: np.ndarray | Image.Image, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, **kw)
    return path


def write_garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"<html>not an image</html>" * 10)
    return path


def assert_rgb(image: np.ndarray) -> None:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


# ---------------------------------------------------------------- ImageFolderSource


def test_image_folder_nested_classes_png_exact(tmp_path):
    imgs = {"a/b/1.png": random_rgb(), "a/b/0.PNG": random_rgb(), "c/x.png": random_rgb(4, 7)}
    for rel, img in imgs.items():
        save(tmp_path / "data" / rel, img)
    (tmp_path / "data" / "c" / "notes.txt").write_text("ignored")
    write_garbage(tmp_path / "data" / "c" / "._x.png")  # hidden (macOS AppleDouble): ignored
    save(tmp_path / "data" / ".ipynb_checkpoints" / "x.png", random_rgb())  # hidden folder: ignored

    src = ImageFolderSource(tmp_path / "data")

    assert isinstance(src, ImageSource)
    assert src.name == "data" and src.classes == ["a/b", "c"] and len(src) == 3
    order = ["a/b/0.PNG", "a/b/1.png", "c/x.png"]
    for i, rel in enumerate(order):
        image, label = src[i]
        assert_rgb(image)
        np.testing.assert_array_equal(image, imgs[rel])
        assert label == (0 if rel.startswith("a/b") else 1)
    assert src.label_counts() == {0: 2, 1: 1}
    assert src.describe().splitlines()[0] == "data: 3 images, 2 classes"
    assert "a/b=2, c=1" in src.describe()
    np.testing.assert_array_equal(src[-1][0], imgs["c/x.png"])
    with pytest.raises(IndexError):
        src[3]


def test_image_folder_jpeg_within_tolerance(tmp_path):
    img = smooth_rgb()
    save(tmp_path / "cls" / "img.JPEG", img, quality=95)
    image, label = ImageFolderSource(tmp_path)[0]
    assert_rgb(image)
    assert label == 0
    assert np.abs(image.astype(int) - img).max() <= JPEG_TOLERANCE


def test_modes_converted_to_rgb(tmp_path):
    gray = RNG.integers(0, 256, size=(5, 4), dtype=np.uint8)
    rgba = RNG.integers(0, 256, size=(5, 4, 4), dtype=np.uint8)
    palette = Image.fromarray(random_rgb(5, 4)).convert("P")
    wide = (np.arange(20, dtype=np.uint16).reshape(5, 4) * 3000).astype(np.uint16)
    save(tmp_path / "o" / "0_gray.png", gray)
    save(tmp_path / "o" / "1_rgba.png", rgba)
    save(tmp_path / "o" / "2_palette.png", palette)
    save(tmp_path / "o" / "3_wide.png", wide)

    src = ImageFolderSource(tmp_path / "o", ood=True)
    np.testing.assert_array_equal(src[0][0], np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(src[1][0], rgba[:, :, :3])
    np.testing.assert_array_equal(src[2][0], np.asarray(palette.convert("RGB")))
    expected_wide = np.round(wide / 257.0).astype(np.uint8)  # scaled to 8 bits, not clipped at 255
    np.testing.assert_array_equal(src[3][0], np.repeat(expected_wide[:, :, None], 3, axis=2))


def test_image_folder_ood_flat_and_error_without_ood(tmp_path):
    for i in range(3):
        save(tmp_path / f"{i}.png", random_rgb())
    src = ImageFolderSource(tmp_path, name="textures", ood=True)
    assert src.classes == [] and [src[i][1] for i in range(3)] == [-1, -1, -1]
    assert src.label_counts() == {-1: 3}
    assert src.describe() == "textures: 3 images, unlabeled (label -1)"
    with pytest.raises(SourceError, match="ood=True"):
        ImageFolderSource(tmp_path)


def test_image_folder_missing_and_empty(tmp_path):
    with pytest.raises(SourceError, match=str(tmp_path / "nope")):
        ImageFolderSource(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images")
    with pytest.raises(SourceError, match="no images found") as err:
        ImageFolderSource(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value) and ".webp" in str(err.value)


def test_unreadable_image_fails_with_path_or_is_skipped(tmp_path):
    save(tmp_path / "cls" / "a.png", random_rgb())
    bad = write_garbage(tmp_path / "cls" / "b.jpg")
    good_last = save(tmp_path / "cls" / "c.png", random_rgb())

    src = ImageFolderSource(tmp_path)
    assert len(src) == 3
    with pytest.raises(SourceError, match="skip_bad=True") as err:
        src[1]
    assert str(bad) in str(err.value)

    skipping = ImageFolderSource(tmp_path, skip_bad=True)
    assert len(skipping) == 2 and skipping.skipped == [str(bad)]
    np.testing.assert_array_equal(skipping[1][0], np.asarray(Image.open(good_last)))
    assert "skipped 1 unreadable" in skipping.describe()


# ---------------------------------------------------------------- ImageListSource


def test_image_list_roundtrip(tmp_path):
    root = tmp_path / "images"
    imgs = [random_rgb(), random_rgb(3, 3), random_rgb(2, 8)]
    save(root / "cifar10" / "cat 1.png", imgs[0])
    save(root / "cifar10" / "dog.png", imgs[1])
    save(root / "ood" / "x.png", imgs[2])
    list_file = tmp_path / "lists" / "test_cifar10.txt"
    list_file.parent.mkdir()
    list_file.write_text("# path label\ncifar10/cat 1.png 3\n\n  cifar10/dog.png\t0  \nood/x.png\n")

    src = ImageListSource(list_file, root)

    assert src.name == "test_cifar10" and len(src) == 3
    assert src.classes == ["0", "1", "2", "3"]
    assert [src[i][1] for i in range(3)] == [3, 0, -1]
    for i, img in enumerate(imgs):
        np.testing.assert_array_equal(src[i][0], img)
    assert "unlabeled (-1): 1" in src.describe()


def test_image_list_missing_file_and_skip_bad(tmp_path):
    save(tmp_path / "a.png", random_rgb())
    write_garbage(tmp_path / "bad.jpg")
    list_file = tmp_path / "list.txt"
    list_file.write_text("a.png 0\nbad.jpg 1\n")
    src = ImageListSource(list_file, skip_bad=True)  # root defaults to the list's folder
    assert len(src) == 1 and src.skipped == [str(tmp_path / "bad.jpg")]
    assert src.classes == ["0", "1"] and src.label_counts() == {0: 1}

    list_file.write_text("a.png 0\nmissing/b.png 1\n")
    with pytest.raises(SourceError, match="root=") as err:
        ImageListSource(list_file)
    assert str(tmp_path / "missing" / "b.png") in str(err.value)


# ---------------------------------------------------------------- CifarSource


def write_cifar_batch(path: Path, data: np.ndarray, labels: dict[bytes, list[int]]) -> None:
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"test", b"data": data, **labels, b"filenames": []}, f)


def write_meta(path: Path, names: dict[bytes, list[str]]) -> None:
    with open(path, "wb") as f:
        pickle.dump({k: [n.encode() for n in v] for k, v in names.items()}, f)


def to_hwc(rows: np.ndarray) -> np.ndarray:
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def cifar10_root(tmp_path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    write_meta(folder / "batches.meta", {b"label_names": CIFAR10_NAMES})
    rows = RNG.integers(0, 256, size=(12, 3072), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9])
    for b in range(5):
        part = slice(2 * b, 2 * b + 2)
        write_cifar_batch(folder / f"data_batch_{b + 1}", rows[part], {b"labels": labels[part].tolist()})
    write_cifar_batch(folder / "test_batch", rows[10:], {b"labels": labels[10:].tolist()})
    return tmp_path, {"train": (rows[:10], labels[:10]), "test": (rows[10:], labels[10:])}


def test_cifar10_roundtrip(cifar10_root):
    root, expected = cifar10_root
    for split, folder in (("train", root), ("test", root / "cifar-10-batches-py")):
        src = CifarSource(folder, split=split)
        rows, labels = expected[split]
        assert src.name == f"cifar10-{split}" and src.classes == CIFAR10_NAMES and len(src) == len(rows)
        for i, image in enumerate(to_hwc(rows)):
            got, label = src[i]
            assert_rgb(got)
            assert got.flags.c_contiguous
            np.testing.assert_array_equal(got, image)
            assert label == labels[i]
    train = CifarSource(root)
    assert train.describe().startswith("cifar10-train: 10 images, 10 classes\n  per class: min 1 (airplane)")
    assert train.label_counts() == {k: 1 for k in range(10)}


def test_cifar100_fine_and_coarse(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine_names = [f"fine{k}" for k in range(100)]
    coarse_names = [f"coarse{k}" for k in range(20)]
    write_meta(folder / "meta", {b"fine_label_names": fine_names, b"coarse_label_names": coarse_names})
    rows = RNG.integers(0, 256, size=(5, 3072), dtype=np.uint8)
    fine, coarse = [99, 0, 50, 7, 7], [19, 0, 10, 1, 1]
    write_cifar_batch(folder / "train", rows[:3], {b"fine_labels": fine[:3], b"coarse_labels": coarse[:3]})
    write_cifar_batch(folder / "test", rows[3:], {b"fine_labels": fine[3:], b"coarse_labels": coarse[3:]})

    src = CifarSource(tmp_path, "train", "cifar100")
    assert src.classes == fine_names and [src[i][1] for i in range(3)] == fine[:3]
    np.testing.assert_array_equal(src[2][0], to_hwc(rows)[2])
    sup = CifarSource(tmp_path, "test", "cifar100", coarse=True)
    assert sup.name == "cifar100-test-coarse" and sup.classes == coarse_names
    assert [sup[i][1] for i in range(2)] == coarse[3:]
    assert sup.describe().count("\n") == 2  # header, min/median/max, all 20 class counts


def test_cifar_errors(cifar10_root, tmp_path):
    root, _ = cifar10_root
    with pytest.raises(SourceError, match="python version"):
        CifarSource(tmp_path / "elsewhere")
    with pytest.raises(SourceError, match="coarse"):
        CifarSource(root, coarse=True)
    folder = root / "cifar-10-batches-py"
    write_cifar_batch(folder / "test_batch", np.zeros((2, 3072), np.uint8), {b"labels": [0]})
    with pytest.raises(SourceError, match="2 images but 1 labels"):
        CifarSource(root, split="test")
    write_cifar_batch(folder / "test_batch", np.zeros((2, 1024), np.uint8), {b"labels": [0, 1]})
    with pytest.raises(SourceError, match=r"\(N, 3072\)"):
        CifarSource(root, split="test")
    write_cifar_batch(folder / "test_batch", np.zeros((2, 3072), np.uint8), {b"fine_labels": [0, 1]})
    with pytest.raises(SourceError, match="lacks keys"):
        CifarSource(root, split="test")


class _RunsACommand:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_cifar_pickles_that_would_run_code_are_refused_unread(cifar10_root, monkeypatch):
    root, _ = cifar10_root
    monkeypatch.chdir(root)
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _RunsACommand(), b"labels": [0]}, f)
    with pytest.raises(SourceError, match="refusing to unpickle posix.system"):
        CifarSource(root, split="test")
    assert not (root / "PWNED").exists()
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(SourceError, match="is not a readable pickle"):
        CifarSource(root, split="test")


# ---------------------------------------------------------------- SvhnSource


def test_svhn_mat_roundtrip(tmp_path):
    x = RNG.integers(0, 256, size=(32, 32, 3, 4), dtype=np.uint8)
    y = np.array([[10], [1], [9], [10]], dtype=np.uint8)
    path = tmp_path / "test_32x32.mat"
    scipy.io.savemat(path, {"X": x, "y": y})

    src = SvhnSource(path)
    assert src.name == "svhn-test" and src.classes == [str(d) for d in range(10)]
    assert [src[i][1] for i in range(4)] == [0, 1, 9, 0]
    for i in range(4):
        np.testing.assert_array_equal(src[i][0], x[:, :, :, i])

    scipy.io.savemat(path, {"X": x, "y": y[:3]})
    with pytest.raises(SourceError, match="4 images but 3 labels"):
        SvhnSource(path)


# ---------------------------------------------------------------- ArraySource


def test_array_source_shapes_and_labels():
    gray = RNG.integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    src = ArraySource(gray, np.array([1, 0, 1]), name="g", classes=["zero", "one"])
    np.testing.assert_array_equal(src[0][0], np.repeat(gray[0][:, :, None], 3, axis=2))
    assert src[2][1] == 1 and src.label_counts() == {0: 1, 1: 2}
    single = ArraySource(gray[:, :, :, None])
    assert single.classes == [] and single[1][1] == -1
    np.testing.assert_array_equal(single[1][0][:, :, 2], gray[1])
    with pytest.raises(SourceError, match="uint8"):
        ArraySource(gray.astype(np.float32))
    with pytest.raises(SourceError, match="2 classes"):
        ArraySource(gray, np.array([0, 1, 2]), classes=["a", "b"])


def test_npz_roundtrip_and_label_mismatch(tmp_path):
    images = RNG.integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
    labels = np.array([2, 0, 1, 2])
    path = tmp_path / "mnist_like.npz"
    np.savez(path, images=images, labels=labels, classes=np.array(["a", "b", "c"]))
    src = ArraySource.from_npz(path)
    assert src.name == "mnist_like" and src.classes == ["a", "b", "c"]
    for i in range(4):
        np.testing.assert_array_equal(src[i][0], images[i])
        assert src[i][1] == labels[i]

    np.savez(path, images=images)
    assert ArraySource.from_npz(path).label_counts() == {-1: 4}
    np.savez(path, images=images, labels=labels[:3])
    with pytest.raises(SourceError, match="4 images but labels have shape") as err:
        ArraySource.from_npz(path)
    assert str(path) in str(err.value)
    np.savez(path, pixels=images)
    with pytest.raises(SourceError, match="'images'"):
        ArraySource.from_npz(path)


# ---------------------------------------------------------------- open_source


def test_open_source_dispatch(cifar10_root, tmp_path):
    root, _ = cifar10_root
    assert type(open_source(root)) is CifarSource
    assert len(open_source(root / "cifar-10-batches-py", split="test")) == 2
    cifar_as_ood = open_source(root, ood=True)
    assert cifar_as_ood.classes == [] and cifar_as_ood.label_counts() == {-1: 10}
    np.testing.assert_array_equal(cifar_as_ood[3][0], CifarSource(root)[3][0])

    save(tmp_path / "folder" / "k" / "a.png", random_rgb())
    save(tmp_path / "flat" / "a.png", random_rgb())
    assert type(open_source(tmp_path / "folder")) is ImageFolderSource
    assert open_source(tmp_path / "flat", ood=True)[0][1] == -1

    (tmp_path / "folder" / "list.txt").write_text("k/a.png 0\n")
    listed = open_source(tmp_path / "folder" / "list.txt")
    assert type(listed) is ImageListSource and listed.root == tmp_path / "folder"

    np.savez(tmp_path / "a.npz", images=np.zeros((2, 3, 3), np.uint8))
    assert type(open_source(tmp_path / "a.npz")) is ArraySource
    scipy.io.savemat(tmp_path / "s.mat", {"X": np.zeros((32, 32, 3, 1), np.uint8), "y": np.array([[3]])})
    assert type(open_source(tmp_path / "s.mat")) is SvhnSource

    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(SourceError, match="npz") as err:
        open_source(tmp_path / "data.csv")
    assert "cifar-10-batches-py" in str(err.value) and ".mat" in str(err.value)
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "missing")
