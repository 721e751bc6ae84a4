"""Sources held as uint8 arrays N×H×W[×C]: `idx:` (MNIST-style IDX files) and `npy:`. Units are chunks of
`?unit=` records; keys are record indices. No decoding: records go to the teacher as they are."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from functools import lru_cache

import numpy as np

from curate.sources.base import RawSample, ReadError, Source, Unit, digest
from kdcore import storage
from kdcore.errors import UserError

DEFAULT_UNIT_RECORDS = 4096


class ArraySource(Source):
    """Base of kinds held as a uint8 array N×H×W[×C]: units are chunks of `?unit=` records."""

    OPTIONS = {"unit": f"records per unit (default {DEFAULT_UNIT_RECORDS})", "labels": "file of true labels"}

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def cached_arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """arrays(), read and checked once per process (an IDX file is decompressed whole)."""
        if "_arrays" not in self.__dict__:
            images, labels = self.arrays()
            if labels is not None:
                if labels.ndim != 1 or len(labels) != len(images):
                    raise UserError(f"source {self.name}: {len(labels)} labels for {len(images)} images; "
                                    "the labels file must hold one integer per image")  # fmt: skip
                if len(labels) and labels.min() < 0:
                    raise UserError(f"source {self.name}: negative labels; labels are class indices from 0")
            self.__dict__["_arrays"] = (images, labels)
        return self.__dict__["_arrays"]

    @property
    def classes(self) -> list[str] | None:
        _, labels = self.cached_arrays()
        if labels is None:
            return None
        return [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []

    def fingerprint(self) -> str | None:
        paths = [self.location] + ([self.opts["labels"]] if "labels" in self.opts else [])
        stats = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in paths if os.path.isfile(p)]
        return digest(stats) if stats else None

    def units(self) -> list[Unit]:
        images, _ = self.cached_arrays()
        size = self.opt_int("unit", DEFAULT_UNIT_RECORDS, minimum=1)
        stamp = self.fingerprint()
        return [Unit(u.source, u.id, u.args, u.size, stamp) for u in self.chunk(0, len(images), size)]

    def read(self, unit: Unit, only: set[str] | None = None) -> Iterator[RawSample | ReadError]:
        images, labels = self.cached_arrays()
        start, stop = unit.args
        block = np.asarray(images[start:stop])
        lab = None if labels is None else np.asarray(labels[start:stop])
        for i in range(stop - start):
            yield RawSample(self.key(start + i), block[i], None if lab is None else int(lab[i]))

    def key(self, index: int) -> str:
        return str(index)


class IdxSource(ArraySource):
    """MNIST-style IDX files, gzipped or not, local or remote: `idx:IMAGES?labels=LABELS`."""

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        images = read_idx(self.location)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise UserError(f"source {self.name}: {self.location} holds {images.dtype} of shape {images.shape}, "
                            "not uint8 N×H×W images")  # fmt: skip
        labels = read_idx(self.opts["labels"]).astype(np.int64) if "labels" in self.opts else None
        return images, labels


class NpySource(ArraySource):
    """A local .npy uint8 array N×H×W[×C] (memory-mapped): `npy:PATH?labels=LABELS.npy`."""

    def check(self) -> None:
        if not storage.is_local(self.location):
            raise UserError(f"source {self.name}: npy: files are memory-mapped and must be local")

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        images = _load_npy(self.location)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise UserError(f"source {self.name}: {self.location} is {images.dtype} with shape {images.shape}; "
                            "expected uint8 N×H×W or N×H×W×C")  # fmt: skip
        labels = _load_npy(self.opts["labels"]) if "labels" in self.opts else None
        if labels is not None and not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"source {self.name}: labels {self.opts['labels']} are {labels.dtype}, not integers")
        return images, None if labels is None else np.asarray(labels).astype(np.int64)


@lru_cache(maxsize=8)
def read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (magic 0x0000TTNN: type TT, NN dimensions, big-endian int32 sizes)."""
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        raise UserError(f"IDX file not found: {storage.redact(path)}") from None
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise UserError(f"{path}: not a readable gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(raw[2])
    if dtype is None:
        raise UserError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path}: header says {dims} but the file holds {data.size} values (truncated?)")
    return data.reshape(dims)


@lru_cache(maxsize=8)
def _load_npy(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise UserError(f"npy file not found: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} as .npy: {e}") from None
