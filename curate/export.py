"""Stage 3: a selection (or a labelled source) -> WebDataset tar shards + manifest.json.

    out/shard-000000.tar          KEY.png|jpg|webp  original bytes where the source has them, PNG otherwise
                                  KEY.logits.npy    float16 teacher logits (C,), or the top-K values (K,)
                                  KEY.topk.npy      int16 class indices of those K values (topk only)
                                  KEY.json          uid, sample_id, source, pred, scores, weight, logsumexp
                                  KEY.cls           true label, where known and in the teacher's class space
    out/shard-000000.json         the shard's stats, written after the tar: the completion marker
    out/manifest.json             classes, teacher, input preprocessing, soft-label kind, per shard count/bytes/sha256
    out/errors.parquet            samples that could not be re-read (moved, changed since scoring)

KEY is the uid as 16 hex digits. Shards are planned up front from the selection (units in a seeded
order, so a shard mixes sources while each unit is read about once), written by parallel processes to a
temporary name and renamed; a rerun skips shards whose marker exists. webdataset's TarWriter writes the
tars (mtime 0, so the same plan gives the same bytes).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import webdataset as wds
from PIL import Image

from curate import progress
from curate.errors import UserError
from curate.pool import Pool, write_json_atomic, write_parquet_atomic
from curate.query import connect
from curate.sources import RawSample, Source, content_hash, parse_source, read_keys, uid_of

FORMAT = "kdcurate-shards/1"
KEEP_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
SCORE_COLUMNS = (
    "confidence",
    "margin",
    "entropy",
    "energy",
    "max_logit",
    "bn_score",
    "feat_norm",
    "proj_score",
    "odin",
)


@dataclass
class ExportConfig:
    out: str
    pool: str | None = None
    selection: str | None = None
    sources: list[str] | None = None  # labelled sources exported without a teacher
    shard_size: int = 10_000
    soft_labels: str = "full"  # full | topk:K
    workers: int = -1
    seed: int = 0
    overwrite: bool = False
    show_progress: bool = True


@dataclass
class ExportResult:
    out: str
    shards: int
    shards_skipped: int
    samples: int
    errors: int
    bytes: int
    seconds: float


def export(cfg: ExportConfig) -> ExportResult:
    t0 = time.perf_counter()
    if cfg.shard_size < 1:
        raise UserError("--shard-size must be at least 1")
    out = Path(cfg.out)
    if cfg.sources:
        if cfg.pool or cfg.selection:
            raise UserError("give either POOL --selection DIR, or --source NAME=SPEC, not both")
        plan, header = _plan_sources(cfg)
    else:
        if not cfg.pool or not cfg.selection:
            raise UserError(
                "curate export needs POOL and --selection DIR (or --source NAME=SPEC for a labelled source)"
            )
        if out.resolve().is_relative_to(Path(cfg.pool).resolve()):
            raise UserError(f"--out {out} is inside the pool; shards live beside it")
        plan, header = _plan_selection(cfg)
    _check_previous(out, header, cfg.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "plan.json", header)

    todo = [(i, task) for i, task in enumerate(plan) if not _marker(out, i).is_file()]
    total = sum(_task_size(task) for _, task in todo)
    for p in out.glob("*.tmp"):
        p.unlink()
    # spawned writers pay ~5 s of imports each: worth it only for large exports
    auto = (os.cpu_count() or 1) if total >= 20_000 else 1
    workers = min(len(todo), cfg.workers if cfg.workers >= 0 else auto)
    args = [(str(out / _name(i)), task, header) for i, task in todo]
    with progress.bar("exporting", total=total or None, enabled=cfg.show_progress) as advance:
        if workers <= 1:
            for a in args:
                advance(_write_shard(a)["count"])
        else:
            with mp.get_context("spawn").Pool(workers) as procs:
                for stats in procs.imap_unordered(_write_shard, args):
                    advance(stats["count"] + len(stats["errors"]))

    shards, errors = [], []
    for i in range(len(plan)):
        stats = json.loads(_marker(out, i).read_text())
        errors += stats.pop("errors")
        shards.append(stats)
    manifest = {
        **{k: v for k, v in header.items() if k not in ("plan", "selection_sha256")},
        "count": sum(s["count"] for s in shards),
        "shards": shards,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if errors:
        write_parquet_atomic(out / "errors.parquet", pa.Table.from_pylist(errors))
    write_json_atomic(out / "manifest.json", manifest)
    return ExportResult(str(out), len(plan), len(plan) - len(todo), manifest["count"], len(errors),
                        sum(s["bytes"] for s in shards), time.perf_counter() - t0)  # fmt: skip


# ------------------------------------------------------------------------------------------ planning


def _plan_selection(cfg: ExportConfig) -> tuple[list[dict], dict[str, Any]]:
    pool = Pool(cfg.pool)
    meta = pool.meta()
    sel_path = Path(cfg.selection) / "selection.parquet"
    if not sel_path.is_file():
        raise UserError(f"{cfg.selection} is not a selection (no selection.parquet); make one with 'curate select'")
    classes = meta["classes"]
    soft = _soft_labels(cfg.soft_labels, meta)
    con = connect(cfg.pool, cfg.selection)
    cols = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    scores = [c for c in SCORE_COLUMNS if c in cols]
    logit_cols = "s.logits" if "logits" in cols else "s.topk_idx, s.topk_val, s.logsumexp"
    table = con.sql(
        f"SELECT s.uid, s.sample_id, s.source, s.unit, s.key, s.content_hash, s.label, s.pred, {logit_cols}, "
        f"{', '.join('s.' + c for c in scores)}, x.weight FROM samples s JOIN selection x USING (uid)"
    ).to_arrow_table()
    if table.num_rows == 0:
        raise UserError("the selection matches no sample of this pool; was it made from another pool?")
    labelled = [n for n, s in meta["sources"].items() if s.get("classes") == classes]
    rows = table.to_pylist()
    rng = np.random.default_rng(cfg.seed)
    units = sorted({(r["source"], r["unit"]) for r in rows})
    rank = {u: i for i, u in enumerate(rng.permutation(len(units)))}
    order = {u: rank[i] for i, u in enumerate(units)}
    rows.sort(key=lambda r: (order[(r["source"], r["unit"])], r["key"]))
    plan = []
    for start in range(0, len(rows), cfg.shard_size):
        chunk = rows[start : start + cfg.shard_size]
        for r in chunk:
            r["label"] = r["label"] if r["source"] in labelled else None
        plan.append({"rows": chunk})
    header = {
        "format": FORMAT,
        "classes": classes,
        "teacher": {"spec": meta["teacher"]["spec"], "sha256": meta["teacher"]["sha256"]},
        "input": meta["input"],
        "soft_labels": soft,
        "labels": any(r["label"] is not None for r in rows),
        "pool": str(pool.root.resolve()),
        "selection": str(Path(cfg.selection).resolve()),
        "selection_sha256": hashlib.sha256(sel_path.read_bytes()).hexdigest(),
        "sources": {n: meta["sources"][n]["spec"] for n in sorted({r["source"] for r in rows})},
        "scores": scores,
        "shard_size": cfg.shard_size,
        "seed": cfg.seed,
    }
    return plan, header


def _plan_sources(cfg: ExportConfig) -> tuple[list[dict], dict[str, Any]]:
    sources: dict[str, Source] = {}
    for spec in cfg.sources or []:
        src = parse_source(spec)
        if src.name in sources:
            raise UserError(f"source name {src.name!r} given twice")
        sources[src.name] = src
    classes = {tuple(s.classes) if s.classes else None for s in sources.values()}
    if len(classes) != 1:
        raise UserError("the sources of one export must share one class list (or all have none)")
    class_list = next(iter(classes))
    units = [u for s in sources.values() for u in s.units()]
    if not units:
        raise UserError("the sources hold no sample")
    rng = np.random.default_rng(cfg.seed)
    units = [units[i] for i in rng.permutation(len(units))]
    plan, current, size = [], [], 0
    for u in units:  # whole units per shard, about shard_size samples each
        current.append({"source": u.source, "unit": u.id, "size": u.size})
        size += u.size or 1
        if size >= cfg.shard_size:
            plan.append({"units": current})
            current, size = [], 0
    if current:
        plan.append({"units": current})
    header = {
        "format": FORMAT,
        "classes": list(class_list) if class_list else None,
        "teacher": None,
        "input": _infer_input(sources),
        "soft_labels": "none",
        "labels": class_list is not None,
        "sources": {n: s.spec for n, s in sources.items()},
        "shard_size": cfg.shard_size,
        "seed": cfg.seed,
    }
    return plan, header


def _soft_labels(spec: str, meta: dict[str, Any]) -> str:
    c = len(meta["classes"])
    have = meta["logits"]["kind"], meta["logits"]["k"]
    if spec == "full":
        if have[0] != "full":
            raise UserError(
                f"the pool keeps only the top {have[1]} logits; use --soft-labels topk:K with K <= {have[1]}"
            )
        return "full"
    if spec.startswith("topk:") and spec[5:].isdigit() and 0 < int(spec[5:]) <= min(c, have[1]):
        return f"topk:{int(spec[5:])}"
    raise UserError(f"--soft-labels must be full or topk:K with 0 < K <= {min(c, have[1])}, got {spec!r}")


def _infer_input(sources: dict[str, Source], n: int = 512) -> dict[str, Any]:
    """Size, channels, mean and std from the first n samples (there is no teacher to copy them from)."""
    arrays = []
    for src in sources.values():
        for u in src.units():
            for item in src.read(u):
                if isinstance(item, RawSample) and len(arrays) < n:
                    try:
                        arrays.append(_as_array(item.data))
                    except (OSError, ValueError):
                        continue
            if len(arrays) >= n:
                break
    if not arrays:
        raise UserError("no readable image in the sources")
    channels = 1 if all(a.ndim == 2 for a in arrays) else 3
    pix = np.concatenate([(a if a.ndim == 3 else np.repeat(a[..., None], channels, 2)).reshape(-1, channels)
                          if channels == 3 else a.reshape(-1, 1) for a in arrays]).astype(np.float64) / 255  # fmt: skip
    return {
        "size": int(np.median([min(a.shape[:2]) for a in arrays])),
        "channels": channels,
        "mean": [round(float(v), 4) for v in pix.mean(0)],
        "std": [round(max(float(v), 1e-3), 4) for v in pix.std(0)],
    }


def _as_array(data: bytes | np.ndarray) -> np.ndarray:
    """H×W (grayscale) or H×W×3 uint8."""
    if isinstance(data, bytes):
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("L" if img.mode in ("L", "1", "I", "I;16", "F") else "RGB"))
    arr = np.asarray(data)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr if arr.ndim == 2 else arr[..., :3]


def _check_previous(out: Path, header: dict[str, Any], overwrite: bool) -> None:
    plan_file = out / "plan.json"
    if not plan_file.is_file():
        if out.is_dir() and any(out.glob("shard-*.tar")):
            if not overwrite:
                raise UserError(f"{out} holds shards of another export; pass --overwrite or choose another --out")
            _wipe(out)
        return
    old = json.loads(plan_file.read_text())
    if old != json.loads(json.dumps(header)):
        if not overwrite:
            diff = next((k for k in header if old.get(k) != json.loads(json.dumps(header[k]))), "plan")
            raise UserError(f"{out} was exported with another {diff}; pass --overwrite to replace it")
        _wipe(out)


def _wipe(out: Path) -> None:
    for p in list(out.glob("shard-*")) + [out / "manifest.json", out / "plan.json", out / "errors.parquet"]:
        p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ writing


def _name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def _marker(out: Path, i: int) -> Path:
    return out / f"shard-{i:06d}.json"


def _task_size(task: dict) -> int:
    return len(task["rows"]) if "rows" in task else sum(u["size"] or 0 for u in task["units"])


_SOURCES: dict[str, Source] = {}  # per worker process: parsed sources, so folders are listed once


def _source(spec: str) -> Source:
    if spec not in _SOURCES:
        _SOURCES[spec] = parse_source(spec)
    return _SOURCES[spec]


def _write_shard(args: tuple[str, dict, dict]) -> dict[str, Any]:
    path, task, header = args
    tmp = path + ".tmp"
    count, errors = 0, []
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0, format=tarfile.USTAR_FORMAT) as sink:
        if "rows" in task:
            for sample in _selection_samples(task["rows"], header, errors):
                sink.write(sample)
                count += 1
        else:
            for sample in _source_samples(task["units"], header, errors):
                sink.write(sample)
                count += 1
    os.replace(tmp, path)
    stats = {"name": Path(path).name, "count": count, "bytes": os.path.getsize(path), "sha256": _sha256(path),
             "errors": errors}  # fmt: skip
    write_json_atomic(Path(path).with_suffix(".json"), stats)
    return stats


def _selection_samples(rows: list[dict], header: dict, errors: list) -> Any:
    by_unit: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        by_unit.setdefault((r["source"], r["unit"]), {})[r["key"]] = r
    soft = header["soft_labels"]
    k = int(soft.split(":")[1]) if soft.startswith("topk") else None
    for (source, unit), wanted in by_unit.items():
        found = {}
        try:
            for _, s in read_keys(_source(header["sources"][source]), {unit: set(wanted)}):
                found[s.key] = s
        except (UserError, OSError) as e:
            for r in wanted.values():
                errors.append({"uid": r["uid"], "sample_id": r["sample_id"], "reason": f"source unreadable: {e}"})
            continue
        for key, r in wanted.items():
            s = found.get(key)
            if s is None:
                errors.append({"uid": r["uid"], "sample_id": r["sample_id"], "reason": "not found in its source"})
                continue
            if content_hash(s.data) != r["content_hash"]:
                errors.append({"uid": r["uid"], "sample_id": r["sample_id"], "reason": "changed since it was scored"})
                continue
            ext, data = _image_bytes(s.data)
            sample = {"__key__": f"{r['uid'] & 0xFFFFFFFFFFFFFFFF:016x}", ext: data}
            meta = {"uid": r["uid"], "sample_id": r["sample_id"], "source": source, "pred": r["pred"],
                    "weight": r["weight"], "scores": {c: r[c] for c in header["scores"]}}  # fmt: skip
            if "logits" in r and r["logits"] is not None:
                logits = np.asarray(r["logits"], np.float32)
                if k is None:
                    sample["logits.npy"] = _npy(logits.astype(np.float16))
                else:
                    top = np.argsort(-logits, kind="stable")[:k]
                    sample["logits.npy"] = _npy(logits[top].astype(np.float16))
                    sample["topk.npy"] = _npy(top.astype(np.int16))
                    meta["logsumexp"] = float(np.logaddexp.reduce(logits))
            else:
                sample["logits.npy"] = _npy(np.asarray(r["topk_val"][:k], np.float16))
                sample["topk.npy"] = _npy(np.asarray(r["topk_idx"][:k], np.int16))
                meta["logsumexp"] = r["logsumexp"]
            if r["label"] is not None:
                sample["cls"] = str(int(r["label"])).encode()
            sample["json"] = json.dumps(meta).encode()
            yield sample


def _source_samples(units: list[dict], header: dict, errors: list) -> Any:
    for u in units:
        src = _source(header["sources"][u["source"]])
        unit = next(x for x in src.cached_units() if x.id == u["unit"])
        for s in src.read(unit):
            sample_id = f"{src.name}/{s.key}"
            uid = uid_of(sample_id)
            if not isinstance(s, RawSample):
                errors.append({"uid": uid, "sample_id": sample_id, "reason": s.reason})
                continue
            try:
                ext, data = _image_bytes(s.data)
            except (OSError, ValueError) as e:
                errors.append({"uid": uid, "sample_id": sample_id, "reason": f"not a readable image: {e}"})
                continue
            sample = {"__key__": f"{uid & 0xFFFFFFFFFFFFFFFF:016x}", ext: data}
            if s.label is not None:
                sample["cls"] = str(int(s.label)).encode()
            sample["json"] = json.dumps(
                {"uid": uid, "sample_id": sample_id, "source": src.name, "weight": 1.0}
            ).encode()
            yield sample


def _image_bytes(data: bytes | np.ndarray) -> tuple[str, bytes]:
    """(extension, bytes): the original encoding when it is PNG/JPEG/WebP, PNG otherwise."""
    if isinstance(data, bytes):
        with Image.open(io.BytesIO(data)) as img:
            if img.format in KEEP_FORMATS:
                return KEEP_FORMATS[img.format], data
            img = img.convert("RGBA" if "A" in img.getbands() else ("L" if img.mode in ("L", "1") else "RGB"))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return "png", buf.getvalue()
    arr = np.asarray(data)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return "png", buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(out: str) -> dict[str, Any]:
    return json.loads((Path(out) / "manifest.json").read_text())
