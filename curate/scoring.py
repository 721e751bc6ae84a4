"""The scoring core both engines run (the local engine in curate/score.py, the Ray engine in
curate/score_ray.py): read and decode a unit into uint8 batches, score the batches with the teacher,
write the unit's parts and its completion record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from curate.config import ScoreConfig, parse_memory
from curate.pool import Pool, error_schema, sample_schema
from curate.scores import SCORES
from curate.sources import RawSample, ReadError, Source, Unit, content_hash, uid_of
from curate.teacher import ScoringModel, logit_scores, odin_score
from kdcore import models
from kdcore.errors import UserError
from kdcore.specs import parse_topk, topk_k
from kdcore.tensors import Normalize, resolve_device
from kdcore.view import DecodeError, InputSpec, to_pixels


@dataclass
class SourceStats:
    units: int = 0
    units_skipped: int = 0
    units_changed: int = 0  # done before, but the source's content changed: rescored
    units_removed: int = 0  # gone from the source: their rows removed
    skipped: list[str] = field(default_factory=list)  # listing entries passed over (not regular files)
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
    batch_size: int = 0  # samples per forward pass, as given or chosen
    batch_note: str = ""  # how it was chosen

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.per_source.values())


# --------------------------------------------------------------------------------------- reading


class UnitBatches(IterableDataset):
    """Yields per unit a sequence of batches: dicts with uint8 pixels (B, C, S, S), per-sample
    metadata, the unit's errors so far, and `last` on the unit's final batch (possibly empty).

    A unit whose reading raises is read again from its start, up to `retries` more times: a
    `reset` batch first tells the consumer to drop what it holds of the unit. When every try
    failed, the unit's final batch carries `failed` (the reason) instead of rows."""

    def __init__(self, sources: dict[str, Source], units: list[Unit], spec: InputSpec, batch_size: int,
                 max_pixels: int, retries: int = 0) -> None:  # fmt: skip
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
        seen: set[str] = set()
        for item in self.sources[unit.source].read(unit):
            if isinstance(item, ReadError):
                errors.append((item.key, item.reason))
                continue
            if item.key in seen:  # one row per sample id, whatever the source holds
                errors.append((item.key, "duplicate key in the unit (its first sample was kept)"))
                continue
            seen.add(item.key)
            try:
                batch.append(self._decode(item))
            except DecodeError as e:
                errors.append((item.key, str(e)))
            if len(batch) == self.batch_size:
                yield self._pack(index, batch, errors, last=False)
                batch, errors = [], []
        yield self._pack(index, batch, errors, last=True)

    def _decode(self, s: RawSample) -> tuple:
        px, w, h = to_pixels(s.data, self.spec, self.max_pixels)
        meta = json.dumps(s.meta, default=str, ensure_ascii=False) if s.meta else None
        return px, s.key, s.label, content_hash(s.data), w, h, meta

    def _pack(self, index: int, batch: list[tuple], errors: list, last: bool) -> dict[str, Any]:
        s = self.spec
        pixels = np.stack([b[0] for b in batch]) if batch else np.zeros((0, s.channels, s.size, s.size), np.uint8)
        return {"unit": index, "last": last, "pixels": pixels, "keys": [b[1] for b in batch],
                "labels": [b[2] for b in batch], "hashes": [b[3] for b in batch],
                "sizes": [(b[4], b[5]) for b in batch], "metas": [b[6] for b in batch], "errors": errors}  # fmt: skip


def failure_reason(e: BaseException) -> str:
    return f"reading the unit failed: {type(e).__name__}: {str(e)[:200]}"


# --------------------------------------------------------------------------------------- scoring


class UnitRows:
    """Scored columns of one unit, gathered batch by batch."""

    META = ("keys", "labels", "hashes", "sizes", "metas")

    def __init__(self) -> None:
        self.meta: dict[str, list] = {k: [] for k in self.META}
        self.arrays: dict[str, list[np.ndarray]] = {}
        self.errors: list[tuple[str, str]] = []
        self.started = time.perf_counter()

    def add(self, chunk: dict[str, Any], columns: dict[str, np.ndarray]) -> None:
        for k in self.META:
            self.meta[k].extend(chunk[k])
        for k, v in columns.items():
            self.arrays.setdefault(k, []).append(v)

    def table(self, source: str, unit: str, schema: pa.Schema) -> pa.Table:
        keys = self.meta["keys"]
        sample_ids = [f"{source}/{k}" for k in keys]
        cols: dict[str, pa.Array] = {
            "uid": pa.array([uid_of(s) for s in sample_ids], pa.int64()),
            "sample_id": pa.array(sample_ids, pa.string()),
            "source": pa.array([source] * len(keys), pa.string()),
            "key": pa.array(keys, pa.string()),
            "unit": pa.array([unit] * len(keys), pa.string()),
            "content_hash": pa.array(self.meta["hashes"], pa.string()),
            "width": pa.array([w for w, _ in self.meta["sizes"]], pa.int32()),
            "height": pa.array([h for _, h in self.meta["sizes"]], pa.int32()),
            "label": pa.array(self.meta["labels"], pa.int16()),
            "meta": pa.array(self.meta["metas"], pa.string()),
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
                flat = pa.array(values.reshape(-1).astype(f.type.value_type.to_pandas_dtype()), f.type.value_type)
                cols[f.name] = pa.FixedSizeListArray.from_arrays(flat, f.type.list_size)
            else:
                cols[f.name] = pa.array(values.astype(f.type.to_pandas_dtype()), f.type)
        return pa.table([cols[f.name] for f in schema], schema=schema)

    def error_table(self, source: str, unit: str) -> pa.Table:
        ids = [f"{source}/{k}" for k, _ in self.errors]
        return pa.table({"uid": pa.array([uid_of(s) for s in ids], pa.int64()), "sample_id": ids,
                         "source": [source] * len(ids), "key": [k for k, _ in self.errors], "unit": [unit] * len(ids),
                         "reason": [r for _, r in self.errors]}, schema=error_schema())  # fmt: skip


AUTO_BATCH_MAX = 256  # the default batch's ceiling: larger brings little on a CPU and risks memory


def bytes_per_sample(input_elems: int, largest: int, workers: int) -> int:
    """Memory one sample of a batch takes in flight: its float32 input and normalised copy, about three live
    activations of the teacher's largest layer output, and its uint8 pixels in the batches the decode
    workers queue (4 each) and this process holds (2)."""
    return 4 * (2 * input_elems + 3 * largest) + input_elems * (2 + 4 * workers)


@contextmanager
def activation_sizes(model: torch.nn.Module) -> Iterator[list[int]]:
    """Collects, during the forward passes of the block, every module output's elements per sample."""
    sizes: list[int] = []

    def hook(_module: Any, _inputs: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.dim() > 0 and out.shape[0]:
            sizes.append(out.numel() // out.shape[0])

    handles = []
    with suppress(AttributeError, RuntimeError):  # a scripted module takes no Python hooks
        handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        yield sizes
    finally:
        for h in handles:
            h.remove()


class TeacherRunner:
    """The teacher on its device with the scoring hooks: uint8 pixels in, the pool's columns out.
    Both engines run units through it (the Ray engine in one actor per GPU)."""

    def __init__(self, cfg: ScoreConfig) -> None:
        self.teacher = models.load(cfg.teacher)
        try:
            self.scorer = ScoringModel(self.teacher.model, cfg.embed_layer, self.teacher.scripted)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.spec = self.teacher.input
        self.logits_kind = parse_topk(cfg.logits, len(self.teacher.classes), "--logits")
        model = self.teacher.model.to(self.device)
        if self.device.type == "cuda" or not self.teacher.scripted:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.normalize = Normalize(self.spec, self.device)
        self.use_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        with torch.inference_mode(), activation_sizes(self.teacher.model) as sizes:
            probe = self.scorer(self.normalize(torch.zeros(2, self.spec.channels, self.spec.size, self.spec.size)))
        self.input_elems = self.spec.channels * self.spec.size * self.spec.size
        self.largest_activation = max(sizes, default=0) or 8 * self.input_elems  # scripted models: no hooks
        self.embed_dim = probe.embedding.shape[1]
        logit_scores_ = [s.name for s in SCORES.values() if s.origin == "logits"]
        self.available = logit_scores_ + sorted(probe.hook_scores) + (["odin"] if cfg.odin else [])
        self.schema = sample_schema(len(self.teacher.classes), self.embed_dim, self.logits_kind, cfg.odin,
                                    self.scorer.bn_count)  # fmt: skip

    def choose_batch(self, units: list[Unit], workers: int) -> tuple[int, str]:
        """--batch-size, or the largest power of two up to AUTO_BATCH_MAX whose batches in flight fit --memory;
        never more than the largest unit holds (a batch never spans units). Returns (batch, how)."""
        biggest = max((u.size or 0 for u in units), default=0)
        known = bool(units) and all(u.size for u in units)
        if self.cfg.batch_size is not None:
            if known and self.cfg.batch_size > biggest:
                return biggest, f"--batch-size {self.cfg.batch_size:,} clamped to the largest unit"
            return self.cfg.batch_size, "--batch-size"
        budget = parse_memory(self.cfg.memory)
        per_sample = bytes_per_sample(self.input_elems, self.largest_activation, workers)
        fits = max(1, budget // per_sample)
        batch = min(AUTO_BATCH_MAX, 1 << (fits.bit_length() - 1))
        if known:
            batch = min(batch, biggest)
        return batch, f"auto: {per_sample / 2**20:.2f} MiB a sample in flight, --memory {self.cfg.memory}"

    def add(self, rows: UnitRows, chunk: dict[str, Any]) -> int:
        """Score one batch of a unit into `rows`; returns the number of samples scored."""
        rows.errors.extend(chunk["errors"])
        n = len(chunk["keys"])
        if n:
            rows.add(chunk, self.forward(self.normalize(torch.as_tensor(chunk["pixels"]))))
        return n

    def forward(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """The pool's columns for one normalised batch: logits (or top-K), pred, every score, embedding."""
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.use_bf16):
            out = self.scorer(x)
            cols = {**logit_scores(out.logits), **out.hook_scores}
            k = topk_k(self.logits_kind)
            if k is None:
                cols["logits"] = out.logits
            else:
                top = out.logits.topk(k, dim=1)
                cols["topk_idx"], cols["topk_val"], cols["logsumexp"] = top.indices, top.values, cols["energy"]
            cols["embedding"] = out.embedding
            if out.bn_layers is not None:
                cols["bn_layers"] = out.bn_layers
        if self.cfg.odin:
            cols["odin"] = odin_score(self.model, x, self.cfg.odin_temperature, self.cfg.odin_eps)
        return {k: v.detach().float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
                for k, v in cols.items()}  # fmt: skip

    def close(self) -> None:
        self.scorer.close()


# --------------------------------------------------------------------------------------- writing


def write_unit(pool: Pool, unit: Unit, rows: UnitRows, schema: pa.Schema, teacher_sha: str) -> dict[str, Any]:
    """The unit's parts, then its completion record; returns the record's stats."""
    samples = rows.table(unit.source, unit.id, schema)
    errors = rows.error_table(unit.source, unit.id)
    stats = {
        "unit": unit.id,
        "rows": samples.num_rows,
        "errors": errors.num_rows,
        "seconds": round(time.perf_counter() - rows.started, 4),
        "teacher_sha256": teacher_sha,
        "fingerprint": unit.fingerprint,
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
    """A unit that failed every try: an errors/ row with the reason and no record, so a rerun tries it again."""
    rows = UnitRows()
    rows.errors.append((f"<unit {unit.id}>", reason))
    pool.write_failed(unit.source, unit.id, rows.error_table(unit.source, unit.id))
    result.failed_units.append((unit.source, unit.id, reason))
