"""Compact files of a pool: the next free name, streaming parts into one file, and rewriting one without some
units. `curate compact` merges with these, and the pool drops changed units with them; they take the pool
as an argument, so neither module imports the other's module for them."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from kdcore import storage

if TYPE_CHECKING:
    from curate.pool import Pool


def next_name(pool: Pool, source: str) -> str:
    names = storage.glob(pool.url("units", source, "compact-*.json"))
    names += storage.glob(storage.join(pool.samples_dir(source), "compact-*.parquet"))
    numbers = [int(m.group(1)) for u in names if (m := re.match(r"compact-(\d+)", storage.name(u)))]
    return f"compact-{max(numbers, default=0) + 1:06d}"


def write_parts(pool: Pool, url: str, parts: list[str], row_group_rows: int, advance=None,
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


def rewrite_without(pool: Pool, source: str, url: str, manifest: dict[str, Any], units: set[str]) -> None:
    """Rewrite one compact file without `units` (they changed or left the source). The new manifest names
    the old file in `replaces`, so readers switch over in one step; the old file and manifest go after."""
    import pyarrow.compute as pc

    old = storage.name(url).removesuffix(".parquet")
    keep_units = [u for u in manifest["units"] if u not in units]
    name = next_name(pool, source)
    if keep_units:
        new_url = storage.join(pool.samples_dir(source), f"{name}.parquet")
        rows = write_parts(pool, new_url, [url], 131_072, keep=lambda t: pc.is_in(t["unit"], pa_array(keep_units)))
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
