"""Image sources: `NAME=KIND:LOCATION[?opt=val&...]`. Every kind registers here, once.

    folder     a directory tree of images (local, s3://, gs://, http(s):// listings)     files.py
    wds        WebDataset tar shards (brace patterns, globs, URLs, pipe:)                files.py
    parquet    Parquet files with an image column (Hugging Face style)                   files.py
    idx        MNIST-style IDX files                                                     arrays.py
    npy        a uint8 .npy array N×H×W[×C]                                              arrays.py
    synthetic  noise, dead leaves, shader-like patterns, glyphs                          synthetic.py
    builtin    data sets shipped by installed packages                                   builtin.py

A new kind is a Source subclass (units, read, OPTIONS) added to KINDS.
"""

from __future__ import annotations

import re

from curate.sources.arrays import IdxSource, NpySource, read_idx
from curate.sources.base import RawSample, ReadError, Source, Unit, content_hash, digest, read_keys, uid_of
from curate.sources.builtin import BuiltinSource
from curate.sources.files import IMAGE_EXTS, FileSource, FolderSource, ParquetSource, WdsSource
from curate.sources.synthetic import SyntheticSource
from kdcore.errors import UserError
from kdcore.specs import split_options

KINDS: dict[str, type[Source]] = {
    "folder": FolderSource,
    "wds": WdsSource,
    "parquet": ParquetSource,
    "idx": IdxSource,
    "npy": NpySource,
    "synthetic": SyntheticSource,
    "builtin": BuiltinSource,
}
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

__all__ = [
    "IMAGE_EXTS", "KINDS", "FileSource", "RawSample", "ReadError", "Source", "Unit",
    "content_hash", "digest", "parse_source", "parse_sources", "read_idx", "read_keys", "uid_of",
]  # fmt: skip


def parse_source(spec: str, max_bytes: int | None = None) -> Source:
    """Parse `NAME=KIND:LOCATION[?opt=val&...]` (options checked, nothing read yet)."""
    if not isinstance(spec, str):
        raise UserError(f"a source spec must be a string NAME=KIND:LOCATION, got {spec!r}")
    name, eq, rest = spec.partition("=")
    if not eq or not name:
        raise UserError(f"source spec {spec!r} needs a name: NAME=KIND:LOCATION, e.g. photos=folder:/data/photos")
    if not NAME_RE.match(name):
        raise UserError(f"source name {name!r} may hold only letters, digits, '_', '-' and '.'")
    kind, colon, loc = rest.partition(":")
    if not colon or kind not in KINDS:
        raise UserError(f"source {name}: unknown kind {kind!r}; use one of {', '.join(KINDS)} (KIND:LOCATION)")
    location, opts = split_options(loc, f"source {name}")
    if not location:
        raise UserError(f"source {name}: {kind}: needs a location")
    source = KINDS[kind](name, kind, location, opts, spec)
    if max_bytes is not None and isinstance(source, FileSource):
        source.max_bytes = max_bytes
    return source


def parse_sources(specs: list[str], max_bytes: int | None = None) -> dict[str, Source]:
    """Several specs by name; a name given twice is a UserError."""
    sources: dict[str, Source] = {}
    for spec in specs:
        src = parse_source(spec, max_bytes)
        if src.name in sources:
            raise UserError(f"source name {src.name!r} given twice")
        sources[src.name] = src
    return sources
