"""Sources of encoded image files: `folder:`, `wds:` (WebDataset tars) and `parquet:`, on any storage
kdcore.storage reaches (local, s3://, gs://, http(s)://; `pipe:` commands for tars).

Units are stable when a collection grows: a folder's files are cut into runs at keys whose hash falls on
a boundary (content-defined chunking), so new or removed files change only the units they land in; a
tar or a Parquet row group is a unit named after its file. Each unit carries a fingerprint of what it
holds (names, sizes, modification times; on object storage also the ETag from the listing), which the pool
keeps in the unit's marker: a rerun rescores a unit whose fingerprint changed.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterator
from typing import Any

from curate.sources.base import RawSample, ReadError, Source, Unit, digest
from kdcore import storage
from kdcore.errors import UserError
from kdcore.limits import DEFAULT_MAX_BYTES

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FOLDER_UNIT = 1024
META_EXTS = ("json", "txt")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


class FileSource(Source):
    max_bytes: int = DEFAULT_MAX_BYTES  # set from --max-bytes by the caller


# -------------------------------------------------------------------------------------------- folder


def file_kind_hint(name: str, location: str) -> str:
    """What to write instead of folder: for a single file, by its extension."""
    low, url = location.lower(), storage.redact(location)
    kinds = {(".tar", ".tar.gz", ".tgz"): "wds", (".parquet",): "parquet", (".npy",): "npy",
             ("ubyte", "ubyte.gz", ".idx"): "idx"}  # fmt: skip
    for exts, kind in kinds.items():
        if low.endswith(exts):
            return f"use {name}={kind}:{url}"
    if low.endswith(IMAGE_EXTS):
        return f"give the folder holding it, {name}=folder:{storage.redact(storage.parent(location))}"
    return "give the folder holding the images, or the kind of this file (wds, parquet, npy, idx)"


class FolderSource(FileSource):
    """A directory tree of images (jpg, png, webp, bmp, gif, tiff), local or on object storage, in sorted
    order; `?labels=dirs` labels each image by its first-level folder."""

    OPTIONS = {
        "unit": f"files per unit, on average (default {FOLDER_UNIT})",
        "labels": "dirs: label by first-level folder",
    }

    def check(self) -> None:
        if self.opts.get("labels", "dirs") != "dirs":
            raise UserError(f"source {self.name}: labels= takes only 'dirs', got {self.opts['labels']!r}")
        if not storage.is_local(self.location):
            storage.filesystem(self.location)  # an unknown scheme or a missing driver fails here, at parse time
        self.opt_int("unit", FOLDER_UNIT, minimum=1)

    def listing(self) -> list[tuple[str, int, float]]:
        """(relative path, size, mtime) of the image files, sorted; listed once per process."""
        if "_listing" not in self.__dict__:
            if not storage.isdir(self.location):
                if storage.isfile(self.location):
                    raise UserError(f"source {self.name}: {storage.redact(self.location)} is a file, not a folder; "
                                    f"{file_kind_hint(self.name, self.location)}")  # fmt: skip
                raise UserError(f"source {self.name}: folder not found: {storage.redact(self.location)}")
            skipped: list[str] = []
            self.__dict__["_versions"] = versions = {}
            found = storage.find(self.location, skipped, versions)
            self.__dict__["_skipped"] = [s for s in skipped if s.lower().endswith(IMAGE_EXTS)]
            self.__dict__["_listing"] = [f for f in found if f[0].lower().endswith(IMAGE_EXTS)]
        return self.__dict__["_listing"]

    @property
    def classes(self) -> list[str] | None:
        if self.opts.get("labels") != "dirs":
            return None
        return sorted({rel.split("/")[0] for rel, _, _ in self.listing() if "/" in rel})

    def units(self) -> list[Unit]:
        files = self.listing()
        size = self.opt_int("unit", FOLDER_UNIT, minimum=1)
        units, run = [], []
        for f in files:
            # a boundary before a key whose hash falls on it: inserting a file changes only its own run
            if run and (len(run) >= 4 * size or int(hashlib.blake2b(f[0].encode(), digest_size=8).hexdigest(), 16)
                        % size == 0):  # fmt: skip
                units.append(self._unit(run))
                run = []
            run.append(f)
        if run:
            units.append(self._unit(run))
        return units

    def _unit(self, run: list[tuple[str, int, float]]) -> Unit:
        uid = hashlib.blake2b(run[0][0].encode(), digest_size=6).hexdigest()
        versions = self.__dict__.get("_versions")  # object storage: the ETags too (a rewrite in the same second)
        stamp = digest(run, [versions.get(r) for r, _, _ in run]) if versions else digest(run)
        return Unit(self.name, uid, tuple(r for r, _, _ in run), len(run), stamp)

    def read(self, unit: Unit, only: set[str] | None = None) -> Iterator[RawSample | ReadError]:
        index = {c: i for i, c in enumerate(self.classes or [])}
        for rel in unit.args:
            if only is not None and rel not in only:
                continue
            try:
                data = storage.read_bytes(storage.join(self.location, rel), self.max_bytes)
            except ValueError as e:
                yield ReadError(rel, str(e))
                continue
            except (OSError, UserError) as e:
                yield ReadError(rel, f"unreadable file: {getattr(e, 'strerror', None) or e}")
                continue
            label = index.get(rel.split("/")[0]) if "/" in rel and index else None
            yield RawSample(rel, data, label)


# ----------------------------------------------------------------------------------------------- wds


class WdsSource(FileSource):
    """WebDataset tar shards: a brace pattern or glob of paths or URLs, or `pipe:COMMAND`. One tar per unit,
    streamed (never copied whole, members never extracted by their own path). A sample's key is
    `SHARD/KEY` (keys restart in every tar in many crawls); its image is the first member with an image
    extension, `cls` its true label, `json` and `txt` members (img2dataset's url, caption) its metadata.
    A missing or unreadable tar is a failed unit: reported, the rest scored."""

    OPTIONS = {}

    def urls(self) -> list[str]:
        urls = storage.expand(self.location)
        if not urls:
            raise UserError(f"source {self.name}: no tar file matches {storage.redact(self.location)}")
        probe = [u for u in urls if storage.scheme(u) != "pipe"][: (None if storage.is_local(self.location) else 4)]
        if probe and not any(storage.isfile(u) for u in probe):
            raise UserError(f"source {self.name}: no tar file at {storage.redact(probe[0])}")
        return urls

    def units(self) -> list[Unit]:
        units, seen = [], set()
        urls = self.urls()
        versions = storage.versions([u for u in urls if not storage.is_local(u)])
        for url in urls:
            stem = _safe(storage.name(url).removesuffix(".gz").removesuffix(".tar") if storage.scheme(url) != "pipe"
                         else "pipe-" + digest(url)[:8])  # fmt: skip
            uid = stem if stem not in seen else f"{stem}-{digest(url)[:6]}"
            seen.add(uid)
            units.append(Unit(self.name, uid, (url,), None, self._fingerprint(url, versions.get(url))))
        return units

    @staticmethod
    def _fingerprint(url: str, version: str | None) -> str | None:
        """Local: size and mtime; object storage: size, ETag and mtime from the listing; pipe: and http(s)://
        have none (their units are scored once)."""
        if storage.is_local(url):
            p = storage.local(url)
            return digest(url, p.stat().st_size, p.stat().st_mtime) if p.is_file() else None
        return digest(url, version) if version else None

    def read(self, unit: Unit, only: set[str] | None = None) -> Iterator[RawSample | ReadError]:
        url = unit.args[0]
        current: str | None = None
        group: dict[str, bytes] = {}
        seen: set[str] = set()
        errors: list[ReadError] = []
        with storage.open_read(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    d, _, fname = member.name.rpartition("/")
                    stem, dot, ext = fname.partition(".")
                    if not dot:
                        continue
                    key = f"{unit.id}/{d}/{stem}" if d else f"{unit.id}/{stem}"
                    if key != current and current is not None:
                        yield from self._sample(current, group, seen)
                        group = {}
                    current = key
                    if member.size > self.max_bytes:  # a sparse or huge member: never read
                        errors.append(ReadError(key, f"member {fname} of {member.size:,} bytes exceeds --max-bytes "
                                                     f"{self.max_bytes:,}"))  # fmt: skip
                        group.setdefault("__oversized__", b"")
                        continue
                    f = tar.extractfile(member)
                    group[ext.lower()] = f.read() if f else b""
            except (tarfile.TarError, EOFError, OSError) as e:
                if current is not None:
                    yield from self._sample(current, group, seen)
                    current = None
                yield ReadError(unit.id, f"corrupt tar, read up to here: {e}")
            if current is not None:
                yield from self._sample(current, group, seen)
        yield from errors

    @staticmethod
    def _sample(key: str, group: dict[str, bytes], seen: set[str]) -> Iterator[RawSample | ReadError]:
        """The sample of one key's members (nothing when its image was oversized: reported already)."""
        if key in seen:
            yield ReadError(key, "duplicate key in the tar (its first sample was kept)")
            return
        seen.add(key)
        image = next((group[e] for e in group if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
        if image is None:
            if "__oversized__" not in group:
                yield ReadError(key, f"no image member (members: {', '.join(sorted(group)) or 'none'})")
            return
        label = None
        if "cls" in group:
            try:
                label = int(group["cls"].decode().strip())
            except (ValueError, UnicodeDecodeError):
                label = None
        meta: dict[str, Any] = {}
        if "json" in group:
            try:
                obj = json.loads(group["json"])
                meta.update(obj if isinstance(obj, dict) else {"json": obj})
            except (ValueError, UnicodeDecodeError):
                meta["json"] = group["json"].decode(errors="replace")
        if "txt" in group:
            meta["txt"] = group["txt"].decode(errors="replace")
        yield RawSample(key, image, label, meta or None)


# ------------------------------------------------------------------------------------------- parquet


class ParquetSource(FileSource):
    """Parquet files (a path, URL or glob) with an image column: binary, or Hugging Face's struct {bytes,
    path}. One row group per unit. `?column=` (default image), `?label=` a true-label column, `?key=` a
    column naming the samples (default: the row number), `?meta=a,b` columns kept as metadata."""

    OPTIONS = {
        "column": "image column (default image)",
        "label": "true-label column",
        "key": "column of sample names (default: row number)",
        "meta": "columns kept as metadata, a,b,c",
    }

    def files(self) -> list[str]:
        files = storage.expand(self.location)
        if not files or not all(storage.isfile(f) for f in files):
            raise UserError(f"source {self.name}: no Parquet file at {storage.redact(self.location)}")
        return files

    def _open(self, url: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, path = storage.arrow_filesystem(url)
        try:  # a buffered stream, no pre-buffering: a huge cell costs its page, not also a copy of the chunk
            return pq.ParquetFile(fs.open_input_file(path), buffer_size=1 << 20,
                                  pre_buffer=False)  # fmt: skip
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(
                f"{storage.redact(url)} is not a readable Parquet file: {str(e).splitlines()[0]}"
            ) from None

    def units(self) -> list[Unit]:
        units, seen = [], set()
        col = self.opts.get("column", "image")
        wanted = [c for c in (col, self.opts.get("label"), self.opts.get("key")) if c]
        wanted += [c for c in self.opts.get("meta", "").split(",") if c]
        files = self.files()
        versions = storage.versions([u for u in files if not storage.is_local(u)])
        for url in files:
            try:
                meta = self._open(url)
            except ValueError as e:
                raise UserError(f"source {self.name}: {e}") from None
            names = meta.schema_arrow.names
            missing = [c for c in wanted if c not in names]
            if missing:
                raise UserError(f"source {self.name}: {storage.redact(url)} has no column {missing[0]!r} "
                                f"(columns: {', '.join(names)}); name the image column with ?column=")  # fmt: skip
            stem = _safe(storage.name(url).removesuffix(".parquet"))
            stem = stem if stem not in seen else f"{stem}-{digest(url)[:6]}"
            seen.add(stem)
            offset = 0
            # on object storage the listing's ETag and mtime too: a file rewritten in place is rescored
            stamp: list[Any] = [url, meta.metadata.serialized_size, meta.metadata.num_rows]
            if versions.get(url):
                stamp.append(versions[url])
            for rg in range(meta.num_row_groups):
                n = meta.metadata.row_group(rg).num_rows
                units.append(Unit(self.name, f"{stem}-{rg:05d}", (url, rg, offset, stem), n, digest(*stamp)))
                offset += n
        return units

    def read(self, unit: Unit, only: set[str] | None = None) -> Iterator[RawSample | ReadError]:
        import pyarrow as pa
        import pyarrow.compute as pc

        url, rg, offset, stem = unit.args
        col, label_col, key_col = self.opts.get("column", "image"), self.opts.get("label"), self.opts.get("key")
        meta_cols = [c for c in self.opts.get("meta", "").split(",") if c]
        cols = list(dict.fromkeys(c for c in (col, label_col, key_col, *meta_cols) if c))
        try:
            parquet = self._open(url)
        except ValueError as e:
            raise OSError(str(e)) from None
        i = offset
        for batch in parquet.iter_batches(batch_size=64, row_groups=[rg], columns=cols):
            images = batch.column(col)
            if pa.types.is_struct(images.type):
                images = images.field("bytes")  # Hugging Face's struct {bytes, path}
            sizes = pc.binary_length(images).to_pylist()
            labels = batch.column(label_col).to_pylist() if label_col else None
            keys = batch.column(key_col).to_pylist() if key_col else None
            metas = {c: batch.column(c).to_pylist() for c in meta_cols}
            for j in range(batch.num_rows):
                key = f"{stem}/{keys[j] if keys else i + j}"
                if sizes[j] is None or sizes[j] == 0:
                    yield ReadError(key, "empty image cell")
                    continue
                if sizes[j] > self.max_bytes:
                    yield ReadError(key, f"image cell of {sizes[j]:,} bytes exceeds --max-bytes {self.max_bytes:,}")
                    continue
                label = labels[j] if labels else None
                meta = {c: metas[c][j] for c in meta_cols} or None
                yield RawSample(key, images[j].as_py(), None if label is None else int(label), meta)
            i += batch.num_rows
