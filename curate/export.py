"""Stage 3: a selection (or a labelled source) -> WebDataset tar shards + manifest.json, on any storage.

    out/shard-000000.tar          KEY.png|jpg|webp  original bytes where the source has them (PNG, JPEG, WebP),
                                                    else a lossless PNG of exactly what the view decodes;
                                                    with --image-format jpg|png|webp every image in that
                                                    encoding, with --image-size view at the teacher's view
                                  KEY.logits.npy    float16 teacher logits (C,), or the top-K values (K,)
                                  KEY.topk.npy      int16 class indices of those K values (topk only)
                                  KEY.json          uid, sample_id, source, pred, scores, weight, meta, logsumexp
                                  KEY.cls           true label, where known and in the teacher's class space
    out/shard-000000.json         the shard's stats (count, bytes, sha256), written after the tar: its marker
    out/manifest.json             classes, teacher, input preprocessing, soft-label kind, per shard stats
    out/errors.parquet            samples that could not be re-read (moved, changed since scoring)

KEY is the uid as 16 hex digits. Shards are planned up front from the selection (units in a seeded
order, so a shard mixes sources while each unit is read about once) and written by parallel processes;
a shard appears whole (locally a hidden temporary renamed, on object storage an object closed), then
its marker. A rerun skips shards whose marker exists and writes the same bytes for the others (webdataset's
TarWriter with mtime 0), locally and on object storage alike.
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
from typing import Any

import numpy as np
import pyarrow as pa
import webdataset as wds
from PIL import Image

from curate.config import ExportConfig
from curate.pool import Pool
from curate.query import connect
from curate.scores import SCORES
from curate.sources import RawSample, Source, content_hash, parse_sources, read_keys, uid_of
from kdcore import progress, storage
from kdcore.errors import UserError
from kdcore.specs import parse_topk, topk_k
from kdcore.view import DecodeError, InputSpec, open_image, to_mode, to_pixels

FORMAT = "kdcurate-shards/1"
KEEP_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
PNG_MODES = ("1", "L", "LA", "I;16", "P", "RGB", "RGBA")  # kept as they are in a re-encoded PNG
SAVE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
DEFAULT_IMAGE = {"format": "keep", "quality": 95, "size": "original"}  # what an export without the options wrote


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
    out = cfg.out = storage.target(cfg.out, "--out")
    if cfg.pool is not None:
        cfg.pool = storage.target(cfg.pool, "--pool")
    storage.check_writable(out, "--out")
    if storage.isfile(out):
        raise UserError(f"--out {out} is a file; give a directory for the shards")
    if cfg.sources:
        if cfg.pool or cfg.selection:
            raise UserError("give either POOL --selection DIR, or --source NAME=SPEC, not both")
        plan, header = _plan_sources(cfg)
    else:
        if not cfg.pool or not cfg.selection:
            raise UserError("curate export needs POOL and --selection DIR (or --source NAME=SPEC for a labelled "
                            "source)")  # fmt: skip
        if storage.inside(out, cfg.pool):
            raise UserError(f"--out {out} is inside the pool; shards live beside it")
        plan, header = _plan_selection(cfg)
    _check_previous(out, header, cfg.overwrite)
    storage.makedirs(out)
    storage.write_json(storage.join(out, "plan.json"), header, tag="export")
    if storage.is_local(out):
        for p in storage.local(out).glob(f".*.export{storage.TMP_SUFFIX}"):
            p.unlink()

    todo = [(i, task) for i, task in enumerate(plan) if not storage.exists(_marker(out, i))]
    total = sum(_task_size(task) for _, task in todo)
    # spawned writers pay ~5 s of imports each: worth it only for large exports
    auto = (os.cpu_count() or 1) if total >= 20_000 else 1
    workers = min(len(todo), cfg.workers if cfg.workers >= 0 else auto)
    args = [(storage.join(out, _name(i)), task, header) for i, task in todo]
    with progress.bar("exporting", total=total or None, enabled=cfg.show_progress) as advance:
        if workers <= 1:
            for a in args:
                stats = _write_shard(a)
                advance(stats["count"] + len(stats["errors"]))
        else:
            with mp.get_context("spawn").Pool(workers, initializer=die_with_parent, initargs=(os.getpid(),)) as procs:
                for stats in procs.imap_unordered(_write_shard, args):
                    advance(stats["count"] + len(stats["errors"]))

    shards, errors = [], []
    for i in range(len(plan)):
        stats = storage.read_json(_marker(out, i))
        errors += stats.pop("errors")
        shards.append(stats)
    manifest = {
        **{k: v for k, v in header.items() if k != "selection_sha256"},
        "count": sum(s["count"] for s in shards),
        "shards": shards,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if errors:
        storage.write_parquet(storage.join(out, "errors.parquet"), pa.Table.from_pylist(errors), tag="export")
    storage.write_json(storage.join(out, "manifest.json"), manifest, tag="export")
    return ExportResult(storage.redact(out), len(plan), len(plan) - len(todo), manifest["count"], len(errors),
                        sum(s["bytes"] for s in shards), time.perf_counter() - t0)  # fmt: skip


# ------------------------------------------------------------------------------------------ planning


def _plan_selection(cfg: ExportConfig) -> tuple[list[dict], dict[str, Any]]:
    pool = Pool(cfg.pool)
    meta = pool.meta()
    sel_path = storage.join(cfg.selection, "selection.parquet")
    if not storage.isfile(sel_path):
        raise UserError(f"{cfg.selection} is not a selection (no selection.parquet); make one with 'curate select'")
    classes = meta["classes"]
    soft = _soft_labels(cfg.soft_labels, meta)
    con = connect(cfg.pool, cfg.selection)
    cols = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    scores = [c for c in SCORES if c in cols]
    logit_cols = "s.logits" if "logits" in cols else "s.topk_idx, s.topk_val, s.logsumexp"
    table = con.sql(
        f"SELECT s.uid, s.sample_id, s.source, s.unit, s.key, s.content_hash, s.label, s.pred, s.meta, {logit_cols}, "
        f"{', '.join('s.' + c for c in scores)}, x.weight FROM samples s JOIN selection x USING (uid) "
        "QUALIFY row_number() OVER (PARTITION BY s.uid) = 1"
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
        "pool": storage.redact(storage.absolute(pool.root)),
        "selection": storage.redact(storage.absolute(cfg.selection)),
        "selection_sha256": hashlib.sha256(storage.read_bytes(sel_path)).hexdigest(),
        "sources": {n: meta["sources"][n]["spec"] for n in sorted({r["source"] for r in rows})},
        "scores": scores,
        "shard_size": cfg.shard_size,
        "seed": cfg.seed,
        "image": _image(cfg),
    }
    return plan, header


def _plan_sources(cfg: ExportConfig) -> tuple[list[dict], dict[str, Any]]:
    sources = parse_sources(cfg.sources)
    units = [u for s in sources.values() for u in s.units()]  # lists folders: their classes are known after
    if not units:
        raise UserError("the sources hold no sample")
    classes = {tuple(s.classes) if s.classes else None for s in sources.values()}
    if len(classes) != 1:
        raise UserError("the sources of one export must share one class list (or all have none)")
    class_list = next(iter(classes))
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
        "sources": {n: storage.redact(s.spec) for n, s in sources.items()},
        "shard_size": cfg.shard_size,
        "seed": cfg.seed,
        "image": _image(cfg),
    }
    return plan, header


def _image(cfg: ExportConfig) -> dict[str, Any]:
    """How the shards hold images (manifest.json `image`): format keep|jpg|png|webp, quality, size original|view."""
    return {"format": cfg.image_format, "quality": cfg.image_quality, "size": cfg.image_size}


def _soft_labels(spec: str, meta: dict[str, Any]) -> str:
    have_kind, have_k = meta["logits"]["kind"], meta["logits"]["k"]
    if spec == "full" and have_kind != "full":
        raise UserError(f"the pool keeps only the top {have_k} logits; use --soft-labels topk:K with K <= {have_k}")
    return parse_topk(spec, min(len(meta["classes"]), have_k), "--soft-labels")


def _infer_input(sources: dict[str, Source], n: int = 512) -> dict[str, Any]:
    """Size, channels, mean and std from the first n samples (there is no teacher to copy them from)."""
    arrays = []
    for src in sources.values():
        for u in src.cached_units():
            for item in src.read(u):
                if isinstance(item, RawSample) and len(arrays) < n:
                    try:
                        arrays.append(_as_array(item.data))
                    except DecodeError:
                        continue
            if len(arrays) >= n:
                break
    if not arrays:
        raise UserError("no readable image in the sources")
    channels = 1 if all(a.ndim == 2 for a in arrays) else 3
    pix = np.concatenate([(a if a.ndim == 3 else np.repeat(a[..., None], 3, 2)).reshape(-1, 3) if channels == 3
                          else a.reshape(-1, 1) for a in arrays]).astype(np.float64) / 255  # fmt: skip
    return {
        "size": int(np.median([min(a.shape[:2]) for a in arrays])),
        "channels": channels,
        "mean": [round(float(v), 4) for v in pix.mean(0)],
        "std": [round(max(float(v), 1e-3), 4) for v in pix.std(0)],
        "resize": "shorter-side+center-crop",
    }


def _as_array(data: bytes | np.ndarray) -> np.ndarray:
    """H×W (grayscale) or H×W×3 uint8, decoded as the view decodes."""
    if isinstance(data, bytes):
        img, _ = open_image(data)
        grey = img.mode in ("L", "LA", "1", "I", "I;16", "F") or img.mode.startswith("I;16")
        return np.asarray(to_mode(img, 1 if grey else 3))
    arr = np.asarray(data)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr if arr.ndim == 2 else arr[..., :3]


def _check_previous(out: str, header: dict[str, Any], overwrite: bool) -> None:
    plan_file = storage.join(out, "plan.json")
    if not storage.isfile(plan_file):
        if storage.isdir(out) and storage.glob(storage.join(out, "shard-*.tar")):
            if not overwrite:
                raise UserError(f"{out} holds shards of another export; pass --overwrite or choose another --out")
            _wipe(out)
        return
    old = storage.read_json(plan_file, "plan.json")
    old.setdefault("image", DEFAULT_IMAGE)
    if old != json.loads(json.dumps(header, default=str)):
        if not overwrite:
            diff = next((k for k in header if old.get(k) != json.loads(json.dumps(header[k], default=str))), "plan")
            raise UserError(f"{out} was exported with another {diff}; pass --overwrite to replace it")
        _wipe(out)


def _wipe(out: str) -> None:
    for url in storage.glob(storage.join(out, "shard-*")):
        storage.remove(url)
    for name in ("manifest.json", "plan.json", "errors.parquet"):
        storage.remove(storage.join(out, name))


# ------------------------------------------------------------------------------------------ writing


def _name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def _marker(out: str, i: int) -> str:
    return storage.join(out, f"shard-{i:06d}.json")


def _task_size(task: dict) -> int:
    return len(task["rows"]) if "rows" in task else sum(u["size"] or 0 for u in task["units"])


_SOURCES: dict[str, Source] = {}  # per worker process: parsed sources, so folders are listed once


def _source(spec: str) -> Source:
    if spec not in _SOURCES:
        _SOURCES[spec] = parse_sources([spec])[spec.partition("=")[0]]
    return _SOURCES[spec]


class _Hashing(io.RawIOBase):
    """A writer that passes bytes through and keeps their sha256 and count (no second read of the shard)."""

    def __init__(self, sink: Any) -> None:
        self.sink, self.sha, self.bytes = sink, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        self.sink.write(b)
        return len(b)


def die_with_parent(parent: int) -> None:
    """Run in each writer process: end it when the export that started it dies, even by SIGKILL (Linux's
    parent-death signal; elsewhere a thread watching the parent's pid), so nothing writes on unasked."""
    import contextlib
    import ctypes
    import signal
    import threading

    with contextlib.suppress(OSError, AttributeError):  # Linux only
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:  # died before the watch was set
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _write_shard(args: tuple[str, dict, dict]) -> dict[str, Any]:
    url, task, header = args
    count, errors = 0, []
    with storage.open_write(url, tag="export") as f:
        sink = _Hashing(f)
        with wds.TarWriter(sink, encoder=False, mtime=0, format=tarfile.USTAR_FORMAT) as tar:
            samples = _selection_samples(task["rows"], header, errors) if "rows" in task else \
                _source_samples(task["units"], header, errors)  # fmt: skip
            for sample in samples:
                tar.write(sample)
                count += 1
    stats = {"name": storage.name(url), "count": count, "bytes": sink.bytes, "sha256": sink.sha.hexdigest(),
             "errors": errors}  # fmt: skip
    storage.write_json(url.removesuffix(".tar") + ".json", stats, tag="export")
    return stats


def _selection_samples(rows: list[dict], header: dict, errors: list) -> Any:
    by_unit: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        by_unit.setdefault((r["source"], r["unit"]), {})[r["key"]] = r
    k = topk_k(header["soft_labels"])
    for (source, unit), wanted in by_unit.items():
        found = {}
        try:
            for _, s in read_keys(_source(header["sources"][source]), {unit: set(wanted)}):
                found[s.key] = s
        except (UserError, OSError, ValueError) as e:
            for r in wanted.values():
                errors.append({"uid": r["uid"], "sample_id": r["sample_id"], "reason": f"source unreadable: {e}"})
            continue
        for key, r in wanted.items():
            s = found.get(key)
            reason = None if s is not None else "not found in its source"
            if s is not None and content_hash(s.data) != r["content_hash"]:
                reason = "changed since it was scored"
            if reason is None:
                try:
                    ext, data = image_bytes(s.data, image=header["image"], view=header["input"])
                except DecodeError as e:
                    reason = f"not a readable image: {e}"
            if reason:
                errors.append({"uid": r["uid"], "sample_id": r["sample_id"], "reason": reason})
                continue
            sample = {"__key__": f"{r['uid'] & 0xFFFFFFFFFFFFFFFF:016x}", ext: data}
            meta = {"uid": r["uid"], "sample_id": r["sample_id"], "source": source, "pred": r["pred"],
                    "weight": r["weight"], "scores": {c: r[c] for c in header["scores"]}}  # fmt: skip
            if r.get("meta"):
                meta["meta"] = json.loads(r["meta"])
            if r.get("logits") is not None:
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
            sample["json"] = json.dumps(meta, ensure_ascii=False).encode()
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
                ext, data = image_bytes(s.data, validate=True, image=header["image"], view=header["input"])
            except DecodeError as e:
                errors.append({"uid": uid, "sample_id": sample_id, "reason": f"not a readable image: {e}"})
                continue
            sample = {"__key__": f"{uid & 0xFFFFFFFFFFFFFFFF:016x}", ext: data}
            if s.label is not None:
                sample["cls"] = str(int(s.label)).encode()
            meta = {"uid": uid, "sample_id": sample_id, "source": src.name, "weight": 1.0}
            if s.meta:
                meta["meta"] = s.meta
            sample["json"] = json.dumps(meta, ensure_ascii=False, default=str).encode()
            yield sample


def image_bytes(data: bytes | np.ndarray, validate: bool = False, image: dict[str, Any] | None = None,
                view: dict[str, Any] | None = None) -> tuple[str, bytes]:  # fmt: skip
    """(extension, bytes): the original encoding when it is PNG, JPEG or WebP; otherwise a lossless PNG that
    decodes (kdcore.view) to exactly the pixels the original does: first frame, EXIF orientation applied,
    transparency kept, modes PNG cannot hold brought to the 8-bit form the view makes of them. `validate`
    decodes kept files too (bytes never scored: a truncated file is refused here, not in training).

    `image` (manifest.json's): format jpg|png|webp re-encodes every image in that format (jpg: L or RGB, alpha
    composited on black as the view does; webp keeps alpha); size `view` first makes the image exactly what the
    teacher sees (`view`: the input preprocessing), so a png at view size holds the teacher's pixels."""
    image = image or DEFAULT_IMAGE
    if image["format"] != "keep" or image["size"] != "original":
        return _reencode(data, image, view)
    if isinstance(data, bytes):
        fmt = _probe_format(data)
        if fmt in KEEP_FORMATS and not validate:
            return KEEP_FORMATS[fmt], data
        img, _ = open_image(data)  # first frame, orientation applied, bombs and corrupt files refused
        if fmt in KEEP_FORMATS:
            return KEEP_FORMATS[fmt], data
        if img.mode not in PNG_MODES:
            grey = img.mode in ("I", "F") or img.mode.startswith("I;16")
            img = to_mode(img, 1 if grey else 3)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return "png", buf.getvalue()
    arr = np.asarray(data)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return "png", buf.getvalue()


def _probe_format(data: bytes) -> str | None:
    """The encoded file's format as Pillow names it (header only); a DecodeError when it is no image."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            return probe.format
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"not an image: {e}") from None


def _reencode(data: bytes | np.ndarray, image: dict[str, Any], view: dict[str, Any] | None) -> tuple[str, bytes]:
    source_format = _probe_format(data) if isinstance(data, bytes) else None
    if image["size"] == "view":
        if view is None:
            raise UserError("--image-size view needs the teacher's input preprocessing; none is known")
        pixels, _, _ = to_pixels(data, InputSpec.from_dict(view))
        img = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    elif isinstance(data, bytes):
        img, _ = open_image(data)
    else:
        arr = np.asarray(data)
        img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    ext = image["format"] if image["format"] != "keep" else KEEP_FORMATS.get(source_format or "", "png")
    grey = img.mode in ("1", "L", "LA", "I", "F") or img.mode.startswith("I;16")
    alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if ext == "jpg" or (ext == "webp" and not alpha):
        img = to_mode(img, 1 if grey else 3)
    elif ext == "webp":
        img = img.convert("RGBA")
    elif img.mode not in PNG_MODES:
        img = to_mode(img, 1 if grey else 3)
    buf = io.BytesIO()
    try:
        if ext == "png":
            img.save(buf, format="PNG")
        else:
            img.save(buf, format=SAVE_FORMATS[ext], quality=image["quality"])
    except (OSError, ValueError) as e:
        raise DecodeError(f"cannot encode as {ext}: {e}") from None
    return ext, buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def read_manifest(out: str) -> dict[str, Any]:
    return storage.read_json(storage.join(out, "manifest.json"), "manifest.json")
