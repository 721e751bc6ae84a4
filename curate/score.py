"""Stage 1: run the teacher over image sources and write a pool (design §4–§5, §8).

Units stream through a DataLoader: workers read and decode one unit at a time into uint8 batches;
the main process normalises on the device, runs one forward pass under inference_mode with hooks
that yield every score and the embedding, and writes each unit atomically when its last batch is
scored. Memory stays flat in the pool size; a rerun skips units whose marker exists.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curate import progress
from curate.decode import DEFAULT_MAX_PIXELS, DecodeError, pixels_from_array, pixels_from_bytes
from curate.errors import UserError
from curate.pool import ERROR_SCHEMA, SCHEMA_VERSION, Pool, sample_schema
from curate.scores import DIRECTION, SCORES, ScoringModel, logit_scores, odin_score
from curate.sources import RawSample, ReadError, Source, Unit, content_hash, parse_source, uid_of
from distill import models

ARRAY_KINDS = ("idx", "npy", "synthetic", "builtin")


@dataclass
class ScoreConfig:
    teacher: str
    sources: list[str]
    pool: str
    batch_size: int = 256
    workers: int = -1  # -1: auto (0 when no source needs decoding, else cores - 1)
    device: str = "auto"
    logits: str = "full"  # full | topk:K
    embed_layer: str = "auto"
    max_error_rate: float = 0.01
    overwrite: bool = False
    odin: bool = False
    odin_temperature: float = 1000.0
    odin_eps: float = 0.0014
    max_pixels: int = DEFAULT_MAX_PIXELS
    retries: int = 2  # a unit whose reading fails is tried again this many times
    engine: str = "local"  # local | ray
    ray_address: str | None = None  # None: start a local Ray instance
    show_progress: bool = True


@dataclass
class SourceStats:
    units: int = 0
    units_skipped: int = 0
    rows: int = 0
    errors: int = 0
    seconds: float = 0.0


@dataclass
class ScoreResult:
    pool: str
    per_source: dict[str, SourceStats] = field(default_factory=dict)
    seconds: float = 0.0
    error_rate: float = 0.0
    error_rate_exceeded: bool = False
    failed_units: list[tuple[str, str, str]] = field(default_factory=list)  # (source, unit, reason)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.per_source.values())


# --------------------------------------------------------------------------------------- the loader


class UnitBatches(IterableDataset):
    """Yields per unit a sequence of batches: dicts with uint8 pixels (B, C, S, S), per-sample
    metadata, the unit's errors so far, and `last` on the unit's final batch (possibly empty).

    A unit whose reading raises is read again from its start, up to `retries` more times: a
    `reset` batch first tells the consumer to drop what it holds of the unit. When every try
    failed, the unit's final batch carries `failed` (the reason) instead of rows."""

    def __init__(
        self,
        sources: dict[str, Source],
        units: list[Unit],
        spec: models.InputSpec,
        batch_size: int,
        max_pixels: int,
        retries: int = 0,
    ) -> None:
        self.sources, self.units, self.spec = sources, units, spec
        self.batch_size, self.max_pixels, self.retries = batch_size, max_pixels, retries

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        indices = range(len(self.units))
        if info is not None:
            indices = indices[info.id :: info.num_workers]
        for i in indices:
            yield from self._unit(i, self.units[i])

    def _unit(self, index: int, unit: Unit) -> Iterator[dict[str, Any]]:
        for attempt in range(self.retries + 1):
            try:
                yield from self.read(index, unit)
                return
            except Exception as e:  # noqa: BLE001 - a broken unit is retried, then reported, never a dead run
                reason = failure_reason(e)
                if attempt < self.retries:
                    yield {"unit": index, "reset": True, "keys": [], "errors": [], "last": False}
        yield {"unit": index, "failed": reason, "keys": [], "errors": [], "last": True}

    def read(self, index: int, unit: Unit) -> Iterator[dict[str, Any]]:
        """One try at a unit: its batches, the last one marked; raises when reading fails."""
        batch: list[tuple] = []
        errors: list[tuple[str, str]] = []
        for item in self.sources[unit.source].read(unit):
            if isinstance(item, ReadError):
                errors.append((item.key, item.reason))
                continue
            try:
                batch.append(self._decode(item))
            except DecodeError as e:
                errors.append((item.key, str(e)))
            if len(batch) == self.batch_size:
                yield self._pack(index, batch, errors, last=False)
                batch, errors = [], []
        yield self._pack(index, batch, errors, last=True)

    def _decode(self, s: RawSample) -> tuple:
        if isinstance(s.data, bytes):
            px, w, h = pixels_from_bytes(s.data, self.spec, self.max_pixels)
        else:
            px, w, h = pixels_from_array(s.data, self.spec)
        return px, s.key, s.label, content_hash(s.data), w, h

    def _pack(self, index: int, batch: list[tuple], errors: list, last: bool) -> dict[str, Any]:
        s = self.spec
        pixels = np.stack([b[0] for b in batch]) if batch else np.zeros((0, s.channels, s.size, s.size), np.uint8)
        return {
            "unit": index,
            "last": last,
            "pixels": pixels,
            "keys": [b[1] for b in batch],
            "labels": [b[2] for b in batch],
            "hashes": [b[3] for b in batch],
            "sizes": [(b[4], b[5]) for b in batch],
            "errors": errors,
        }


def failure_reason(e: BaseException) -> str:
    return f"reading the unit failed: {type(e).__name__}: {str(e)[:200]}"


# ------------------------------------------------------------------------------------------ scoring


class UnitRows:
    """Scored columns of one unit, gathered batch by batch."""

    def __init__(self) -> None:
        self.meta: dict[str, list] = {"keys": [], "labels": [], "hashes": [], "sizes": []}
        self.arrays: dict[str, list[np.ndarray]] = {}
        self.errors: list[tuple[str, str]] = []
        self.started = time.perf_counter()

    def add(self, chunk: dict[str, Any], columns: dict[str, np.ndarray]) -> None:
        for k in self.meta:
            self.meta[k].extend(chunk[k])
        for k, v in columns.items():
            self.arrays.setdefault(k, []).append(v)

    def table(self, source: str, unit: str, schema: pa.Schema) -> pa.Table:
        keys = self.meta["keys"]
        sample_ids = [f"{source}/{k}" for k in keys]
        cols: dict[str, pa.Array] = {
            "uid": pa.array([uid_of(s) for s in sample_ids], pa.int64()),
            "sample_id": pa.array(sample_ids, pa.string()),
            "key": pa.array(keys, pa.string()),
            "unit": pa.array([unit] * len(keys), pa.string()),
            "content_hash": pa.array(self.meta["hashes"], pa.string()),
            "width": pa.array([w for w, _ in self.meta["sizes"]], pa.int32()),
            "height": pa.array([h for _, h in self.meta["sizes"]], pa.int32()),
            "label": pa.array(self.meta["labels"], pa.int16()),
        }
        for f in schema:
            if f.name in cols:
                continue
            parts = self.arrays.get(f.name)
            if parts is None:
                cols[f.name] = pa.nulls(len(keys), f.type)
                continue
            values = np.concatenate(parts) if parts else np.zeros((0,), np.float32)
            if pa.types.is_fixed_size_list(f.type):
                width = f.type.list_size
                flat = pa.array(values.reshape(-1).astype(f.type.value_type.to_pandas_dtype()), f.type.value_type)
                cols[f.name] = pa.FixedSizeListArray.from_arrays(flat, width)
            else:
                cols[f.name] = pa.array(values.astype(f.type.to_pandas_dtype()), f.type)
        return pa.table([cols[f.name] for f in schema], schema=schema)

    def error_table(self, source: str, unit: str) -> pa.Table:
        ids = [f"{source}/{k}" for k, _ in self.errors]
        return pa.table(
            {
                "uid": pa.array([uid_of(s) for s in ids], pa.int64()),
                "sample_id": ids,
                "key": [k for k, _ in self.errors],
                "unit": [unit] * len(ids),
                "reason": [r for _, r in self.errors],
            },
            schema=ERROR_SCHEMA,
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown --device {device!r}; use auto, cpu or cuda") from None


def parse_logits(spec: str, num_classes: int) -> str:
    if spec == "full":
        return "full"
    if spec.startswith("topk:") and spec[5:].isdigit() and 0 < int(spec[5:]) <= num_classes:
        return f"topk:{int(spec[5:])}"
    raise UserError(f"--logits must be full or topk:K with 0 < K <= {num_classes}, got {spec!r}")


class TeacherRunner:
    """The teacher on its device with the scoring hooks: uint8 pixels in, the pool's columns out.
    Both engines run units through it (the Ray engine in one actor per GPU)."""

    def __init__(self, cfg: ScoreConfig) -> None:
        try:
            self.teacher = models.load(cfg.teacher)
            self.scorer = ScoringModel(self.teacher.model, cfg.embed_layer, self.teacher.scripted)
        except (models.SpecError, ValueError) as e:
            raise UserError(str(e)) from None
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        spec = self.spec = self.teacher.input
        self.logits_kind = parse_logits(cfg.logits, len(self.teacher.classes))
        model = self.teacher.model.to(self.device)
        if self.device.type == "cuda" or not self.teacher.scripted:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.mean = torch.tensor(spec.mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, device=self.device).view(1, -1, 1, 1)
        self.use_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        with torch.inference_mode():
            probe = self.scorer(torch.zeros(2, spec.channels, spec.size, spec.size, device=self.device))
        self.embed_dim = probe.embedding.shape[1]
        self.schema = sample_schema(len(self.teacher.classes), self.embed_dim, self.logits_kind, cfg.odin)

    def add(self, rows: UnitRows, chunk: dict[str, Any]) -> int:
        """Score one batch of a unit into `rows`; returns the number of samples scored."""
        rows.errors.extend(chunk["errors"])
        n = len(chunk["keys"])
        if n:
            x = torch.as_tensor(chunk["pixels"]).to(self.device, non_blocking=True)
            x = x.float().div_(255).sub_(self.mean).div_(self.std).contiguous(memory_format=torch.channels_last)
            rows.add(chunk, _forward(self.scorer, self.model, x, self.logits_kind, self.cfg, self.use_bf16))
        return n

    def close(self) -> None:
        self.scorer.close()


ENGINES = ("local", "ray")


def score(cfg: ScoreConfig) -> ScoreResult:
    """Score every unit of every source not yet done into the pool at cfg.pool."""
    t0 = time.perf_counter()
    if not cfg.sources:
        raise UserError("no --source given; e.g. --source photos=folder:/data/photos")
    if cfg.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if cfg.retries < 0:
        raise UserError("--retries must be 0 or more")
    if cfg.engine not in ENGINES:
        raise UserError(f"unknown --engine {cfg.engine!r}; use {' or '.join(ENGINES)}")
    sources = {}
    for spec in cfg.sources:
        src = parse_source(spec)
        if src.name in sources:
            raise UserError(f"source name {src.name!r} given twice")
        sources[src.name] = src
    runner = TeacherRunner(cfg)

    pool = Pool(cfg.pool)
    units_by_source = {name: src.units() for name, src in sources.items()}
    _prepare_pool(pool, cfg, runner.teacher, sources, runner.logits_kind, runner.embed_dim, runner.scorer.has_bn)

    todo: list[Unit] = []
    result = ScoreResult(pool=str(pool.root))
    for name, units in units_by_source.items():
        done = pool.done_units(name)
        st = result.per_source.setdefault(name, SourceStats())
        st.units = len(units)
        st.units_skipped = sum(u.id in done for u in units)
        todo.extend(u for u in units if u.id not in done)

    if cfg.engine == "ray":
        runner.close()
        from curate.score_ray import run_ray

        run_ray(cfg, todo, runner.spec, result)
    else:
        _run_local(cfg, sources, todo, runner, pool, result)
        runner.close()

    total_rows = total_errors = 0
    for m in pool.markers():
        if m["source"] in sources:
            total_rows += m["rows"]
            total_errors += m["errors"]
    sizes = {(u.source, u.id): u.size or 1 for u in todo}
    total_errors += sum(sizes.get((src, unit), 1) for src, unit, _ in result.failed_units)
    result.error_rate = total_errors / max(1, total_rows + total_errors)
    result.error_rate_exceeded = result.error_rate > cfg.max_error_rate
    result.seconds = time.perf_counter() - t0
    return result


def _run_local(
    cfg: ScoreConfig,
    sources: dict[str, Source],
    todo: list[Unit],
    runner: TeacherRunner,
    pool: Pool,
    result: ScoreResult,
) -> None:
    """DataLoader workers read and decode units; this process scores and writes them."""
    device = runner.device
    workers = cfg.workers
    if workers < 0:
        all_arrays = all(sources[u.source].kind in ARRAY_KINDS for u in todo)
        workers = 0 if all_arrays and device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))
    dataset = UnitBatches(sources, todo, runner.spec, cfg.batch_size, cfg.max_pixels, cfg.retries)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    total = sum(u.size or 0 for u in todo) or None
    pending: dict[int, UnitRows] = {}
    with progress.bar("scoring", total=total, enabled=cfg.show_progress) as advance:
        for chunk in loader:
            i = chunk["unit"]
            if chunk.get("reset"):  # the unit is being read again from its start
                pending.pop(i, None)
                continue
            rows = pending.setdefault(i, UnitRows())
            advance(runner.add(rows, chunk) + len(chunk["errors"]))
            if chunk["last"]:
                rows = pending.pop(i)
                if "failed" in chunk:
                    fail_unit(pool, todo[i], chunk["failed"], result)
                else:
                    stats = write_unit(pool, todo[i], rows, runner.schema, runner.teacher.fingerprint)
                    account(result, todo[i].source, stats)


def _forward(
    scorer: ScoringModel, model: torch.nn.Module, x: torch.Tensor, logits_kind: str, cfg: ScoreConfig, use_bf16: bool
) -> dict[str, np.ndarray]:
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=use_bf16):
        out = scorer(x)
        cols = dict(logit_scores(out.logits))
        if logits_kind == "full":
            cols["logits"] = out.logits
        else:
            k = int(logits_kind.split(":")[1])
            top = out.logits.topk(k, dim=1)
            cols["topk_idx"], cols["topk_val"] = top.indices, top.values
            cols["logsumexp"] = cols["energy"]
        cols["embedding"] = out.embedding
        for name in ("bn_score", "feat_norm", "proj_score"):
            value = getattr(out, name)
            if value is not None:
                cols[name] = value
    if cfg.odin:
        cols["odin"] = odin_score(model, x, cfg.odin_temperature, cfg.odin_eps)
    return {k: v.detach().float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy() for k, v in cols.items()}


def write_unit(pool: Pool, unit: Unit, rows: UnitRows, schema: pa.Schema, teacher_sha: str) -> dict[str, Any]:
    """The unit's parts, then its marker; returns the marker's stats."""
    samples = rows.table(unit.source, unit.id, schema)
    errors = rows.error_table(unit.source, unit.id)
    stats = {
        "unit": unit.id,
        "rows": samples.num_rows,
        "errors": errors.num_rows,
        "seconds": round(time.perf_counter() - rows.started, 4),
        "teacher_sha256": teacher_sha,
        "first_key": samples.column("key")[0].as_py() if samples.num_rows else None,
        "last_key": samples.column("key")[-1].as_py() if samples.num_rows else None,
    }
    pool.write_unit(unit.source, unit.id, samples, errors, stats)
    return stats


def account(result: ScoreResult, source: str, stats: dict[str, Any]) -> None:
    st = result.per_source[source]
    st.rows += stats["rows"]
    st.errors += stats["errors"]
    st.seconds += stats["seconds"]


def fail_unit(pool: Pool, unit: Unit, reason: str, result: ScoreResult) -> None:
    """A unit that failed every try: an errors/ row with the reason and no marker, so a rerun tries it again."""
    rows = UnitRows()
    rows.errors.append((f"<unit {unit.id}>", reason))
    pool.write_failed(unit.source, unit.id, rows.error_table(unit.source, unit.id))
    result.failed_units.append((unit.source, unit.id, reason))


def _prepare_pool(
    pool: Pool,
    cfg: ScoreConfig,
    teacher: models.LoadedModel,
    sources: dict[str, Source],
    logits_kind: str,
    embed_dim: int,
    has_bn: bool,
) -> None:
    """Create pool.json, or check that an existing pool was scored the same way."""
    settings = {
        "teacher_sha256": teacher.fingerprint,
        "input": teacher.input.to_dict(),
        "logits": logits_kind,
        "embed_layer": cfg.embed_layer,
        "odin": cfg.odin,
    }
    if pool.exists() and cfg.overwrite:
        pool.wipe()
    if pool.exists():
        meta = pool.meta()
        old = meta.get("settings", {})
        for k, v in settings.items():
            if old.get(k) != v:
                raise UserError(
                    f"pool {pool.root} was scored with another {k} ({old.get(k)!r:.80} vs {v!r:.80}); "
                    "score into a new --pool, or pass --overwrite to discard it"
                )
        for name, src in sources.items():
            prev = meta["sources"].get(name)
            if prev and prev["spec"] != src.spec:
                raise UserError(
                    f"pool {pool.root} already has a source {name!r} from {prev['spec']!r}; give this one another name"
                )
        pool.clean_partial()
    else:
        meta = {
            "schema_version": SCHEMA_VERSION,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": settings,
            "teacher": teacher.describe(),
            "classes": teacher.classes,
            "input": teacher.input.to_dict(),
            "logits": {
                "kind": logits_kind.split(":")[0],
                "k": int(logits_kind.split(":")[1]) if ":" in logits_kind else len(teacher.classes),
            },
            "scores": {
                name: {"definition": d, "direction": DIRECTION}
                for name, d in SCORES.items()
                if name != "odin" or cfg.odin
            },
            "bn_score_available": has_bn,
            "embedding": {
                "layer": cfg.embed_layer if cfg.embed_layer != "auto" else "input of the final linear layer",
                "dim": embed_dim,
            },
            "label": "true label (index into the source's classes) where the source has one, else null",
            "uid": "first 8 bytes of blake2b(sample_id), big-endian, signed int64",
            "content_hash": "blake2b-128 of the raw bytes (encoded file, or the record's array bytes), hex",
            "sources": {},
        }
    for name, src in sources.items():
        meta["sources"][name] = {"spec": src.spec, "kind": src.kind, "classes": src.classes}
    pool.write_meta(meta)
