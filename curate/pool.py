"""The pool directory: pool.json, per-unit Parquet parts, errors, completion markers.

    pool/pool.json
    pool/samples/source=NAME/unit-ID.parquet      one row per decoded sample (zstd)
    pool/samples/source=NAME/unit-ID.done.json    completion marker + stats, written last
    pool/samples/source=NAME/compact-N.parquet    many units' rows merged by `curate compact`
    pool/samples/source=NAME/compact-N.json       its manifest (the units it holds), written last
    pool/errors/source=NAME/unit-ID.parquet       one row per sample that failed, with its reason
    pool/index/embeddings.faiss + embeddings.json

A unit is atomic: each file is written under a temporary name and renamed; the marker comes last,
so a unit without its marker is simply redone. Markers stay when units are compacted: a unit's rows
are in its own part, or in the compact file whose manifest names it, never both as far as readers
see (`sample_files`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import UserError

SCHEMA_VERSION = 1
TMP_SUFFIX = ".tmp"

ERROR_SCHEMA = pa.schema(
    [
        ("uid", pa.int64()),
        ("sample_id", pa.string()),
        ("key", pa.string()),
        ("unit", pa.string()),
        ("reason", pa.string()),
    ]
)


def sample_schema(num_classes: int, embed_dim: int, logits: str, with_odin: bool) -> pa.Schema:
    """Columns of samples/ parts. `logits` is 'full' or 'topk:K'."""
    fields: list[tuple[str, pa.DataType]] = [
        ("uid", pa.int64()),
        ("sample_id", pa.string()),
        ("key", pa.string()),
        ("unit", pa.string()),
        ("content_hash", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("label", pa.int16()),
    ]
    if logits == "full":
        fields.append(("logits", pa.list_(pa.float32(), num_classes)))
    else:
        k = int(logits.split(":")[1])
        fields += [
            ("topk_idx", pa.list_(pa.int32(), k)),
            ("topk_val", pa.list_(pa.float32(), k)),
            ("logsumexp", pa.float32()),
        ]
    fields += [("pred", pa.int16())]
    fields += [(s, pa.float32()) for s in ("confidence", "margin", "entropy", "energy", "max_logit")]
    fields += [(s, pa.float32()) for s in ("bn_score", "feat_norm", "proj_score")]
    if with_odin:
        fields.append(("odin", pa.float32()))
    fields.append(("embedding", pa.list_(pa.float32(), embed_dim)))
    return pa.schema(fields)


class Pool:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ layout
    @property
    def meta_path(self) -> Path:
        return self.root / "pool.json"

    def samples_dir(self, source: str) -> Path:
        return self.root / "samples" / f"source={source}"

    def errors_dir(self, source: str) -> Path:
        return self.root / "errors" / f"source={source}"

    def part(self, source: str, unit: str) -> Path:
        return self.samples_dir(source) / f"unit-{unit}.parquet"

    def error_part(self, source: str, unit: str) -> Path:
        return self.errors_dir(source) / f"unit-{unit}.parquet"

    def marker(self, source: str, unit: str) -> Path:
        return self.samples_dir(source) / f"unit-{unit}.done.json"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    # ------------------------------------------------------------------ metadata
    def exists(self) -> bool:
        return self.meta_path.is_file()

    def meta(self) -> dict[str, Any]:
        if not self.exists():
            raise UserError(f"{self.root} is not a pool (no pool.json); create one with 'curate score'")
        return json.loads(self.meta_path.read_text())

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.meta_path, meta)

    def wipe(self) -> None:
        for sub in ("samples", "errors", "index"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        self.meta_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ units
    def done_units(self, source: str) -> set[str]:
        d = self.samples_dir(source)
        if not d.is_dir():
            return set()
        return {p.name[len("unit-") : -len(".done.json")] for p in d.glob("unit-*.done.json")}

    def clean_partial(self) -> int:
        """Remove temporary files a killed run left behind; returns how many."""
        n = 0
        for sub in ("samples", "errors"):
            for p in (self.root / sub).glob(f"*/*{TMP_SUFFIX}"):
                p.unlink(missing_ok=True)
                n += 1
        return n

    def write_unit(self, source: str, unit: str, samples: pa.Table, errors: pa.Table, stats: dict) -> None:
        """Parts first (temp + rename), the marker last."""
        self.samples_dir(source).mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(self.part(source, unit), samples)
        err_path = self.error_part(source, unit)
        if errors.num_rows:
            self.errors_dir(source).mkdir(parents=True, exist_ok=True)
            write_parquet_atomic(err_path, errors)
        else:
            err_path.unlink(missing_ok=True)
        write_json_atomic(self.marker(source, unit), {**stats, "finished_at": time.time()})

    def write_failed(self, source: str, unit: str, errors: pa.Table) -> None:
        """A unit that could not be read: its error rows, and no marker (a rerun tries it again)."""
        self.errors_dir(source).mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(self.error_part(source, unit), errors)

    def markers(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted((self.root / "samples").glob("source=*/unit-*.done.json")):
            out.append({"source": p.parent.name.split("=", 1)[1], **json.loads(p.read_text())})
        return out

    def compacted(self, source_dir: Path) -> dict[Path, list[str]]:
        """Committed compact files of one source directory (manifest present) -> the units they hold."""
        out = {}
        for m in sorted(source_dir.glob("compact-*.json")):
            data = json.loads(m.read_text())
            out[m.with_suffix(".parquet")] = data["units"]
        return out

    def sample_files(self) -> list[Path]:
        """The files to read: committed compact files, and the parts of complete units (marker present)
        that no compact file holds."""
        files = []
        for d in sorted((self.root / "samples").glob("source=*")):
            compacted = self.compacted(d)
            covered = {u for units in compacted.values() for u in units}
            files += list(compacted)
            files += [
                p
                for p in sorted(d.glob("unit-*.parquet"))
                if p.name[len("unit-") : -len(".parquet")] not in covered
                and p.with_name(p.name[: -len(".parquet")] + ".done.json").exists()
            ]
        return sorted(files)


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False))
    os.replace(tmp, path)
