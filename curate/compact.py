"""`curate compact`: merge a pool's many small unit parts into large Parquet files, per source.

A pool scored from hundreds of thousands of units holds as many small files; every DuckDB scan then
opens each one. Compaction streams complete units' parts, in unit order, into compact-N.parquet files
of about `target_rows` rows (row groups of `row_group_rows`), and commits each with its manifest:

    1. compact-N.parquet.tmp, renamed to compact-N.parquet   (not read yet: no manifest)
    2. compact-N.json (units, rows), written atomically       (the commit: readers switch to it)
    3. the units' parts deleted                               (already hidden by the manifest)

Markers stay, so `curate score` still skips the units. A compaction killed anywhere leaves a state
readers handle (Pool.sample_files); the next run removes what the killed one left and goes on.
Error parts are left as they are (one per unit that had errors, usually few).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate import progress
from curate.errors import UserError
from curate.pool import TMP_SUFFIX, Pool, write_json_atomic


@dataclass
class CompactResult:
    pool: str
    parts_before: int = 0
    files_after: int = 0
    units_merged: int = 0
    rows_merged: int = 0
    written: list[str] = field(default_factory=list)
    seconds: float = 0.0


def compact(
    pool_dir: str, target_rows: int = 1_000_000, row_group_rows: int = 131_072, show_progress: bool = True
) -> CompactResult:
    if target_rows < 1 or row_group_rows < 1:
        raise UserError("--target-rows and --row-group-rows must be at least 1")
    t0 = time.perf_counter()
    pool = Pool(pool_dir)
    pool.meta()  # a clear error when this is not a pool
    result = CompactResult(pool=str(pool.root))
    result.parts_before = len(pool.sample_files())
    dirs = sorted((pool.root / "samples").glob("source=*"))
    plans = [(d, _tidy_and_plan(pool, d, target_rows)) for d in dirs]
    total = sum(rows for _, groups in plans for g in groups for _, rows in g) or None
    with progress.bar("compacting", total=total, enabled=show_progress) as advance:
        for d, groups in plans:
            for group in groups:
                path = _write_group(pool, d, group, row_group_rows, advance)
                result.written.append(str(path))
                result.units_merged += len(group)
                result.rows_merged += sum(rows for _, rows in group)
    result.files_after = len(pool.sample_files())
    result.seconds = time.perf_counter() - t0
    return result


def _tidy_and_plan(pool: Pool, d: Path, target_rows: int) -> list[list[tuple[str, int]]]:
    """Remove what a killed compaction left (compact files without manifest, parts a manifest already
    holds), then group the remaining complete parts into runs of about target_rows rows."""
    for p in d.glob("compact-*.parquet*"):
        if p.name.endswith(TMP_SUFFIX) or not p.with_suffix(".json").exists():
            p.unlink()
    covered = {u for units in pool.compacted(d).values() for u in units}
    todo: list[tuple[str, int]] = []
    for marker in sorted(d.glob("unit-*.done.json")):
        unit = marker.name[len("unit-") : -len(".done.json")]
        part = d / f"unit-{unit}.parquet"
        if unit in covered:
            part.unlink(missing_ok=True)
        elif part.exists():
            todo.append((unit, json.loads(marker.read_text())["rows"]))
    groups: list[list[tuple[str, int]]] = [[]]
    for unit, rows in todo:
        if groups[-1] and sum(r for _, r in groups[-1]) + rows > target_rows:
            groups.append([])
        groups[-1].append((unit, rows))
    return [g for g in groups if len(g) > 1]  # a lone part is as good as a compact file of one


def _write_group(pool: Pool, d: Path, group: list[tuple[str, int]], row_group_rows: int, advance) -> Path:
    numbers = [int(m.group(1)) for p in d.glob("compact-*.json") if (m := re.match(r"compact-(\d+)", p.name))]
    path = d / f"compact-{max(numbers, default=0) + 1:06d}.parquet"
    tmp = path.with_name(path.name + TMP_SUFFIX)
    parts = [d / f"unit-{unit}.parquet" for unit, _ in group]
    writer: pq.ParquetWriter | None = None
    buffer: list[pa.Table] = []
    buffered = rows = 0
    try:
        for part, (_, n) in zip(parts, group, strict=True):
            table = pq.read_table(part)
            writer = writer or pq.ParquetWriter(tmp, table.schema, compression="zstd")
            buffer.append(table)
            buffered += table.num_rows
            if buffered >= row_group_rows:  # write whole row groups, carry the rest
                merged = pa.concat_tables(buffer)
                full = buffered - buffered % row_group_rows
                writer.write_table(merged.slice(0, full), row_group_size=row_group_rows)
                buffer, buffered = [merged.slice(full)], buffered - full
            rows += table.num_rows
            advance(n)
        if buffered:
            writer.write_table(pa.concat_tables(buffer), row_group_size=row_group_rows)
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(path)
    manifest = {"units": [u for u, _ in group], "rows": rows, "bytes": path.stat().st_size, "written_at": time.time()}
    write_json_atomic(path.with_suffix(".json"), manifest)
    for part in parts:
        part.unlink()
    return path
