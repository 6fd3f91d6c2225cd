"""The pixel floor (no-network pixel statistics against ID test), font-rendered glyphs, sources made of parts, and
groups left out of the `all` average."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from oodlab.datapipes import floor
from oodlab.datapipes.benchmarks import BenchmarkError, floors, from_dict
from oodlab.datapipes.build import build
from oodlab.datapipes.glyphs import glyph_images
from oodlab.datapipes.sources import ArraySource, SourceError
from oodlab.metrics import summarize

RNG = np.random.default_rng(3)


def objects_on(background: int, n: int, rng: np.random.Generator = RNG) -> np.ndarray:
    """n 28x28 images: a bright random blob in the middle of a uniform background (0: Fashion-MNIST's black)."""
    images = np.full((n, 28, 28, 3), background, np.uint8)
    for image in images:
        h, w = rng.integers(8, 18, 2)
        y, x = (28 - h) // 2, (28 - w) // 2
        image[y:y + h, x:x + w] = rng.integers(120, 256, (h, w, 1))
    return images


def test_a_gray_background_set_gets_a_high_floor_and_a_copy_of_id_gets_50():
    id_stats = floor.statistics(ArraySource(objects_on(0, 300)), 28)
    gray = floor.floor(id_stats, floor.statistics(ArraySource(objects_on(110, 300)), 28))
    assert gray["auroc"] > 99 and gray["by_statistic"]["border brightness"] == 100.0
    copy = floor.floor(id_stats, id_stats)
    assert copy["by_statistic"] == {name: 50.0 for name in floor.STATISTICS}
    fresh = floor.floor(id_stats, floor.statistics(ArraySource(objects_on(0, 300, np.random.default_rng(9))), 28))
    assert 50 <= fresh["auroc"] < 60  # another draw of the same distribution: about 50


def test_floor_statistics_against_numpy_and_sklearn():
    id_images, ood_images = objects_on(0, 50), objects_on(40, 60)
    id_stats, ood_stats = (floor.statistics(ArraySource(x), 28) for x in (id_images, ood_images))
    np.testing.assert_allclose(id_stats["mean brightness"], id_images.mean(axis=(1, 2, 3)))
    np.testing.assert_allclose(id_stats["pixel std"], id_images.std(axis=(1, 2, 3)))
    np.testing.assert_allclose(id_stats["near-black fraction"], (id_images <= 25).mean(axis=(1, 2, 3)))
    frame = np.ones((28, 28), bool)
    frame[2:-2, 2:-2] = False  # a 2-pixel frame at 28 px
    np.testing.assert_allclose(ood_stats["border brightness"], ood_images[:, frame].mean(axis=(1, 2)))
    result = floor.floor(id_stats, ood_stats)
    for name, value in result["by_statistic"].items():
        auroc = 100 * roc_auc_score(np.r_[np.ones(50), np.zeros(60)], np.r_[id_stats[name], ood_stats[name]])
        assert value == pytest.approx(max(auroc, 100 - auroc), abs=0.01)
    assert result["auroc"] == max(result["by_statistic"].values())
    assert result["statistic"] == max(result["by_statistic"], key=result["by_statistic"].get)


def test_font_letters_are_deterministic_light_on_black_glyphs():
    letters = glyph_images("ABC", ["matplotlib"], 8, "letters")
    again = glyph_images("ABC", ["matplotlib"], 8, "letters")
    pixels = np.stack([letters.load(i) for i in range(8)])
    assert np.array_equal(pixels, np.stack([again.load(i) for i in range(8)]))
    # the checksum of Pillow's FreeType rendering at the pinned versions (requirements/constraints.txt)
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == LETTERS_SHA256
    assert pixels.shape == (8, 64, 64, 3) and (pixels[:, :, :, 0] == pixels[:, :, :, 2]).all()
    border = np.concatenate([pixels[:, :1].ravel(), pixels[:, -1:].ravel(), pixels[:, :, :1].ravel(), pixels[:, :, -1:].ravel()])
    assert border.max() == 0 and (pixels.reshape(8, -1).max(1) == 255).all()  # ink on black, none at the edges
    other = glyph_images("ABC", ["matplotlib"], 8, "val_letters")  # another set name: other draws
    assert not np.array_equal(pixels, np.stack([other.load(i) for i in range(8)]))


LETTERS_SHA256 = "2b465bf616885ec6d43cfa188803611a4a3f7b5e2b3f5565f109efb85d8083ad"


def test_glyphs_refuse_unknown_fonts_and_missing_glyphs(tmp_path):
    with pytest.raises(SourceError, match="'nosuch' is neither a font collection"):
        glyph_images("A", ["nosuch"], 1, "x")
    with pytest.raises(SourceError, match="has no glyph for '\u2603'"):
        glyph_images("\u2603", ["matplotlib"], 1, "x")


BENCH = {"name": "tiny", "image_size": 28, "color": "gray", "mean": [0.1, 0.1, 0.1], "std": [0.3, 0.3, 0.3],
         "id": {"train": "id_train.npz", "test": "id_test.npz"},
         "ood": {"val": [{"glyphs": "KLM", "fonts": ["matplotlib"], "count": 6}, {"path": "val.npz"}],
                 "all_groups": ["near"],
                 "near": {"letters": {"glyphs": "ABC", "fonts": ["matplotlib"], "count": 9}},
                 "shift": {"gray": "gray.npz"}}}


def write_sets(folder) -> None:
    labels = np.arange(40) % 4
    for name, images in (("id_train", objects_on(0, 40)), ("id_test", objects_on(0, 40)), ("val", objects_on(0, 5)),
                         ("gray", objects_on(120, 7))):
        np.savez(folder / f"{name}.npz", images=images, **({"labels": labels} if name.startswith("id") else {}))


def test_build_writes_floors_and_a_group_can_stay_out_of_all(tmp_path):
    write_sets(tmp_path)
    bench = from_dict(BENCH, "tiny.yaml", tmp_path)
    build(bench, tmp_path / "out", progress=False)
    written = json.loads((tmp_path / "out" / "tiny" / "pixel_floor.json").read_text())
    assert {s: (f["group"], f["images"]) for s, f in written.items()} == {
        "ood_val": ("val", 11), "letters": ("near", 9), "gray": ("shift", 7)}  # val: 6 glyphs + 5 images
    assert written["gray"]["auroc"] > 95
    columns = floors(bench, tmp_path / "out")
    assert columns["near"] == columns["letters"] and columns["all"] == columns["letters"]  # shift: not in all
    assert columns["shift"] == columns["gray"] and columns["val"] == written["ood_val"]["auroc"]
    assert bench.all_sets == ["letters"] and bench.outside_all == ["shift"]
    assert bench.table_columns == ["near", "all", "shift"]
    summary = summarize({"letters": {"auroc": 0.9}, "gray": {"auroc": 0.1}}, bench.groups, bench.all_sets)
    assert summary["all"] == {"auroc": 0.9} and summary["shift"] == {"auroc": 0.1}
    stamp = (tmp_path / "out" / "tiny" / "pixel_floor.json").stat().st_mtime_ns
    build(bench, tmp_path / "out", progress=False)  # current: not computed again
    assert (tmp_path / "out" / "tiny" / "pixel_floor.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("change, message", [
    ({"near": {"letters": {"glyphs": "AK", "fonts": ["matplotlib"]}}}, "shares its source with the test set ood.near.letters"),
    ({"all_groups": ["far"]}, "ood.all_groups: ['far'] must name groups of this benchmark"),
    ({"shift": {"gray": ["gray.npz", "val.npz"]}}, "shares its source with the test set ood.shift.gray"),
])
def test_overlaps_of_parts_and_glyphs_and_unknown_all_groups_are_refused(change, message):
    with pytest.raises(BenchmarkError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict({**BENCH, "ood": {**BENCH["ood"], **change}}, "tiny.yaml")
