"""Image sources: parse `NAME=KIND:LOCATION[?opt=val&...]`, enumerate units, read raw samples.

A unit is the grain of work, of resume and of distribution. Every sample gets `key` (its name within
the source), `sample_id = "<source>/<key>"` and `uid` = the first 8 bytes of blake2b(sample_id),
big-endian, as a signed int64 — stable across runs and machines, and the FAISS vector id.

A raw sample carries either encoded bytes (folder, wds, parquet: decoded in the loader workers) or a
uint8 array H×W[×C] (idx, npy, synthetic, builtin: no decoding needed).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import pyarrow.parquet as pq

from curate.errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
FOLDER_UNIT = 1024
DEFAULT_UNIT_RECORDS = 4096


def uid_of(sample_id: str) -> int:
    """First 8 bytes of blake2b(sample_id) as a big-endian signed int64."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode()).digest()[:8], "big", signed=True)


def content_hash(data: bytes | np.ndarray) -> str:
    """blake2b-128 of the raw bytes (encoded file bytes, or the record's array bytes), hex."""
    raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


@dataclass
class RawSample:
    key: str
    data: bytes | np.ndarray
    label: int | None = None


@dataclass
class ReadError:
    key: str
    reason: str


@dataclass(frozen=True)
class Unit:
    source: str
    id: str  # file name part: samples/source=NAME/unit-ID.parquet
    args: tuple  # kind-specific (paths, ranges)
    size: int | None  # samples in the unit when known up front


@dataclass
class Source:
    """A parsed `NAME=KIND:LOCATION?opts` spec. Subclasses enumerate units and read them."""

    name: str
    kind: str
    location: str
    opts: dict[str, str] = field(default_factory=dict)
    spec: str = ""
    classes: list[str] | None = None  # names of true labels, when the source has them

    def __post_init__(self) -> None:  # subclasses validate their location here
        pass

    def units(self) -> list[Unit]:
        raise NotImplementedError

    def cached_units(self) -> list[Unit]:
        """units(), listed once per process (a folder walk or a tar glob can be slow)."""
        if "_units" not in self.__dict__:
            self.__dict__["_units"] = self.units()
        return self.__dict__["_units"]

    def read(self, unit: Unit) -> Iterator[RawSample | ReadError]:
        raise NotImplementedError

    def opt_int(self, key: str, default: int) -> int:
        try:
            return int(self.opts.get(key, default))
        except ValueError:
            raise UserError(f"source {self.name}: option {key}= needs an integer, got {self.opts[key]!r}") from None

    def chunk(self, start: int, stop: int, size: int) -> list[Unit]:
        """Units of `size` records over [start, stop); unit ids count from 0 at `start`."""
        size = max(1, size)
        return [
            Unit(self.name, f"{(i - start) // size:06d}", (i, min(stop, i + size)), min(stop, i + size) - i)
            for i in range(start, stop, size)
        ]


# -------------------------------------------------------------------------------------------- folder


class FolderSource(Source):
    """A directory tree of images in sorted order; `?labels=dirs` labels by first-level folder."""

    def _files(self) -> list[str]:
        root = Path(self.location)
        if not root.is_dir():
            raise UserError(f"source {self.name}: folder not found: {root}")
        files = []
        top = str(root)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            prefix = dirpath[len(top) :].strip(os.sep).replace(os.sep, "/")
            prefix = prefix + "/" if prefix else ""
            files += [prefix + f for f in filenames if f.lower().endswith(IMAGE_EXTS)]
        files.sort()
        if self.opts.get("labels") == "dirs":
            self.classes = sorted({f.split("/")[0] for f in files if "/" in f})
        return files

    def units(self) -> list[Unit]:
        files = self._files()
        size = self.opt_int("unit", FOLDER_UNIT)
        return [
            Unit(self.name, f"{i // size:06d}", tuple(files[i : i + size]), len(files[i : i + size]))
            for i in range(0, len(files), size)
        ]

    def read(self, unit: Unit) -> Iterator[RawSample | ReadError]:
        root = Path(self.location)
        class_index = {c: i for i, c in enumerate(self.classes or [])}
        for rel in unit.args:
            try:
                data = (root / rel).read_bytes()
            except OSError as e:
                yield ReadError(rel, f"unreadable file: {e.strerror or e}")
                continue
            label = class_index.get(rel.split("/")[0]) if "/" in rel and class_index else None
            yield RawSample(rel, data, label)


# ----------------------------------------------------------------------------------------------- wds


class WdsSource(Source):
    """WebDataset tar shards (brace pattern or glob); one tar per unit, members streamed, never
    extracted by their own path. The image is the first member with an image extension; `cls` is
    the true label."""

    def _tars(self) -> list[str]:
        import braceexpand

        paths: list[str] = []
        for pat in braceexpand.braceexpand(self.location):
            paths.extend(sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat])
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing or not paths:
            raise UserError(f"source {self.name}: no tar file at {missing[0] if missing else self.location}")
        return paths

    def units(self) -> list[Unit]:
        return [Unit(self.name, f"{i:06d}", (p,), None) for i, p in enumerate(self._tars())]

    def read(self, unit: Unit) -> Iterator[RawSample | ReadError]:
        path = unit.args[0]
        current: str | None = None
        group: dict[str, bytes] = {}
        try:
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name
                    d, _, fname = base.rpartition("/")
                    stem, dot, ext = fname.partition(".")
                    if not dot:
                        continue
                    key = f"{d}/{stem}" if d else stem
                    if key != current and current is not None:
                        yield self._sample(current, group)
                        group = {}
                    current = key
                    f = tar.extractfile(member)
                    group[ext.lower()] = f.read() if f else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            if current is not None:
                yield self._sample(current, group)
                current = None
            yield ReadError(f"{Path(path).name}", f"corrupt tar: {e}")
        if current is not None:
            yield self._sample(current, group)

    @staticmethod
    def _sample(key: str, group: dict[str, bytes]) -> RawSample | ReadError:
        image = next((group[e] for e in group if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
        if image is None:
            return ReadError(key, f"no image member (members: {', '.join(sorted(group))})")
        label = None
        if "cls" in group:
            try:
                label = int(group["cls"].decode().strip())
            except ValueError:
                label = None
        return RawSample(key, image, label)


# ------------------------------------------------------------------------------------------- parquet


class ParquetSource(Source):
    """Parquet files with an image column (binary, or Hugging Face's struct {bytes, path});
    `?column=image&label=label&key=COL`; one row group per unit."""

    def units(self) -> list[Unit]:
        files = sorted(glob.glob(self.location)) if any(c in self.location for c in "*?[") else [self.location]
        if not files or not all(os.path.isfile(f) for f in files):
            raise UserError(f"source {self.name}: no Parquet file at {self.location}")
        units = []
        col = self.opts.get("column", "image")
        for fi, f in enumerate(files):
            meta = pq.ParquetFile(f)
            if col not in meta.schema_arrow.names:
                raise UserError(
                    f"source {self.name}: {f} has no column {col!r} (columns: {meta.schema_arrow.names}); "
                    "name it with ?column="
                )
            for rg in range(meta.num_row_groups):
                n = meta.metadata.row_group(rg).num_rows
                units.append(Unit(self.name, f"{fi:04d}-{rg:05d}", (f, rg), n))
        return units

    def read(self, unit: Unit) -> Iterator[RawSample | ReadError]:
        path, rg = unit.args
        col, label_col, key_col = self.opts.get("column", "image"), self.opts.get("label"), self.opts.get("key")
        cols = [c for c in (col, label_col, key_col) if c]
        parquet = pq.ParquetFile(path)
        table = parquet.read_row_group(rg, columns=cols)
        images = table.column(col).to_pylist()
        labels = table.column(label_col).to_pylist() if label_col else [None] * len(images)
        keys = table.column(key_col).to_pylist() if key_col else None
        offset = sum(parquet.metadata.row_group(i).num_rows for i in range(rg))
        stem = Path(path).stem
        for i, img in enumerate(images):
            key = str(keys[i]) if keys else f"{stem}/{offset + i}"
            data = img.get("bytes") if isinstance(img, dict) else img
            if not data:
                yield ReadError(key, "empty image cell")
                continue
            yield RawSample(key, bytes(data), None if labels[i] is None else int(labels[i]))


# -------------------------------------------------------------------------------------- array kinds


class ArraySource(Source):
    """Base of kinds held as a uint8 array N×H×W[×C]: units are chunks of `?unit=` records."""

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def cached_arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """arrays(), read once per process (an IDX file is decompressed whole)."""
        if "_arrays" not in self.__dict__:
            self.__dict__["_arrays"] = self.arrays()
        return self.__dict__["_arrays"]

    def __getstate__(self) -> dict:  # worker processes read the file themselves
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"}

    def units(self) -> list[Unit]:
        images, _ = self.cached_arrays()
        return self.chunk(0, len(images), self.opt_int("unit", DEFAULT_UNIT_RECORDS))

    def read(self, unit: Unit) -> Iterator[RawSample | ReadError]:
        images, labels = self.cached_arrays()
        start, stop = unit.args
        block = np.asarray(images[start:stop])
        lab = None if labels is None else np.asarray(labels[start:stop])
        for i in range(stop - start):
            yield RawSample(self.key(start + i), block[i], None if lab is None else int(lab[i]))

    def key(self, index: int) -> str:
        return str(index)


class IdxSource(ArraySource):
    """MNIST-style IDX files, gzipped or not: `idx:IMAGES?labels=LABELS`."""

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        images = read_idx(self.location)
        if images.ndim != 3:
            raise UserError(f"source {self.name}: {self.location} holds a {images.ndim}-d array, not N×H×W images")
        labels = read_idx(self.opts["labels"]) if "labels" in self.opts else None
        if labels is not None and len(labels) != len(images):
            raise UserError(f"source {self.name}: {len(labels)} labels for {len(images)} images")
        if labels is not None:
            self.classes = [str(c) for c in range(int(labels.max()) + 1)]
        return images, labels


class NpySource(ArraySource):
    """A .npy uint8 array N×H×W[×C] (memory-mapped): `npy:PATH?labels=LABELS.npy`."""

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        images = _load_npy(self.location)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise UserError(
                f"source {self.name}: {self.location} is {images.dtype} with shape {images.shape}; "
                "expected uint8 N×H×W or N×H×W×C"
            )
        labels = _load_npy(self.opts["labels"]) if "labels" in self.opts else None
        if labels is not None:
            self.classes = [str(c) for c in range(int(labels.max()) + 1)]
        return images, labels


@lru_cache(maxsize=8)
def read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (magic 0x0000TTNN: type TT, NN dimensions, big-endian int32 sizes)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"IDX file not found: {path}")
    raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
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
    if not Path(path).is_file():
        raise UserError(f"npy file not found: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise UserError(f"cannot read {path} as .npy: {e}") from None


# ------------------------------------------------------------------------------------------ re-reading


def read_keys(source: Source, wanted: dict[str, set[str]]) -> Iterator[tuple[str, RawSample]]:
    """Re-read samples of a scored source: `wanted` maps unit id -> keys. Yields (unit id, sample) for the
    keys found; a unit is read once, in the source's own order, so this streams like scoring did."""
    for unit in source.cached_units():
        keys = wanted.get(unit.id)
        if not keys:
            continue
        for item in source.read(unit):
            if isinstance(item, RawSample) and item.key in keys:
                yield unit.id, item


# ------------------------------------------------------------------------------------------ parsing

KINDS: dict[str, type[Source]] = {
    "folder": FolderSource,
    "wds": WdsSource,
    "parquet": ParquetSource,
    "idx": IdxSource,
    "npy": NpySource,
}


def parse_source(spec: str) -> Source:
    """Parse `NAME=KIND:LOCATION[?opt=val&...]`."""
    from curate import generated  # the synthetic and builtin kinds register themselves

    kinds = {**KINDS, "synthetic": generated.SyntheticSource, "builtin": generated.BuiltinSource}
    name, eq, rest = spec.partition("=")
    if not eq or not name:
        raise UserError(f"source spec {spec!r} needs a name: NAME=KIND:LOCATION, e.g. photos=folder:/data/photos")
    if not NAME_RE.match(name):
        raise UserError(f"source name {name!r} may hold only letters, digits, '_', '-' and '.'")
    kind, colon, loc = rest.partition(":")
    if not colon or kind not in kinds:
        raise UserError(f"source {name}: unknown kind {kind!r}; use one of {', '.join(kinds)} (KIND:LOCATION)")
    location, _, query = loc.partition("?")
    try:
        opts: dict[str, Any] = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError:
        raise UserError(f"source {name}: cannot parse options {query!r}; use ?key=value&key=value") from None
    if not location:
        raise UserError(f"source {name}: {kind}: needs a location")
    return kinds[kind](name=name, kind=kind, location=location, opts=opts, spec=spec)
