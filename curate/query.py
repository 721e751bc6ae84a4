"""`curate sql`: DuckDB over a pool, read-only, streaming.

Views: `samples` (all complete parts; `source` is a column; plus the derived scores such as `auto`, computed
over the pool when a query uses them), `errors`, and `selection` when a selection directory is given.
Macros for the things people want over logits:

    prob(logits, k)            softmax probability of class k (0-based)
    topk_classes(logits, k)    the k most probable classes, best first (0-based)
    rel_entropy(counts)        H(p)/log C of a predicted-class histogram given as a list of counts
                               (C = the teacher's class count; 1 = perfectly balanced)

Read-only by construction: a query must be exactly one SELECT (or EXPLAIN) statement, so COPY, ATTACH,
INSTALL, SET and the like never run; results leave only through --out, written by this module from the
result stream. `--where` and `--score` of `curate select` are checked to be one expression (`curate/sqlcheck.py`).
A pool on object storage is read through its fsspec filesystem, registered with DuckDB.
"""

from __future__ import annotations

import csv
import json
import sys
from typing import Any

import duckdb

from curate import derived
from curate.config import SqlConfig
from curate.pool import ERROR_COLUMNS, Pool
from curate.scores import DERIVED, SCORES, derived_sql
from kdcore import storage
from kdcore.errors import UserError

READ_STATEMENTS = ("SELECT", "EXPLAIN")


def _stored_scores(con: duckdb.DuckDBPyConnection, meta: dict) -> list[str]:
    """The scores of a pool written before pool.json listed them: the stored score columns (bn_score only with
    BatchNorm)."""
    columns = {r[0] for r in con.execute("DESCRIBE stored").fetchall()}
    return [s for s in SCORES if s in columns and (s != "bn_score" or meta.get("bn_score_available", True))]


def connect(pool_dir: str, selection: str | None = None, threads: int | None = None, reference: Any = None,
            stored_scores: bool = True, files: list[str] | None = None) -> duckdb.DuckDBPyConnection:  # fmt: skip
    """An in-memory DuckDB connection with the pool's views and macros. `reference`: an Arrow table (uid,
    ref_score) from reference images; it joins `samples` and takes its share of `auto`. The derived scores
    (bn_z, auto, auto_knn) come from pool/derived/ when it belongs to the pool as it is (`stored_scores`), from
    their window definitions otherwise (curate/derived.py)."""
    pool = Pool(pool_dir)
    meta = pool.meta()
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    _register(con, pool.root)
    files = pool.sample_files() if files is None else files  # `files`: read exactly these, in this order
    if not files:
        raise UserError(f"pool {storage.redact(pool.root)} has no scored samples yet; run 'curate score' first")
    root = storage.absolute(pool.root)
    all_parquet = storage.glob(storage.join(pool.root, "samples", "*", "*.parquet"))
    cached = derived.current(pool, files) if stored_scores and reference is None else None
    if cached:  # the files in the order the stored derived scores are aligned to
        source = "[" + ", ".join(_lit(storage.absolute(f)) for f in files) + "]"
    elif len(files) == len(all_parquet) and stored_scores:
        source = _lit(storage.join(root, "samples", "*", "*.parquet"))  # every file is complete: the glob
    else:  # units being written, or a compaction cut short: only what sample_files vouches for
        source = "[" + ", ".join(_lit(storage.absolute(f)) for f in files) + "]"
    con.execute(f"CREATE VIEW stored AS SELECT * FROM read_parquet({source}, union_by_name=true)")
    available = set(meta.get("available_scores") or _stored_scores(con, meta))
    base = "stored"
    if reference is not None:
        con.register("_reference", reference)
        con.execute("CREATE VIEW _with_ref AS SELECT s.*, r.ref_score FROM stored s LEFT JOIN _reference r USING (uid)")
        base = "_with_ref"
    layers = _bn_layers(con) if "bn_score" in available else 0
    bn_z = derived_sql("bn_z", available, bn_layers=layers)
    if cached:  # computed once for this state of the pool, one row per stored row, in the same order
        _register(con, cached)
        auto = derived_sql("auto", available, bn_layers=layers)
        have = [c for c, ok in (("bn_z", bn_z), ("auto", auto), ("auto_knn", auto)) if ok]
        con.execute(f"CREATE VIEW samples AS SELECT s.*{''.join(', d.' + c for c in have)} FROM stored s "
                    f"POSITIONAL JOIN read_parquet({_lit(storage.absolute(cached))}) d")  # fmt: skip
    else:  # window columns: DuckDB computes them only for the queries that use them
        con.execute(f"CREATE VIEW _scored AS SELECT *{f', {bn_z} AS bn_z' if bn_z else ''} FROM {base}")
        sqls = {n: derived_sql(n, available, reference is not None, layers) for n in DERIVED if n != "bn_z"}
        cols = [f"{sql} AS {n}" for n, sql in sqls.items() if sql]
        con.execute(f"CREATE VIEW _derived AS SELECT *{''.join(', ' + d for d in cols)} FROM _scored")
        knn = ", auto AS auto_knn" if sqls.get("auto") else ""
        con.execute(f"CREATE VIEW samples AS SELECT *{knn} FROM _derived")
    if storage.glob(storage.join(pool.root, "errors", "*", "*.parquet")):
        errors = _lit(storage.join(root, "errors", "*", "*.parquet"))
        con.execute(f"CREATE VIEW errors AS SELECT * FROM read_parquet({errors}, union_by_name=true)")
    else:
        cols = ", ".join(f"NULL::{'BIGINT' if t == 'int64' else 'VARCHAR'} AS {n}" for n, t in ERROR_COLUMNS)
        con.execute(f"CREATE VIEW errors AS SELECT {cols} WHERE false")
    if selection:
        path = storage.join(selection, "selection.parquet")
        if not storage.isfile(path):
            raise UserError(f"no selection at {selection} (expected {path})")
        pool.check_selection(selection, meta)
        _register(con, path)
        con.execute(f"CREATE VIEW selection AS SELECT * FROM read_parquet({_lit(storage.absolute(path))})")
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


def _bn_layers(con: duckdb.DuckDBPyConnection) -> int:
    """How many BatchNorm layers the pool stores per sample (the bn_layers column, FLOAT[L]); 0 without."""
    if "bn_layers" not in {r[0] for r in con.execute("DESCRIBE stored").fetchall()}:
        return 0
    row = con.execute("SELECT len(bn_layers) FROM stored WHERE bn_layers IS NOT NULL LIMIT 1").fetchall()
    return int(row[0][0]) if row else 0


def _register(con: duckdb.DuckDBPyConnection, url: str) -> None:
    """Let DuckDB read `url` through the storage layer's fsspec filesystem (its own httpfs is not needed)."""
    if storage.is_local(url):
        return
    fs, _ = storage.filesystem(url)
    protocols = fs.protocol if isinstance(fs.protocol, (list, tuple)) else [fs.protocol]
    if not any(con.filesystem_is_registered(p) for p in protocols):
        con.register_filesystem(fs)


def read_only(query: str) -> str:
    """The query, when it is exactly one SELECT or EXPLAIN statement; a UserError otherwise."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise UserError(f"SQL error: {_first(e)}") from None
    if len(statements) != 1:
        raise UserError(f"curate sql runs one query at a time; got {len(statements)} statements")
    kind = statements[0].type.name
    if kind not in READ_STATEMENTS:
        raise UserError(f"curate sql is read-only: {kind} statements are refused; write results with "
                        "--format csv|json|parquet --out FILE")  # fmt: skip
    return query.strip().rstrip(";")


def sql(cfg: SqlConfig, as_json: bool = False) -> int:
    """Run the query over the pool; print or write the result. Returns the rows written (table: shown). With
    `as_json` and no --out, stdout gets one JSON object: {"columns": [...], "rows": [{...}, ...], "count": N},
    every row (--limit is the table's)."""
    query = read_only(cfg.query)
    if as_json and not cfg.out and cfg.format not in ("table", "json"):
        raise UserError(f"--json prints the rows as one JSON object; leave out --format {cfg.format}, or write "
                        f"{cfg.format} with --out FILE")  # fmt: skip
    if cfg.out and storage.inside(cfg.out, cfg.pool):
        raise UserError(f"--out {cfg.out} is inside the pool; curate sql never writes into the pool")
    if cfg.out and storage.isdir(cfg.out):
        ext = "csv" if cfg.format == "table" else cfg.format
        raise UserError(f"--out {storage.redact(cfg.out)} is a directory; give a file, e.g. "
                        f"{storage.redact(storage.join(cfg.out, f'result.{ext}'))}")  # fmt: skip
    try:
        con = connect(cfg.pool, cfg.selection)
        if cfg.out:
            return _write(con.sql(query), cfg.format, cfg.out)
        cur = con.execute(query)
        names = [d[0] for d in cur.description] if cur.description else []
        if as_json:
            from kdcore.output import results

            return _stream_json_object(cur, names, results())
        if cfg.format == "table":
            return _print_table(cur, names, cfg.limit)
        return _stream_text(cur, names, cfg.format, sys.stdout)
    except duckdb.Error as e:
        raise UserError(f"SQL error: {_first(e)}") from None


def _write(rel: duckdb.DuckDBPyRelation, fmt: str, out: str) -> int:
    """Stream the result into --out (csv, json lines, parquet; 'table' writes csv), atomically."""
    import pyarrow.parquet as pq

    n = 0
    names = rel.columns
    reader = rel.to_arrow_reader(65_536)
    with storage.open_write(out, tag="sql") as f:
        if fmt == "parquet":
            with pq.ParquetWriter(f, reader.schema, compression="zstd") as writer:
                for batch in reader:
                    writer.write_batch(batch)
                    n += batch.num_rows
            return n
        import io

        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.writer(text, lineterminator="\n") if fmt in ("csv", "table") else None
        if writer:
            writer.writerow(names)
        for batch in reader:
            for row in batch.to_pylist():
                if writer:
                    writer.writerow(row.values())
                else:
                    text.write(json.dumps(row, default=str) + "\n")
            n += batch.num_rows
        text.flush()
        text.detach()
    return n


def _print_table(cur: duckdb.DuckDBPyConnection, names: list[str], limit: int) -> int:
    from rich.table import Table

    from kdcore.output import console

    rows = cur.fetchmany(limit + 1)
    table = Table(show_lines=False)
    for n in names:
        table.add_column(n, overflow="fold")
    for row in rows[:limit]:
        table.add_row(*[_cell(v) for v in row])
    console().print(table)
    if len(rows) > limit:
        console(stderr=True).print(f"(first {limit} rows shown; use --format csv|json|parquet --out FILE for all)")
    return min(len(rows), limit)


def _stream_text(cur: duckdb.DuckDBPyConnection, names: list[str], fmt: str, stream: Any) -> int:
    n = 0
    writer = csv.writer(stream, lineterminator="\n") if fmt == "csv" else None
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


def _stream_json_object(cur: duckdb.DuckDBPyConnection, names: list[str], stream: Any) -> int:
    """The result as one JSON object, written row by row (never held whole)."""
    from kdcore.output import dumps

    n = 0
    stream.write('{"columns": ' + dumps(names) + ', "rows": [')
    while batch := cur.fetchmany(10_000):
        for row in batch:
            stream.write((",\n" if n else "\n") + dumps(dict(zip(names, row, strict=True))))
            n += 1
    stream.write(f'\n], "count": {n}, "warnings": []}}\n')
    stream.flush()
    return n


def _cell(v: Any) -> str:
    if isinstance(v, list):
        head = ", ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in v[:4])
        return f"[{head}{', …' if len(v) > 4 else ''}] ({len(v)})" if len(v) > 4 else f"[{head}]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "NULL" if v is None else str(v)


def _first(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _lit(p: str) -> str:
    return "'" + str(p).replace("'", "''") + "'"


def store_derived(pool_dir: str, neighbours: Any = None) -> dict[str, Any] | None:
    """Compute the pool's derived scores once and store them (curate/derived.py); `neighbours`: the graph for
    auto_knn (curate index). None when the pool holds no scored sample."""
    pool = Pool(pool_dir)
    files = pool.sample_files()
    if not files:
        return None
    if neighbours is None and derived.current(pool, files):  # nothing changed since they were stored
        return None
    try:
        con = connect(pool_dir, stored_scores=False, files=files)
        meta = pool.meta()
        available = set(meta.get("available_scores") or _stored_scores(con, meta))
        layers = _bn_layers(con) if "bn_score" in available else 0
        return derived.write(pool, con, files, available, layers, neighbours)
    except (duckdb.IOException, FileNotFoundError):  # another writer (a compaction) moved the files meanwhile:
        return None  # queries compute the scores until the next run stores them; nothing is lost
