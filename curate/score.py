"""Stage 1: `curate score`: run the teacher over image sources and write a pool (design §4–§5, §8).

Units stream through a DataLoader: workers read and decode one unit at a time into uint8 batches;
this process normalises on the device, runs one forward pass under inference_mode with hooks that
yield every score and the embedding, and writes each unit atomically when its last batch is scored.
Memory stays flat in the pool size. A rerun skips complete units whose content is unchanged, rescores
the units whose content changed (a file added, removed, rewritten) and drops the units the source no
longer has, so the pool holds exactly one row per sample the sources hold now.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import replace

from torch.utils.data import DataLoader

from curate.config import ScoreConfig
from curate.pool import SCHEMA_VERSION, Pool
from curate.query import store_derived
from curate.scores import DIRECTION, SCORES, score_names
from curate.scoring import (
    ScoreResult,
    SourceStats,
    TeacherRunner,
    UnitBatches,
    UnitRows,
    account,
    fail_unit,
    write_unit,
)
from curate.sources import Source, Unit, parse_sources
from kdcore import models, progress, storage
from kdcore.errors import UserError

ARRAY_KINDS = ("idx", "npy", "synthetic", "builtin")
PUBLISH_EVERY = 60.0  # seconds between snapshots while scoring (one listing of the pool each)


def score(cfg: ScoreConfig) -> ScoreResult:
    """Score every unit of every source not yet done (or changed since) into the pool at cfg.pool."""
    t0 = time.perf_counter()
    cfg.pool = storage.target(cfg.pool, "--pool")
    if not cfg.sources:
        raise UserError("no --source given; e.g. --source photos=folder:/data/photos")
    storage.check_writable(cfg.pool, "--pool")
    sources = parse_sources(cfg.sources)
    runner = TeacherRunner(cfg)
    pool = Pool(cfg.pool)
    if storage.exists(cfg.pool) and not storage.isdir(cfg.pool):
        raise UserError(f"--pool {cfg.pool} is a file; give a directory (created when missing)")
    units_by_source = {name: src.units() for name, src in sources.items()}  # bad sources fail before any write
    if not any(units_by_source.values()):
        raise UserError("the sources hold no sample (empty folder, no matching file)")
    with pool.lock("score"):
        prepare_pool(pool, cfg, runner.teacher, sources, runner.logits_kind, runner.embed_dim, runner.scorer.has_bn,
                     runner.available)  # fmt: skip
        result = ScoreResult(pool=storage.redact(pool.root))
        todo = plan(pool, units_by_source, result, sources)
        workers = decode_workers(cfg, sources, todo, runner.device.type)
        result.batch_size, result.batch_note = runner.choose_batch(todo, workers if cfg.engine == "local" else 0)
        if cfg.engine == "ray":
            runner.close()
            from curate.score_ray import run_ray

            run_ray(replace(cfg, batch_size=result.batch_size), todo, runner.spec, result)
        else:
            run_local(cfg, sources, todo, runner, pool, result)
            runner.close()

        pool.publish()  # snapshot.json: what outside readers read
        store_derived(pool.root)  # bn_z, auto: once for this state of the pool, not in every query
        total_rows = total_errors = 0
        for r in pool.records():
            if r["source"] in sources:
                total_rows += r["rows"]
                total_errors += r["errors"]
    sizes = {(u.source, u.id): u.size or 1 for u in todo}
    for src, unit, _ in result.failed_units:  # a failed unit's samples are errors (its size, or 1 when unknown)
        result.per_source[src].errors += sizes.get((src, unit), 1)
        total_errors += sizes.get((src, unit), 1)
    result.error_rate = total_errors / max(1, total_rows + total_errors)
    result.error_rate_exceeded = result.error_rate > cfg.max_error_rate
    result.seconds = time.perf_counter() - t0
    return result


def plan(pool: Pool, units_by_source: dict[str, list[Unit]], result: ScoreResult,
         sources: dict[str, Source] | None = None) -> list[Unit]:  # fmt: skip
    """The units to score: not done, or done with another fingerprint (changed since). Units that are done
    but no longer in the source are dropped from the pool first."""
    todo: list[Unit] = []
    for name, units in units_by_source.items():
        done = pool.done_units(name)
        st = result.per_source.setdefault(name, SourceStats())
        st.units = len(units)
        current = {u.id for u in units}
        changed = {u.id for u in units if u.id in done and u.fingerprint != done[u.id].get("fingerprint")}
        gone = set(done) - current
        if changed or gone:
            with pool.lock("compact"):  # compact files holding these units are rewritten
                pool.drop_units(name, changed | gone)
        st.units_changed, st.units_removed = len(changed), len(gone)
        st.skipped = list(sources[name].skipped) if name in sources else []
        st.units_skipped = sum(u.id in done and u.id not in changed for u in units)
        todo.extend(u for u in units if u.id not in done or u.id in changed)
    return todo


def run_local(cfg: ScoreConfig, sources: dict[str, Source], todo: list[Unit], runner: TeacherRunner, pool: Pool,
              result: ScoreResult) -> None:  # fmt: skip
    """DataLoader workers read and decode units; this process scores and writes them."""
    device = runner.device
    workers = decode_workers(cfg, sources, todo, device.type)
    for src in sources.values():
        src.max_bytes = cfg.max_bytes
    dataset = UnitBatches(sources, todo, runner.spec, result.batch_size, cfg.max_pixels, cfg.retries)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None, persistent_workers=False)  # fmt: skip
    total = sum(u.size or 0 for u in todo) or None
    pending: dict[int, UnitRows] = {}
    published = time.monotonic()
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
                    if time.monotonic() - published > PUBLISH_EVERY:  # outside readers see the progress
                        pool.publish()
                        published = time.monotonic()


def decode_workers(cfg: ScoreConfig, sources: dict[str, Source], todo: list[Unit], device: str) -> int:
    """--workers, or: none for undecoded arrays on a CPU, else one per core but one (at most 8)."""
    if cfg.workers >= 0:
        return cfg.workers
    all_arrays = all(sources[u.source].kind in ARRAY_KINDS for u in todo)
    return 0 if all_arrays and device == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))


def prepare_pool(pool: Pool, cfg: ScoreConfig, teacher: models.LoadedModel, sources: dict[str, Source],
                 logits_kind: str, embed_dim: int, has_bn: bool, available: list[str]) -> None:  # fmt: skip
    """Create pool.json, or check that an existing pool was scored the same way. `available`: the scores this
    teacher gives (hook scores it cannot give are null)."""
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
                    f"pool {storage.redact(pool.root)} was scored with another {k} ({old.get(k)!r:.80} vs {v!r:.80});"
                    " score into a new --pool, or pass --overwrite to discard it"
                )
        for name, src in sources.items():
            prev = meta["sources"].get(name)
            if prev and prev["spec"] != storage.redact(src.spec):
                raise UserError(f"pool {storage.redact(pool.root)} already has a source {name!r} from "
                                f"{prev['spec']!r}; give this one another name")  # fmt: skip
        meta.setdefault("pool_id", pool.identity(meta))  # a pool written before ids records its derived one
        pool.clean_partial("score")
    else:
        k = int(logits_kind.split(":")[1]) if ":" in logits_kind else len(teacher.classes)
        meta = {
            "schema_version": SCHEMA_VERSION,
            "pool_id": uuid.uuid4().hex,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": settings,
            "teacher": teacher.describe(),
            "classes": teacher.classes,
            "input": teacher.input.to_dict(),
            "logits": {"kind": logits_kind.split(":")[0], "k": k},
            "scores": {n: {"definition": SCORES[n].definition, "direction": DIRECTION} for n in score_names(cfg.odin)},
            "bn_score_available": has_bn,
            "available_scores": available,
            "bn_layers": "per BatchNorm layer (model order, shallow to deep), the RMS over channels of z_c (bn_score "
            "is minus their mean); absent without BatchNorm",
            "embedding": {
                "dim": embed_dim,
                "layer": cfg.embed_layer if cfg.embed_layer != "auto" else "input of the final linear layer",
            },  # fmt: skip
            "label": "true label (index into the source's classes) where the source has one, else null",
            "meta": "source metadata as JSON text (wds .json/.txt members, parquet ?meta= columns), else null",
            "uid": "first 8 bytes of blake2b(sample_id), big-endian, signed int64",
            "content_hash": "blake2b-128 of the raw bytes (encoded file, or the record's array bytes), hex",
            "sources": {},
        }
    for name, src in sources.items():
        meta["sources"][name] = {"spec": storage.redact(src.spec), "kind": src.kind, "classes": src.classes}
    pool.write_meta(meta)
