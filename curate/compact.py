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

import re
import time
from dataclasses import dataclass, field
from typing import Any

from curate.config import CompactConfig
from curate.pool import Pool
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


def _next_name(pool: Pool, source: str) -> str:
    names = storage.glob(pool.url("units", source, "compact-*.json"))
    names += storage.glob(storage.join(pool.samples_dir(source), "compact-*.parquet"))
    numbers = [int(m.group(1)) for u in names if (m := re.match(r"compact-(\d+)", storage.name(u)))]
    return f"compact-{max(numbers, default=0) + 1:06d}"


def _write_parts(pool: Pool, url: str, parts: list[str], row_group_rows: int, advance=None,
                 keep: Any = None) -> int:  # fmt: skip
    """Stream `parts` (or one compact file filtered by `keep`) into one Parquet file of whole row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    with storage.open_write(url, tag="compact") as f:
        writer: pq.ParquetWriter | None = None
        buffer: list[pa.Table] = []
        buffered = 0
        try:
            for part in parts:
                fs, path = storage.arrow_filesystem(part)
                table = pq.read_table(path, filesystem=fs)
                if keep is not None:
                    table = table.filter(keep(table))
                writer = writer or pq.ParquetWriter(f, table.schema, compression="zstd")
                buffer.append(table)
                buffered += table.num_rows
                if buffered >= row_group_rows:  # write whole row groups, carry the rest
                    merged = pa.concat_tables(buffer)
                    full = buffered - buffered % row_group_rows
                    writer.write_table(merged.slice(0, full), row_group_size=row_group_rows)
                    buffer, buffered = [merged.slice(full)], buffered - full
                rows += table.num_rows
                if advance:
                    advance(table.num_rows)
            if buffered:
                writer.write_table(pa.concat_tables(buffer), row_group_size=row_group_rows)
        finally:
            if writer is not None:
                writer.close()
    return rows


def _write_group(pool: Pool, source: str, group: list[tuple[str, int]], row_group_rows: int, advance) -> str:
    name = _next_name(pool, source)
    url = storage.join(pool.samples_dir(source), f"{name}.parquet")
    parts = [pool.part(source, unit) for unit, _ in group]
    rows = _write_parts(pool, url, parts, row_group_rows, advance)
    manifest = {"units": [u for u, _ in group], "rows": rows, "written_at": time.time()}
    storage.write_json(pool.url("units", source, f"{name}.json"), manifest, tag="compact")
    pool.publish()  # readers of the snapshot switch to the compact file; then its parts can go
    for part in parts:
        storage.remove(part)
    return url


def rewrite_without(pool: Pool, source: str, url: str, manifest: dict[str, Any], units: set[str]) -> None:
    """Rewrite one compact file without `units` (they changed or left the source). The new manifest names
    the old file in `replaces`, so readers switch over in one step; the old file and manifest go after."""
    import pyarrow.compute as pc

    old = storage.name(url).removesuffix(".parquet")
    keep_units = [u for u in manifest["units"] if u not in units]
    name = _next_name(pool, source)
    if keep_units:
        new_url = storage.join(pool.samples_dir(source), f"{name}.parquet")
        rows = _write_parts(pool, new_url, [url], 131_072, keep=lambda t: pc.is_in(t["unit"], pa_array(keep_units)))
    else:
        rows = 0
    record = {"units": keep_units, "rows": rows, "written_at": time.time(), "replaces": [old]}
    storage.write_json(pool.url("units", source, f"{name}.json"), record, tag="compact")
    pool.publish()
    storage.remove(url)
    storage.remove(pool.url("units", source, f"{old}.json"))
    if not keep_units:
        storage.remove(pool.url("units", source, f"{name}.json"))


def pa_array(values: list[str]):
    import pyarrow as pa

    return pa.array(values, pa.string())
