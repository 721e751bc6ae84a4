"""What every source kind shares: samples, units, ids, options.

A unit is the grain of work, of resume and of distribution. Every sample gets `key` (its name within
the source), `sample_id = "<source>/<key>"` and `uid` = the first 8 bytes of blake2b(sample_id),
big-endian, as a signed int64: stable across runs and machines, and the FAISS vector id.

A raw sample carries either encoded bytes (folder, wds, parquet: decoded in the loader workers) or a
uint8 array H×W[×C] (idx, npy, synthetic, builtin: no decoding needed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from kdcore.errors import UserError


def uid_of(sample_id: str) -> int:
    """First 8 bytes of blake2b(sample_id) as a big-endian signed int64."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode()).digest()[:8], "big", signed=True)


def content_hash(data: bytes | np.ndarray) -> str:
    """blake2b-128 of the raw bytes (encoded file bytes, or the record's array bytes), hex."""
    raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (unit fingerprints, unit names)."""
    return hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=10).hexdigest()


MAX_UNITS = 1_000_000  # units of one source: each is planned, recorded and resumed on its own


@dataclass
class RawSample:
    key: str
    data: bytes | np.ndarray
    label: int | None = None
    meta: dict[str, Any] | None = None  # source metadata kept in the pool (url, caption, ...)


@dataclass
class ReadError:
    key: str
    reason: str


@dataclass(frozen=True)
class Unit:
    source: str
    id: str  # file name part: samples/NAME/unit-ID.parquet
    args: tuple  # kind-specific (paths, ranges)
    size: int | None  # samples in the unit when known up front
    fingerprint: str | None = None  # what the unit holds (names, sizes, mtimes); a change means rescore


class Source:
    """A parsed `NAME=KIND:LOCATION?opts` spec. Subclasses list units and read them.

    OPTIONS names the `?key=` options a kind takes (with their help); any other key is refused."""

    OPTIONS: ClassVar[dict[str, str]] = {"unit": "samples per unit"}
    HELP: ClassVar[str] = ""

    def __init__(self, name: str, kind: str, location: str, opts: dict[str, str], spec: str) -> None:
        self.name, self.kind, self.location, self.opts, self.spec = name, kind, location, opts, spec
        unknown = sorted(set(opts) - set(self.OPTIONS))
        if unknown:
            known = ", ".join(self.OPTIONS) or "none"
            raise UserError(f"source {name}: unknown option {unknown[0]!r} for {kind}: (options: {known})")
        self.check()

    def check(self) -> None:
        """Validate the location and options without reading data (subclasses)."""

    # ---------------------------------------------------------------- listing
    def units(self) -> list[Unit]:
        raise NotImplementedError

    def cached_units(self) -> list[Unit]:
        """units(), listed once per process (a folder walk or a tar glob can be slow)."""
        if "_units" not in self.__dict__:
            self.__dict__["_units"] = self.units()
        return self.__dict__["_units"]

    @property
    def classes(self) -> list[str] | None:
        """Names of the true labels, when the source has them (may need the listing)."""
        return None

    @property
    def skipped(self) -> list[str]:
        """Entries the listing passed over (e.g. a folder's dangling links), for the summary."""
        return self.__dict__.get("_skipped", [])

    def read(self, unit: Unit, only: set[str] | None = None) -> Iterator[RawSample | ReadError]:
        """The unit's samples (and read errors) in order; `only`: a hint that just these keys are wanted
        (kinds that can skip the others do; callers filter anyway)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- options
    def opt_int(self, key: str, default: int, minimum: int | None = None) -> int:
        raw = self.opts.get(key, default)
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise UserError(f"source {self.name}: option {key}= needs an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise UserError(f"source {self.name}: option {key}= must be at least {minimum}, got {value}")
        return value

    def check_units(self, records: int, size: int) -> None:
        """Refuse a plan of more than MAX_UNITS units before any is listed (they are planned up front)."""
        units = -(-records // max(1, size))
        if units > MAX_UNITS:
            raise UserError(f"source {self.name}: {records:,} records in units of {size:,} make {units:,} units, "
                            f"over {MAX_UNITS:,}; take fewer records or raise unit=")  # fmt: skip

    def chunk(self, start: int, stop: int, size: int) -> list[Unit]:
        """Units of `size` records over [start, stop); unit ids count from 0 at `start`."""
        size = max(1, size)
        self.check_units(stop - start, size)
        return [
            Unit(self.name, f"{(i - start) // size:06d}", (i, min(stop, i + size)), min(stop, i + size) - i)
            for i in range(start, stop, size)
        ]

    def __getstate__(self) -> dict:  # worker processes list and read for themselves
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_arrays")}


def read_keys(source: Source, wanted: dict[str, set[str]]) -> Iterator[tuple[str, RawSample]]:
    """Re-read samples of a scored source: `wanted` maps unit id -> keys. Yields (unit id, sample) for the
    keys found; a unit is read once, in the source's own order, so this streams like scoring did."""
    for unit in source.cached_units():
        keys = wanted.get(unit.id)
        if not keys:
            continue
        for item in source.read(unit, only=keys):
            if isinstance(item, RawSample) and item.key in keys:
                yield unit.id, item
