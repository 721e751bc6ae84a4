"""`curate sql`: DuckDB over a pool, read-only, streaming.

Views: `samples` (all parts, hive-partitioned: `source` is a column), `errors`, and `selection` when a
selection directory is given. Macros for the things people want over logits:

    prob(logits, k)            softmax probability of class k (0-based)
    topk_classes(logits, k)    the k most probable classes, best first (0-based)
    rel_entropy(counts)        H(p)/log C of a predicted-class histogram given as a list of counts
                               (C = the teacher's class count; 1 = perfectly balanced)

An in-memory DuckDB reads the Parquet parts; nothing is ever written into the pool.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import duckdb
from rich.console import Console
from rich.table import Table

from curate.errors import UserError
from curate.pool import ERROR_SCHEMA, Pool

FORMATS = ("table", "csv", "json", "parquet")
TABLE_ROWS = 50


def connect(pool_dir: str, selection: str | None = None, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the pool's views and macros."""
    pool = Pool(pool_dir)
    meta = pool.meta()
    con = duckdb.connect()
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    root = pool.root.resolve()
    files = [p.resolve() for p in pool.sample_files()]
    if not files:
        raise UserError(f"pool {pool.root} has no scored samples yet; run 'curate score' first")
    if len(files) == len(list((root / "samples").glob("source=*/*.parquet"))):
        source = f"'{_q(root)}/samples/*/*.parquet'"  # every file is complete: the glob is the short form
    else:  # units being written, or a compaction cut short: only what sample_files vouches for
        source = "[" + ", ".join(f"'{_q(p)}'" for p in files) + "]"
    con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet({source}, hive_partitioning=1)")
    if list((root / "errors").glob("source=*/*.parquet")):
        con.execute(
            f"CREATE VIEW errors AS SELECT * FROM read_parquet('{_q(root)}/errors/*/*.parquet', hive_partitioning=1)"
        )
    else:
        cols = ", ".join(f"NULL::{_duck_type(f.type)} AS {f.name}" for f in ERROR_SCHEMA) + ", NULL::VARCHAR AS source"
        con.execute(f"CREATE VIEW errors AS SELECT {cols} WHERE false")
    if selection:
        path = Path(selection) / "selection.parquet"
        if not path.is_file():
            raise UserError(f"no selection at {selection} (expected {path})")
        con.execute(f"CREATE VIEW selection AS SELECT * FROM read_parquet('{_q(path.resolve())}')")
    n_classes = len(meta["classes"])
    con.execute(
        "CREATE MACRO prob(logits, k) AS "
        "exp(logits[k + 1] - list_max(logits)) / list_sum(list_transform(logits, lambda x: exp(x - list_max(logits))))"
    )
    con.execute(
        "CREATE MACRO topk_classes(logits, k) AS "
        "list_transform(list_slice(list_grade_up(list_transform(logits, lambda x: -x)), 1, k), lambda i: i - 1)"
    )
    con.execute(
        "CREATE MACRO rel_entropy(counts) AS "
        "-list_sum(list_transform(counts, lambda c: CASE WHEN c > 0 THEN (c / list_sum(counts)) * "
        f"ln(c / list_sum(counts)) ELSE 0 END)) / ln({max(2, n_classes)})"
    )
    return con


def sql(pool: str, query: str, format: str = "table", out: str | None = None, selection: str | None = None,
        limit: int = TABLE_ROWS) -> int:  # fmt: skip
    """Run `query` over the pool; print or write the result. Returns the number of rows written
    (for `table`, the rows shown)."""
    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "parquet" and not out:
        raise UserError("--format parquet needs --out FILE")
    if out and Path(out).resolve().is_relative_to(Path(pool).resolve()):
        raise UserError(f"--out {out} is inside the pool; curate sql never writes into the pool")
    try:
        con = connect(pool, selection)
        if out and format in ("csv", "json", "parquet"):
            opts = {"csv": "FORMAT csv, HEADER", "json": "FORMAT json", "parquet": "FORMAT parquet, COMPRESSION zstd"}
            con.execute(f"COPY ({query.rstrip().rstrip(';')}) TO '{_q(Path(out))}' ({opts[format]})")
            return int(con.execute(f"SELECT count(*) FROM read_{'json_auto' if format == 'json' else format}"
                                   f"('{_q(Path(out))}')").fetchone()[0])  # fmt: skip
        cur = con.execute(query)
        names = [d[0] for d in cur.description] if cur.description else []
        if format == "table":
            return _print_table(cur, names, limit)
        return _stream_text(cur, names, format, sys.stdout)
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"SQL error: {first}") from None


def _print_table(cur: duckdb.DuckDBPyConnection, names: list[str], limit: int) -> int:
    rows = cur.fetchmany(limit + 1)
    table = Table(show_lines=False)
    for n in names:
        table.add_column(n, overflow="fold")
    for row in rows[:limit]:
        table.add_row(*[_cell(v) for v in row])
    console = Console(width=max(120, Console().width))
    console.print(table)
    if len(rows) > limit:
        console.print(f"(first {limit} rows shown; use --format csv|json|parquet --out FILE for all)")
    return min(len(rows), limit)


def _stream_text(cur: duckdb.DuckDBPyConnection, names: list[str], fmt: str, stream: Any) -> int:
    n = 0
    writer = csv.writer(stream) if fmt == "csv" else None
    if writer:
        writer.writerow(names)
    while batch := cur.fetchmany(10_000):
        for row in batch:
            if writer:
                writer.writerow(row)
            else:
                stream.write(json.dumps(dict(zip(names, row, strict=True)), default=str) + "\n")
        n += len(batch)
    return n


def _cell(v: Any) -> str:
    if isinstance(v, list):
        head = ", ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in v[:4])
        return f"[{head}{', …' if len(v) > 4 else ''}] ({len(v)})" if len(v) > 4 else f"[{head}]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "NULL" if v is None else str(v)


def _q(p: Path | str) -> str:
    return str(p).replace("'", "''")


def _duck_type(t: Any) -> str:
    return {"int64": "BIGINT", "string": "VARCHAR"}.get(str(t), "VARCHAR")
