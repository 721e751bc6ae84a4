"""The pool: pool.json, per-unit Parquet parts, errors, completion records, on any storage.

    pool/pool.json                                  pool_id, schema version, teacher, scores, sources
    pool/snapshot.json                              the sample files holding every sample once: outside readers
                                                    read these (a glob of samples/ sees a compaction's rows twice)
    pool/samples/NAME/unit-ID.parquet               one row per decoded sample (zstd), `source` a column: only
                                                    Parquet here, so any reader (pyarrow, pandas, DuckDB, Spark,
                                                    Hugging Face) reads the folder as it is
    pool/samples/NAME/compact-N.parquet      many units' rows merged by `curate compact`
    pool/units/NAME/unit-ID.json             the unit's completion record (rows, errors, fingerprint),
                                                    written last: a unit without it is redone
    pool/units/NAME/compact-N.json           a compact file's manifest (the units it holds): its commit
    pool/errors/NAME/unit-ID.parquet         one row per sample that failed, with its reason
    pool/index/embeddings.faiss + embeddings.json
    pool/derived/scores-H.parquet + scores.json     bn_z, auto, auto_knn once per state of the pool (derived.py)
    pool/locks/ROLE.lock                            who is writing (one scorer, one compactor at a time)

A unit is atomic: its parts are written whole (locally under a hidden temporary name, renamed; on object
storage an object appears whole or not at all), then its record. Records stay when units are compacted:
a unit's rows are in its own part or in the compact file whose manifest names it, never both as far as
`sample_files` sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdcore import storage
from kdcore.errors import UserError

SCHEMA_VERSION = 2
SNAPSHOT = "snapshot.json"
SNAPSHOT_HOW = ("the Parquet files holding every sample once, relative to the pool: read these (not a glob of "
                "samples/, which shows a compaction's files twice until it ends)")  # fmt: skip
ERROR_COLUMNS = (("uid", "int64"), ("sample_id", "string"), ("source", "string"), ("key", "string"),
                 ("unit", "string"), ("reason", "string"))  # fmt: skip


def error_schema():
    import pyarrow as pa

    return pa.schema([(n, getattr(pa, t)()) for n, t in ERROR_COLUMNS])


def sample_schema(num_classes: int, embed_dim: int, logits: str, with_odin: bool, bn_layers: int = 0):
    """Columns of samples/ parts. `logits` is 'full' or 'topk:K'; `bn_layers`: the teacher's BatchNorm layers."""
    import pyarrow as pa

    from curate.scores import score_names

    fields: list[tuple[str, Any]] = [
        ("uid", pa.int64()),
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("key", pa.string()),
        ("unit", pa.string()),
        ("content_hash", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("label", pa.int16()),
        ("meta", pa.string()),
    ]
    if logits == "full":
        fields.append(("logits", pa.list_(pa.float32(), num_classes)))
    else:
        k = int(logits.split(":")[1])
        fields += [("topk_idx", pa.list_(pa.int32(), k)), ("topk_val", pa.list_(pa.float32(), k)),
                   ("logsumexp", pa.float32())]  # fmt: skip
    fields.append(("pred", pa.int16()))
    fields += [(s, pa.float32()) for s in score_names(with_odin)]
    if bn_layers:
        fields.append(("bn_layers", pa.list_(pa.float32(), bn_layers)))
    fields.append(("embedding", pa.list_(pa.float32(), embed_dim)))
    return pa.schema(fields)


def _between(name: str, prefix: str, suffix: str) -> str:
    return name[len(prefix) : -len(suffix)]


class Pool:
    def __init__(self, root: str | Path, what: str = "--pool") -> None:
        self.root = storage.target(os.fspath(root), what)  # never the filesystem root, a bucket's, or ''

    # ------------------------------------------------------------------ layout
    def url(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def meta_url(self) -> str:
        return self.url("pool.json")

    def samples_dir(self, source: str) -> str:
        return self.url("samples", source)

    def part(self, source: str, unit: str) -> str:
        return self.url("samples", source, f"unit-{unit}.parquet")

    def error_part(self, source: str, unit: str) -> str:
        return self.url("errors", source, f"unit-{unit}.parquet")

    def record(self, source: str, unit: str) -> str:
        return self.url("units", source, f"unit-{unit}.json")

    @property
    def index_dir(self) -> str:
        return self.url("index")

    # ------------------------------------------------------------------ metadata
    def exists(self) -> bool:
        return storage.isfile(self.meta_url)

    def meta(self) -> dict[str, Any]:
        if not self.exists():
            raise UserError(f"{storage.redact(self.root)} is not a pool (no pool.json); create one with 'curate score'")
        meta = storage.read_json(self.meta_url, "pool.json")
        if not isinstance(meta, dict) or "classes" not in meta or "teacher" not in meta:
            raise UserError(f"{storage.redact(self.meta_url)} is not a kdcurate pool.json; restore it or rescore")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"pool {storage.redact(self.root)} has schema version {meta.get('schema_version')}, this "
                            f"kdcurate reads {SCHEMA_VERSION}: rescore it into a new pool")  # fmt: skip
        return meta

    def identity(self, meta: dict[str, Any] | None = None) -> str:
        """The pool's id: `pool_id` in pool.json (random, written at creation); a pool written before ids
        has one derived from its creation time and teacher (the next `curate score` records it)."""
        meta = meta if meta is not None else self.meta()
        if meta.get("pool_id"):
            return str(meta["pool_id"])
        seed = f"{meta.get('created_at')}|{meta['teacher'].get('sha256')}|{sorted(meta.get('sources') or {})}"
        return "legacy-" + hashlib.blake2b(seed.encode(), digest_size=8).hexdigest()

    def check_selection(self, selection: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """A selection's selection.json, when the selection was made on this pool; a one-line UserError
        naming both pools otherwise (two pools with a source of the same name share uids, so a join by uid
        would silently pair other images)."""
        meta = meta if meta is not None else self.meta()
        url = storage.join(selection, "selection.json")
        if not storage.isfile(url):
            raise UserError(f"{storage.redact(selection)} has no selection.json, so the pool it was made on is "
                            "unknown; make the selection with 'curate select'")  # fmt: skip
        info = storage.read_json(url, "selection.json")
        if not isinstance(info, dict):
            raise UserError(f"{storage.redact(url)} is not a selection.json; make the selection again")
        here = self.identity(meta)
        if "pool_id" in info:
            same = info["pool_id"] == here
        else:  # a selection written before pool ids: the teacher and the classes must at least agree
            same = (info.get("teacher_sha256") == meta["teacher"].get("sha256")
                    and info.get("classes") == meta["classes"])  # fmt: skip
        if not same:
            raise UserError(
                f"selection {storage.redact(selection)} was made on pool {info.get('pool', '?')} (id "
                f"{info.get('pool_id', 'unknown')}), not on {storage.redact(storage.absolute(self.root))} (id "
                f"{here}); select again on this pool"
            )
        return info

    def write_meta(self, meta: dict[str, Any]) -> None:
        storage.makedirs(self.root)
        storage.write_json(self.meta_url, meta)

    def wipe(self) -> None:
        storage.remove(self.snapshot_url)  # first: no reader is sent to files about to go
        for sub in ("samples", "errors", "units", "index", "derived"):
            storage.rmtree(self.url(sub))
        storage.remove(self.meta_url)

    # ------------------------------------------------------------------ units
    def records(self, source: str | None = None) -> list[dict[str, Any]]:
        """Completion records of complete units (of one source, or all), each with its 'source'."""
        pattern = self.url("units", source or "*", "unit-*.json")
        out = []
        for url in storage.glob(pattern):
            src = storage.name(storage.parent(url))
            try:
                out.append({"source": src, **json.loads(storage.read_bytes(url))})
            except (json.JSONDecodeError, FileNotFoundError):
                continue  # cut short by a kill (locally impossible: written atomically) or removed meanwhile
        return out

    def done_units(self, source: str) -> dict[str, dict[str, Any]]:
        """unit id -> its completion record."""
        return {r["unit"]: r for r in self.records(source)}

    def clean_partial(self, tag: str) -> int:
        """Remove the hidden temporaries a killed run of the command `tag` left (local pools); returns how many."""
        if not storage.is_local(self.root):
            return 0  # objects appear whole or not at all: nothing is left half-written
        n = 0
        root = storage.local(self.root)
        for sub in ("samples", "errors", "units", "index", "derived"):
            for p in (root / sub).rglob(f".*.{tag}{storage.TMP_SUFFIX}"):
                p.unlink(missing_ok=True)
                n += 1
        return n

    def write_unit(self, source: str, unit: str, samples: Any, errors: Any, stats: dict[str, Any]) -> None:
        """Parts first, the completion record last."""
        storage.write_parquet(self.part(source, unit), samples, tag="score")
        if errors.num_rows:
            storage.write_parquet(self.error_part(source, unit), errors, tag="score")
        else:
            storage.remove(self.error_part(source, unit))
        storage.write_json(self.record(source, unit), {**stats, "finished_at": time.time()}, tag="score")

    def write_failed(self, source: str, unit: str, errors: Any) -> None:
        """A unit that could not be read: its error rows, and no record (a rerun tries it again)."""
        storage.write_parquet(self.error_part(source, unit), errors, tag="score")

    def compacted(self, source: str) -> dict[str, dict[str, Any]]:
        """Committed compact files of one source (manifest present, not replaced) -> their manifests."""
        manifests = {}
        for url in storage.glob(self.url("units", source, "compact-*.json")):
            try:
                manifests[storage.name(url).removesuffix(".json")] = json.loads(storage.read_bytes(url))
            except (json.JSONDecodeError, FileNotFoundError):
                continue
        replaced = {r for m in manifests.values() for r in m.get("replaces", [])}
        return {storage.join(self.samples_dir(source), f"{n}.parquet"): m for n, m in sorted(manifests.items())
                if n not in replaced}  # fmt: skip

    def sources_on_disk(self) -> list[str]:
        return sorted(storage.name(u) for u in storage.glob(self.url("units", "*")) if storage.isdir(u))

    def sample_files(self) -> list[str]:
        """The files to read: committed compact files, and the parts of complete units (record present)
        that no compact file holds. Records are listed before manifests: a compaction committing in between
        is seen through its manifest, so its units are never read twice."""
        files = []
        for source in self.sources_on_disk():
            records = self.records(source)
            compacted = self.compacted(source)
            covered = {u for m in compacted.values() for u in m["units"]}
            files += [url for url, m in compacted.items() if m["units"]]  # an emptied file's manifest names none
            files += [self.part(source, r["unit"]) for r in records if r["unit"] not in covered]
        return sorted(files)

    # ------------------------------------------------------------------ the snapshot outside readers use
    @property
    def snapshot_url(self) -> str:
        return self.url(SNAPSHOT)

    def publish(self) -> list[str]:
        """Write snapshot.json: the sample files that hold every complete unit's rows exactly once (paths
        relative to the pool). Writers call it after each commit and before deleting any file a previous
        snapshot may list, one at a time (a short lock), so the snapshot is always whole and never names a
        file deleted before it was replaced."""
        with self._snapshot_lock():
            files = self.sample_files()
            rel = [self.relative(f) for f in files]
            storage.write_json(self.snapshot_url, {"files": rel, "written_at": time.time(),
                                                   "how": SNAPSHOT_HOW}, tag="snapshot")  # fmt: skip
        return files

    def relative(self, url: str) -> str:
        if storage.is_local(self.root):
            return os.path.relpath(storage.local(url), storage.local(self.root)).replace(os.sep, "/")
        return url[len(self.root) + 1 :]

    @contextmanager
    def _snapshot_lock(self) -> Iterator[None]:
        """Serialises snapshot writers (score, compact): locally an OS lock, waited for; on object storage
        the lock object of `remote_lock`, retried."""
        if not storage.is_local(self.root):
            from curate.remote_lock import remote_lock

            holder = {"command": "snapshot", "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            for _ in range(600):
                try:
                    with remote_lock(self.url("locks", "snapshot.lock"), holder, self.root):
                        yield
                    return
                except UserError:
                    time.sleep(0.2)
            raise UserError(f"pool {storage.redact(self.root)}: its snapshot lock stays taken; rerun")
        import fcntl

        path = storage.local(self.url("locks", "snapshot.lock"))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for one listing and one write
            yield
        finally:
            os.close(fd)

    def drop_units(self, source: str, units: set[str]) -> None:
        """Forget units (changed or gone from the source): their parts, errors and records; compact files
        holding any of them are rewritten without them (a new manifest replaces the old one). The parts go
        after a snapshot without them is published."""
        if not units:
            return
        for url, manifest in self.compacted(source).items():
            held = set(manifest["units"]) & units
            if held:
                from curate.parts import rewrite_without

                rewrite_without(self, source, url, manifest, held)
        for unit in sorted(units):
            storage.remove(self.record(source, unit))  # first: the unit is incomplete from here on
        self.publish()
        for unit in sorted(units):
            storage.remove(self.part(source, unit))
            storage.remove(self.error_part(source, unit))

    # ------------------------------------------------------------------ writers
    @contextmanager
    def lock(self, role: str) -> Iterator[None]:
        """One writer of a role (score, compact, index) per pool at a time; a second one is refused with a
        message naming the holder. Local pools use an OS lock (released when the holder dies)."""
        holder = {"command": f"curate {role}", "pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        if not storage.is_local(self.root):
            from curate.remote_lock import remote_lock

            with remote_lock(self.url("locks", f"{role}.lock"), holder, self.root):
                yield
            return
        import fcntl

        path = storage.local(self.url("locks", f"{role}.lock"))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    who = json.loads(Path(path).read_text() or "{}")
                except (json.JSONDecodeError, OSError):
                    who = {}
                raise UserError(
                    f"pool {self.root} is being written by {who.get('command', f'curate {role}')} (pid "
                    f"{who.get('pid', '?')} on {who.get('host', '?')}, since {who.get('since', '?')}); wait for "
                    "it to finish or stop it, then rerun"
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder).encode())
            yield
        finally:
            os.close(fd)  # releases the lock
