"""`synthetic:KIND?n=N&seed=S&size=PX`: procedural imagery, KIND = noise | dead-leaves | shaders | glyphs.
Record i is drawn from rng(seed, i), so any unit anywhere generates exactly the same images."""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from curate.sources.base import RawSample, ReadError, Source, Unit
from kdcore.errors import UserError

GLYPHS = string.ascii_letters + string.digits + "#$%&@?!+*=<>{}[]"


def noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Uniform RGB noise: the surrogate data that does not work (Frank & Davis 2025)."""
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def dead_leaves(rng: np.random.Generator, size: int) -> np.ndarray:
    """Occluding disks with power-law radii and random colours (the 'dead leaves' model)."""
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    rmin, rmax = max(1.0, size / 40), size / 3
    for _ in range(int(rng.integers(20, 80))):
        u = rng.random()  # inverse CDF of p(r) ∝ r^-3 on [rmin, rmax]
        r = (rmin**-2 - u * (rmin**-2 - rmax**-2)) ** -0.5
        x, y = rng.uniform(-r, size + r, 2)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return np.asarray(img)


def shaders(rng: np.random.Generator, size: int) -> np.ndarray:
    """Shader-like procedural patterns: warped sums of sinusoids mapped through a random palette."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size * 2 - 1
    r, theta = np.hypot(xx, yy), np.arctan2(yy, xx)
    warp = rng.normal(0, 1.5, 2)
    u, v = xx + warp[0] * np.sin(3 * yy), yy + warp[1] * np.cos(3 * xx)
    field = np.zeros_like(xx)
    for _ in range(int(rng.integers(2, 6))):
        fx, fy, fr, ft = rng.normal(0, 6, 4)
        field += np.sin(fx * u + fy * v + fr * r + np.round(ft) * theta + rng.uniform(0, 2 * np.pi))
    phase, freq = rng.uniform(0, 2 * np.pi, 3), rng.uniform(0.5, 2.0, 3)
    rgb = 0.5 + 0.5 * np.cos(freq[None, None] * field[..., None] + phase[None, None])
    return (rgb * 255).astype(np.uint8)


@lru_cache(maxsize=4)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


def glyphs(rng: np.random.Generator, size: int) -> np.ndarray:
    """One or two characters rendered with Pillow's built-in font, light on dark, slightly rotated."""
    text = "".join(rng.choice(list(GLYPHS), int(rng.integers(1, 3))))
    img = Image.new("L", (size, size), int(rng.integers(0, 40)))
    draw = ImageDraw.Draw(img)
    font = _font(int(size * rng.uniform(0.55, 0.85)))
    box = draw.textbbox((0, 0), text, font=font)
    x = (size - (box[2] - box[0])) / 2 - box[0] + rng.normal(0, size / 20)
    y = (size - (box[3] - box[1])) / 2 - box[1] + rng.normal(0, size / 20)
    draw.text((x, y), text, fill=int(rng.integers(180, 256)), font=font)
    img = img.rotate(float(rng.normal(0, 10)), resample=Image.BILINEAR)
    return np.asarray(img)


MAX_N = 10**9  # images of one synthetic source
MAX_SIZE = 4096  # pixels per side: a 4096×4096 RGB image is 48 MiB
GENERATORS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "noise": noise,
    "dead-leaves": dead_leaves,
    "shaders": shaders,
    "glyphs": glyphs,
}


class SyntheticSource(Source):
    """`synthetic:KIND?n=&seed=&size=`: KIND = noise, dead-leaves, shaders, glyphs."""

    OPTIONS = {"n": "images (default 1000, at most 10^9)", "seed": "seed (default 0)",
               "size": "pixels per side (default 32, at most 4096)",
               "unit": "records per unit (default 4096)"}  # fmt: skip

    def check(self) -> None:
        if self.location not in GENERATORS:
            raise UserError(
                f"source {self.name}: unknown synthetic kind {self.location!r}; use {', '.join(GENERATORS)}"
            )
        n, size = self.opt_int("n", 1000, minimum=1), self.opt_int("size", 32, minimum=4)
        if n > MAX_N:
            raise UserError(f"source {self.name}: n={n:,} is over {MAX_N:,} images; give a smaller n=")
        if size > MAX_SIZE:
            raise UserError(f"source {self.name}: size={size:,} is over {MAX_SIZE:,} pixels per side (one image would "
                            f"take {size * size * 3 / 2**30:,.1f} GiB); give a size= up to {MAX_SIZE:,}")  # fmt: skip
        self.opt_int("seed", 0)
        self.check_units(n, self.opt_int("unit", 4096, minimum=1))

    def units(self) -> list[Unit]:
        return self.chunk(0, self.opt_int("n", 1000), self.opt_int("unit", 4096))

    def read(self, unit: Unit, only: set[str] | None = None) -> Iterator[RawSample | ReadError]:
        make, seed, size = GENERATORS[self.location], self.opt_int("seed", 0), self.opt_int("size", 32)
        for i in range(*unit.args):
            if only is not None and str(i) not in only:
                continue  # record i depends on (seed, i) alone: the others need not be drawn
            yield RawSample(str(i), make(np.random.default_rng([seed, i]), size))
