"""Building a named benchmark's betons from the user's folders: layout, missing sets, held-out val, sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_beton import save_image, stored_samples, write_cifar10, write_cifar100, write_svhn

from oodlab.datapipes import beton, prepare
from oodlab.datapipes.benchmarks import get_benchmark
from oodlab.datapipes.sources import SourceError
from oodlab.datapipes.views import held_out_split, square

RNG = np.random.default_rng(7)
CIFAR_INPUTS = ["cifar10", "cifar100", "mnist", "places365", "svhn/test_32x32.mat", "textures", "tin", "tin_val"]


def image(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def cifar_root(root: Path) -> dict:
    """Every input of the cifar10 benchmark, tiny, in the documented layout (places365 as an image list)."""
    cifar10 = write_cifar10(root / "cifar10")
    write_cifar100(root / "cifar100")
    write_svhn(root / "svhn" / "test_32x32.mat")
    for i in range(3):
        save_image(root / "tin" / "n0144" / f"{i}.JPEG", image(64, 64))
    mnist = [RNG.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(3)]
    (root / "mnist").mkdir()
    for i, digit in enumerate(mnist):  # grayscale PNGs, as MNIST exports usually are
        Image.fromarray(digit).save(root / "mnist" / f"{i}.png")
    save_image(root / "textures" / "banded" / "b.jpg", image(40, 50))
    save_image(root / "places" / "a" / "p.png", image(48, 36))
    (root / "places365.txt").write_text("places/a/p.png\n")
    save_image(root / "tin_val" / "v.png", image(20, 30))
    save_image(root / "tin_val" / "w.png", image(30, 20))
    return {"cifar10": cifar10, "mnist": mnist}


def test_layouts_name_every_split_of_their_benchmark():
    for name, recipes in prepare.LAYOUTS.items():
        assert set(recipes) == set(get_benchmark(name).splits)
    with pytest.raises(ValueError, match="oodlab demo"):
        prepare.build("demo", "/nonexistent", "/nonexistent")


def test_every_missing_input_is_reported_before_anything_is_written(tmp_path):
    root, out = tmp_path / "data", tmp_path / "out"
    root.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        prepare.build("cifar10", root, out, progress=False)
    assert "8 of 8 inputs missing" in str(err.value)
    assert sorted(line.split()[1] for line in str(err.value).splitlines()[1:]) == [str(root / r) for r in CIFAR_INPUTS]
    write_cifar10(root / "cifar10")
    save_image(root / "tin" / "x.png", image(8, 8))
    with pytest.raises(FileNotFoundError, match="6 of 8 inputs missing") as err:
        prepare.build("cifar10", root, out, progress=False)
    status = {line.split()[1]: line.split()[0] for line in str(err.value).splitlines()[1:]}
    assert status[str(root / "cifar10")] == status[str(root / "tin")] == "found"
    assert status[str(root / "tin_val")] == status[str(root / "svhn/test_32x32.mat")] == "MISSING"
    assert not out.exists()


def test_build_cifar10_from_folders(tmp_path):
    root, out = tmp_path / "data", tmp_path / "out"
    expected = cifar_root(root)
    lines: list[str] = []
    written = prepare.build("cifar10", root, out, progress=False, log=lines.append)
    bench = get_benchmark("cifar10")
    assert set(written) == set(bench.splits) and all(p == bench.path(out, s) for s, p in written.items())

    infos = {s: beton.read_info(p) for s, p in written.items()}
    assert all(i.min_size == i.max_size == (32, 32) and i.jpeg_count == 0 for i in infos.values())
    # ID: test as given; val = 1 of the 2 train images per class (10% rounded up), train = the other.
    assert infos["id_train"].label_counts == infos["id_val"].label_counts == {k: 1 for k in range(10)}
    test_images, test_labels = expected["cifar10"]["test"]
    stored, labels = stored_samples(written["id_test"])
    np.testing.assert_array_equal(np.stack(stored), test_images)
    assert labels.tolist() == test_labels.tolist()
    train_images = expected["cifar10"]["train"][0]
    train_stored = np.stack(stored_samples(written["id_train"])[0] + stored_samples(written["id_val"])[0])
    assert sorted(map(bytes, train_stored)) == sorted(map(bytes, train_images))  # a partition of the train set
    # OOD: labels -1, resized to the ID resolution (Resize 32 + CenterCrop 32).
    assert all(infos[s].label_counts == {-1: infos[s].count} for s in bench.ood_test + ("ood_val",))
    assert [infos[s].count for s in ("cifar100", "svhn", "tin", "mnist", "places365")] == [3, 4, 3, 3, 1]
    mnist = stored_samples(written["mnist"])[0]
    np.testing.assert_array_equal(mnist[0], square(np.repeat(expected["mnist"][0][:, :, None], 3, axis=2), 32))
    assert any("id_train: 10 images" in line for line in lines)

    assert prepare.build("cifar10", root, out, progress=False) == {}  # everything current: nothing rewritten
    written["ood_val"].unlink()  # as if the build had been interrupted there
    (root / "tin_val" / "v.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="tin_val/v.png"):
        prepare.build("cifar10", root, out, progress=False)
    assert list(prepare.build("cifar10", root, out, progress=False, skip_bad=True)) == ["ood_val"]
    assert len(beton.read_manifest(written["ood_val"])["skipped"]) == 1 and infos["ood_val"].count == 2


def test_imagenet_val_must_use_the_train_classes(tmp_path):
    root = tmp_path / "data"
    for cls in ("n01", "n02", "n03"):
        save_image(root / "imagenet" / "train" / cls / "a.JPEG", image(30, 40))
    for cls in ("n01", "n03"):
        save_image(root / "imagenet" / "val" / cls / "b.JPEG", image(30, 40))
    for rel in ("ssb_hard", "ninco", "inaturalist", "textures", "openimage_o", "openimage_o_val"):
        save_image(root / rel / "x.jpg", image(30, 40))
    with pytest.raises(SourceError, match="disagree on their classes") as err:
        prepare.build("imagenet1k", root, tmp_path / "out", progress=False)
    assert "id_test: 2 classes" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_held_out_split_is_stratified_deterministic_and_disjoint():
    labels = np.repeat(np.arange(4), [30, 10, 3, 1])
    train, val = held_out_split(labels, 0.1, cap_per_class=2, seed=0)
    assert np.bincount(labels[val], minlength=4).tolist() == [2, 1, 1, 1]
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    again = held_out_split(labels, 0.1, cap_per_class=2, seed=0)
    assert np.array_equal(again[1], val) and not np.array_equal(held_out_split(labels, 0.1, 2, seed=1)[1], val)
