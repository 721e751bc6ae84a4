"""`curate compact`: merge a pool's many small unit parts into large Parquet files, per source.

A pool scored from hundreds of thousands of units holds as many small files; every DuckDB scan then
opens each one. Compaction streams complete units' parts, in unit order, into compact-N.parquet files
of about `target_rows` rows (row groups of `row_group_rows`), and commits each with its manifest:

    1. samples/S/compact-N.parquet written whole     (not read yet: no manifest)
    2. units/S/compact-N.json (units, rows)           (the commit: `curate sql` switches to it)
    3. snapshot.json published                        (outside readers switch to it)
    4. the units' parts deleted                       (named by neither any more)

Completion records stay, so `curate score` still skips the units. A compaction killed anywhere leaves a
state readers handle (Pool.sample_files, snapshot.json); the next run publishes the snapshot, removes what
the killed one left and goes on. A glob of samples/ shows steps 1-4 as they happen (rows twice between 1
and 4): outside readers read the files snapshot.json lists.
It runs beside `curate score` (only complete units are merged); two compactions of one pool do not.
Error parts are left as they are (one per unit that had errors, usually few).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from curate.config import CompactConfig
from curate.parts import next_name, write_parts
from curate.pool import Pool
from curate.query import store_derived
from kdcore import progress, storage


@dataclass
class CompactResult:
    pool: str
    parts_before: int = 0
    files_after: int = 0
    units_merged: int = 0
    rows_merged: int = 0
    written: list[str] = field(default_factory=list)
    seconds: float = 0.0


def compact(cfg: CompactConfig) -> CompactResult:
    t0 = time.perf_counter()
    pool = Pool(cfg.pool)
    pool.meta()  # a clear error when this is not a pool
    result = CompactResult(pool=storage.redact(pool.root))
    with pool.lock("compact"):
        pool.clean_partial("compact")
        result.parts_before = len(pool.publish())  # before the tidying: no snapshot names what it removes
        plans = [(s, _tidy_and_plan(pool, s, cfg.target_rows)) for s in pool.sources_on_disk()]
        total = sum(rows for _, groups in plans for g in groups for _, rows in g) or None
        with progress.bar("compacting", total=total, enabled=cfg.show_progress) as advance:
            for source, groups in plans:
                for group in groups:
                    url = _write_group(pool, source, group, cfg.row_group_rows, advance)
                    result.written.append(storage.redact(url))
                    result.units_merged += len(group)
                    result.rows_merged += sum(rows for _, rows in group)
        result.files_after = len(pool.publish())
        store_derived(pool.root)  # aligned to the new files; auto_knn carried over (the same rows)
    result.seconds = time.perf_counter() - t0
    return result


def _tidy_and_plan(pool: Pool, source: str, target_rows: int) -> list[list[tuple[str, int]]]:
    """Remove what a killed compaction left (compact files without manifest, parts a manifest already
    holds, replaced compact files), then group the remaining complete parts into runs of about target_rows.
    The caller publishes the snapshot first: one written before a kill may still name what is removed here."""
    committed = pool.compacted(source)
    manifests = {storage.name(u) for u in storage.glob(pool.url("units", source, "compact-*.json"))}
    for url in storage.glob(storage.join(pool.samples_dir(source), "compact-*.parquet")):
        if url not in committed:
            stem = storage.name(url).removesuffix(".parquet")
            storage.remove(url)
            if f"{stem}.json" in manifests:  # replaced by a newer manifest: the old one goes too
                storage.remove(pool.url("units", source, f"{stem}.json"))
    covered = {u for m in committed.values() for u in m["units"]}
    todo: list[tuple[str, int]] = []
    for record in sorted(pool.records(source), key=lambda r: r["unit"]):
        unit = record["unit"]
        part = pool.part(source, unit)
        if unit in covered:
            storage.remove(part)
        elif storage.exists(part):
            todo.append((unit, record["rows"]))
    groups: list[list[tuple[str, int]]] = [[]]
    for unit, rows in todo:
        if groups[-1] and sum(r for _, r in groups[-1]) + rows > target_rows:
            groups.append([])
        groups[-1].append((unit, rows))
    return [g for g in groups if len(g) > 1]  # a lone part is as good as a compact file of one


def _write_group(pool: Pool, source: str, group: list[tuple[str, int]], row_group_rows: int, advance) -> str:
    name = next_name(pool, source)
    url = storage.join(pool.samples_dir(source), f"{name}.parquet")
    parts = [pool.part(source, unit) for unit, _ in group]
    rows = write_parts(pool, url, parts, row_group_rows, advance)
    manifest = {"units": [u for u, _ in group], "rows": rows, "written_at": time.time()}
    storage.write_json(pool.url("units", source, f"{name}.json"), manifest, tag="compact")
    pool.publish()  # readers of the snapshot switch to the compact file; then its parts can go
    for part in parts:
        storage.remove(part)
    return url
