"""Glyphs rendered from fonts that installed packages ship: notMNIST-style letters for digit- and clothing-like ID sets.

`{glyphs: ABCDEFGHIJ, fonts: [urw-base35, liberation], count: 2000}` in a benchmark YAML renders `count`
images, cycling through every (font, glyph) pair: a light glyph centred on a black square, as MNIST and
Fashion-MNIST draw their objects, its size, position and slant drawn from a generator seeded by the set's
name, so the same YAML always gives the same images. A font is a collection name of `FONT_COLLECTIONS` or
the path of a .ttf / .otf file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from oodlab.datapipes.packaged import CropSource
from oodlab.datapipes.sources import SourceError

CANVAS = 64  # side of the rendered square; the build resizes it to the benchmark's image_size
BOX = (0.62, 0.86)  # the glyph's longer side as a fraction of the canvas (MNIST: 20 of 28 px = 0.71)
SHIFT = 0.05  # largest offset of the glyph's centre, as a fraction of the canvas
SHEAR = 0.15  # largest horizontal shear (slant) of the glyph


def _matplotlib_fonts() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


_DEJAVU = [f"DejaVu{face}{style}.ttf" for face in ("Sans", "SansMono", "Serif")
           for style in ("", "-Bold", "-Oblique" if face != "Serif" else "-Italic",
                         "-BoldOblique" if face != "Serif" else "-BoldItalic")]

# name: (folder, its font files, where the folder comes from). Curated: the letter collections hold the files that draw
# Latin letters, which a character map does not prove (Computer Modern's symbol fonts and the URW dingbats map A-Z to
# symbols).
FONT_COLLECTIONS: dict[str, tuple[object, tuple[str, ...], str]] = {
    "matplotlib": (_matplotlib_fonts, (*_DEJAVU, "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
                                       "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf",
                                       "cmtt10.ttf"), "the matplotlib wheel"),
    "urw-base35": (Path("/usr/share/fonts/opentype/urw-base35"),
                   tuple(f"{family}-{style}.otf" for family, styles in (
                       ("C059", ("Roman", "Bold", "Italic", "BdIta")), ("P052", ("Roman", "Bold", "Italic", "BoldItalic")),
                       ("NimbusRoman", ("Regular", "Bold", "Italic", "BoldItalic")),
                       ("NimbusSans", ("Regular", "Bold", "Italic", "BoldItalic")),
                       ("NimbusSansNarrow", ("Regular", "Bold", "Oblique", "BoldOblique")),
                       ("NimbusMonoPS", ("Regular", "Bold", "Italic", "BoldItalic")),
                       ("URWBookman", ("Light", "Demi", "LightItalic", "DemiItalic")),
                       ("URWGothic", ("Book", "Demi", "BookOblique", "DemiOblique")), ("Z003", ("MediumItalic",)))
                       for style in styles), "Debian's fonts-urw-base35"),
    # a Zapf Dingbats clone: printable ASCII draws scissors, stars, crosses, arrows (outlier data, no letters)
    "urw-dingbats": (Path("/usr/share/fonts/opentype/urw-base35"), ("D050000L.otf",), "Debian's fonts-urw-base35"),
    "liberation": (Path("/usr/share/fonts/truetype/liberation"),
                   tuple(f"Liberation{family}-{style}.ttf" for family in ("Sans", "SansNarrow", "Serif", "Mono")
                         for style in ("Regular", "Bold", "Italic", "BoldItalic")), "Debian's fonts-liberation"),
    "freefont": (Path("/usr/share/fonts/truetype/freefont"),
                 tuple(f"Free{family}{style}.ttf" for family in ("Sans", "Serif", "Mono")
                       for style in ("", "Bold", "Oblique" if family != "Serif" else "Italic",
                                     "BoldOblique" if family != "Serif" else "BoldItalic")), "Debian's fonts-freefont-ttf"),
}


def font_files(fonts: list[str], base: Path | None = None) -> list[Path]:
    """The font files a `fonts:` list names (collections expanded, in order); SourceError naming what is missing."""
    files: list[Path] = []
    for font in fonts:
        if font in FONT_COLLECTIONS:
            folder, names, origin = FONT_COLLECTIONS[font]
            folder = folder() if callable(folder) else folder
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise SourceError(f"fonts: collection '{font}' lacks {len(missing)} file(s) under {folder}, e.g. "
                                  f"{missing[0]}; it comes from {origin} (scripts/setup.sh installs it)")
            files += [folder / n for n in names]
            continue
        path = Path(font).expanduser()
        path = path if path.is_absolute() or base is None else base / path
        if path.suffix.lower() not in (".ttf", ".otf") or not path.is_file():
            raise SourceError(f"fonts: '{font}' is neither a font collection ({', '.join(FONT_COLLECTIONS)}) nor a "
                              ".ttf / .otf file")
        files.append(path)
    return files


def _check_covers(path: Path, glyphs: str) -> None:
    from fontTools.ttLib import TTFont

    cmap = TTFont(path, lazy=True).getBestCmap() or {}
    missing = [g for g in glyphs if ord(g) not in cmap]
    if missing:
        raise SourceError(f"fonts: {path} has no glyph for {''.join(missing)!r}; pick another font or other glyphs")


def render(font: ImageFont.FreeTypeFont, glyph: str, rng: np.random.Generator) -> np.ndarray:
    """One glyph, light on black, in a CANVAS x CANVAS uint8 square: drawn large, slanted, cropped to its ink,
    resized to a random box and pasted at a random offset from the centre."""
    size = font.size
    page = Image.new("L", (2 * size, 2 * size), 0)
    ImageDraw.Draw(page).text((size // 2, size // 4), glyph, fill=255, font=font)
    shear = rng.uniform(-SHEAR, SHEAR)
    page = page.transform(page.size, Image.AFFINE, (1, shear, -shear * size, 0, 1, 0), Image.BILINEAR)
    ink = page.getbbox()
    if ink is None:
        raise SourceError(f"fonts: {font.path} draws nothing for {glyph!r}")
    page = page.crop(ink)
    longest = rng.uniform(*BOX) * CANVAS
    scale = longest / max(page.size)
    w, h = (max(1, round(side * scale)) for side in page.size)
    page = page.resize((w, h), Image.LANCZOS)
    out = Image.new("L", (CANVAS, CANVAS), 0)
    dx, dy = (rng.uniform(-SHIFT, SHIFT) * CANVAS for _ in range(2))
    out.paste(page, (round((CANVAS - w) / 2 + dx), round((CANVAS - h) / 2 + dy)))
    return np.asarray(out)


def glyph_images(glyphs: str, fonts: list[str], count: int, name: str, base: Path | None = None,
                 seed: int = 0) -> CropSource:
    """`count` rendered glyphs (unlabeled), cycling font by font through `glyphs`; deterministic for a name."""
    if not glyphs:
        raise SourceError("glyphs: give at least one character to draw, e.g. ABCDEFGHIJ")
    files = font_files(fonts, base)
    for path in files:
        _check_covers(path, glyphs)
    pairs = [(path, g) for path in files for g in glyphs]
    loaded = {path: ImageFont.truetype(os.fspath(path), size=CANVAS) for path in files}
    rng = np.random.default_rng([seed, *name.encode()])
    images = []
    for i in range(count):
        path, glyph = pairs[i % len(pairs)]
        gray = render(loaded[path], glyph, rng)
        images.append(np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)))
    return CropSource(images, name)
