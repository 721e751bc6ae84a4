"""Query-stage speed and memory on a 10M-row pool (C=10, D=64) written in the real pool format.

Each operation runs in a fresh subprocess so its peak RSS is its own:
  group-by per source (`curate sql` path, DuckDB over the hive-partitioned parts)   bar < 2 s
  top-per-class (`curate select`, end to end, selection written)                     bar < 10 s
  weighted draw of 1M (`curate select --strategy weighted`, end to end)
  near: 1k reference vectors through the IVF-PQ index, restricted by a SQL filter
plus the IVF-PQ build (`curate index`). The pool is cached under work/bench/query-pool.

    python benchmarks/query.py [--rows 10000000] [--smoke] [--doc PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import SMOKE, add_options, machine, table, write_section  # noqa: E402

C, D, UNIT = 10, 64, 250_000
BN = 48  # BatchNorm layers per sample (bn_layers), as many as EfficientNet-Lite0 has
SOURCES = {"related": 0.1, "photos": 0.3, "synthetic": 0.3, "noise": 0.3}


def score_columns(logits: np.ndarray, emb: np.ndarray, centers: np.ndarray, related: bool,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:  # fmt: skip
    """pred and every score of the registry (curate/scores.py) for synthetic logits and embeddings: the logit
    scores by the pool's own code (curate.teacher.logit_scores), the hook scores computed from the embedding
    against the class centres as a classifier's weights; a registry score without a rule here gets a generic
    column, so the pool always has the columns the schema requires."""
    import torch

    from curate.scores import score_names
    from curate.teacher import logit_scores

    cols = {k: v.numpy() for k, v in logit_scores(torch.from_numpy(logits)).items()}
    pred = cols["pred"]
    feat = np.linalg.norm(emb, axis=1)
    basis, _ = np.linalg.qr(centers.T)  # orthonormal basis of the span of the class weight vectors
    w = centers[pred]
    layers = np.abs(rng.normal(size=(len(emb), BN))).astype(np.float32) * (0.5 if related else 1.5)
    hooks = {
        "bn_score": -layers.mean(1),
        "feat_norm": feat,
        "proj_score": (emb * w).sum(1) / np.linalg.norm(w, axis=1),
        "span_score": np.linalg.norm(emb @ basis, axis=1) / feat,
    }
    out = {"pred": pred.astype(np.int16), "bn_layers": pa.FixedSizeListArray.from_arrays(layers.ravel(), BN)}
    for name in score_names():
        value = cols.get(name, hooks.get(name))
        out[name] = (value if value is not None else rng.normal(1.0 if related else 0.0, 1.0, len(emb))).astype(
            np.float32
        )
    return out


def make_pool(root: Path, rows: int, unit: int = UNIT) -> None:
    """Scores shaped like a real pool's: a related source with confident, class-spread predictions and
    clustered embeddings, three unrelated ones with flatter logits; uids from sample ids as in scoring. The
    columns follow the pool's schema (curate.pool.sample_schema) and the score registry."""
    from curate.pool import SCHEMA_VERSION, Pool, sample_schema
    from curate.scores import SCORES
    from curate.sources import uid_of

    pool = Pool(root)
    schema = sample_schema(C, D, "full", False, bn_layers=BN)
    if pool.exists() and unit == UNIT:
        meta = json.loads(Path(pool.meta_url).read_text())
        if meta.get("bench_rows") == rows and meta.get("bench_columns") == schema.names:
            return
    pool.wipe()
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(C, D)).astype(np.float32)
    t0 = time.perf_counter()
    for name, share in SOURCES.items():
        n = int(rows * share)
        for u, start in enumerate(range(0, n, unit)):
            m = min(unit, n - start)
            related = name == "related"
            logits = rng.normal(scale=1.0, size=(m, C)).astype(np.float32)
            cls = rng.integers(0, C, m)
            logits[np.arange(m), cls] += rng.uniform(4, 9, m) if related else rng.uniform(0, 3, m)
            emb = (centers[cls] * (1.0 if related else 0.3) + rng.normal(size=(m, D))).astype(np.float32)
            keys = [f"{start + i:09d}" for i in range(m)]
            ids = [f"{name}/{k}" for k in keys]
            cols = {
                "uid": pa.array([uid_of(s) for s in ids], pa.int64()),
                "sample_id": ids,
                "source": [name] * m,
                "key": keys,
                "unit": [f"{u:06d}"] * m,
                "content_hash": [f"{rng.integers(2**62):032x}" for _ in range(m)],
                "width": np.full(m, 28, np.int32),
                "height": np.full(m, 28, np.int32),
                "label": pa.nulls(m, pa.int16()),
                "meta": pa.nulls(m, pa.string()),
                "logits": pa.FixedSizeListArray.from_arrays(logits.ravel(), C),
                **score_columns(logits, emb, centers, related, rng),
                "embedding": pa.FixedSizeListArray.from_arrays(emb.ravel(), D),
            }
            tbl = pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)
            pool.write_unit(name, f"{u:06d}", tbl, pa.table({}), {"unit": f"{u:06d}", "rows": m, "errors": 0})
    pool.write_meta({
        "schema_version": SCHEMA_VERSION, "bench_rows": rows, "bench_columns": schema.names,
        "classes": [str(i) for i in range(C)],
        "teacher": {"spec": "synthetic", "sha256": "0" * 64}, "input": {"size": 28, "channels": 1},
        "settings": {"embed_layer": "auto"}, "sources": {k: {"spec": "", "classes": None} for k in SOURCES},
        "scores": {k: {"definition": v.definition} for k, v in SCORES.items()}, "embedding": {"dim": D},
    })  # fmt: skip
    print(f"wrote {rows:,} rows in {time.perf_counter() - t0:.0f} s", flush=True)


def op(name: str, pool: str, out: str, rows: int, memory: str = "1GB") -> dict:
    """One measured operation (runs in its own process)."""
    t0 = time.perf_counter()
    detail = ""
    if name == "group-by per source":
        from curate.query import connect

        rows = (
            connect(pool)
            .execute(
                "SELECT source, count(*), avg(confidence), avg(energy), max(bn_score) FROM samples GROUP BY source"
            )
            .fetchall()
        )
        detail = f"{len(rows)} groups"
    elif name == "predicted-class histogram + rel_entropy":
        from curate.query import connect

        r = (
            connect(pool)
            .execute(
                "SELECT source, rel_entropy(list(n ORDER BY pred)) FROM "
                "(SELECT source, pred, count(*) n FROM samples GROUP BY ALL) GROUP BY source"
            )
            .fetchall()
        )
        detail = f"{len(r)} sources"
    elif name.startswith("derived scores"):
        import shutil

        from curate.query import store_derived

        shutil.rmtree(Path(pool, "derived"), ignore_errors=True)  # measured from nothing
        info = store_derived(pool)
        detail = "already stored" if info is None else f"bn_z over {BN} layers, auto; {info['rows']:,} rows"
    elif name.startswith("index"):
        from curate.config import IndexConfig
        from curate.index import index

        kind = "flat" if "flat" in name else "ivf-pq"
        r = index(IndexConfig(pool, kind=kind, memory=memory, show_progress=False))
        info = json.loads(Path(pool, "index", "embeddings.json").read_text())
        detail = (f"{r.factory}, recall@10 {r.recall_at_10:.3f}, {r.bytes / 2**20:.0f} MiB; of which the neighbour "
                  f"graph and auto_knn {info.get('neighbours_seconds', 0):.0f} s")  # fmt: skip
    elif name.startswith("near"):
        import faiss

        from curate.pool import Pool
        from curate.query import connect
        from curate.select import near

        con = connect(pool)
        uids = np.sort(con.execute("SELECT uid FROM samples WHERE source <> 'noise'").fetchnumpy()["uid"])
        rng = np.random.default_rng(1)
        refs = rng.normal(size=(1000, D)).astype(np.float32)  # a stand-in for 1k embedded reference images
        faiss.normalize_L2(refs)
        t1 = time.perf_counter()
        nprobe = int(name.split("nprobe ")[1].rstrip(")")) if "nprobe" in name else None
        idx, _ = near(Pool(pool), con, refs, uids, 100_000, 10, restrict=True, nprobe=nprobe)
        detail = f"{len(idx):,} selected of {len(uids):,} allowed; search+rank {time.perf_counter() - t1:.1f} s"
    else:
        from curate.config import SelectConfig
        from curate.select import select

        kw = {
            "top-per-class": dict(strategy="top-per-class", per_class=100_000, score="energy"),
            "weighted draw 1M": dict(strategy="weighted", n=min(1_000_000, rows // 10), temperature=0.5),
            "default selection": dict(n=min(1_000_000, rows // 10)),  # curate select POOL --n N
        }[name.split(" (")[0]]
        r = select(SelectConfig(pool=pool, out=out, **kw))
        detail = f"{r.rows:,} rows selected"
        if name.startswith("default"):
            info = json.loads(Path(out, "selection.json").read_text())
            detail += f" by {info['score']} ({info.get('auto_knn', '')[:40]}...)"
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "detail": detail}


GROUP_BY = "SELECT source, count(*), avg(confidence) FROM samples GROUP BY source ORDER BY source"
TOP = ("SELECT uid, sample_id, source, pred, label, 1.0::FLOAT AS weight, energy::FLOAT AS score FROM samples "
       "QUALIFY row_number() OVER (PARTITION BY pred ORDER BY energy DESC, uid) <= 1000 ORDER BY uid")  # fmt: skip


def run_child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one fresh process, as /usr/bin/time measures it (a child forked from this
    large process would inherit its peak)."""
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT)  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr[-1500:]}")
    seconds, kib = proc.stderr.strip().splitlines()[-1].split()
    return float(seconds), float(kib) / 1024


def startup(pool: str, doc: Path, reps: int = 3) -> None:
    """Start-up and query overhead against the peers, each command a fresh process, median of `reps`."""
    py, bin_ = sys.executable, Path(sys.executable).parent
    glob = f"read_parquet('{pool}/samples/*/*.parquet')"
    out = Path(pool).parent / "startup-out"
    out.mkdir(exist_ok=True)
    duck = "import duckdb, sys; c = duckdb.connect(); "
    pandas_group = (
        "import pandas as pd; d = pd.read_parquet(sys.argv[1] + '/samples', columns=['source', "
        "'confidence']); print(d.groupby('source', observed=True)['confidence'].agg(['count', 'mean']))"
    )
    pandas_top = (
        "import pandas as pd; d = pd.read_parquet(sys.argv[1] + '/samples', columns=['uid', 'sample_id', "
        "'source', 'pred', 'label', 'energy']); d = d.sort_values(['energy', 'uid'], "
        "ascending=[False, True]); d = d.groupby('pred').head(1000).sort_values('uid'); "
        "d.to_parquet(sys.argv[2])"
    )
    cases = [
        ("`curate --help`", [str(bin_ / "curate"), "--help"]),
        ("group-by: DuckDB alone (Python, fresh process)",
         [py, "-c", duck + f"print(c.sql(\"{GROUP_BY.replace('samples', glob)}\").fetchall())"]),
        ("group-by: `curate sql`", [str(bin_ / "curate"), "sql", pool, GROUP_BY, "--format", "csv"]),
        ("group-by: pandas", [py, "-c", "import sys; " + pandas_group, pool]),
        ("top-per-class: DuckDB alone (QUALIFY, written to Parquet)",
         [py, "-c", duck + f"c.execute(\"COPY ({TOP.replace('samples', glob)}) TO '{out}/duck.parquet'\")"]),
        ("top-per-class: `curate select`", [str(bin_ / "curate"), "select", pool, "--strategy", "top-per-class",
                                            "--per-class", "1000", "--score", "energy", "--out", str(out / "sel")]),
        ("top-per-class: pandas", [py, "-c", "import sys; " + pandas_top, pool, str(out / "pd.parquet")]),
    ]  # fmt: skip
    rows, seconds = [], {}
    for name, cmd in cases:
        runs = [run_child(cmd) for _ in range(reps)]
        wall = float(np.median([r[0] for r in runs]))
        rss = float(np.median([r[1] for r in runs]))
        seconds[name] = wall
        rows.append([name, f"{wall:.2f}", f"{rss:,.0f}"])
        print(rows[-1], flush=True)
    for i, (name, _) in enumerate(cases):
        peer = next((p for p in ("group-by: DuckDB", "top-per-class: DuckDB") if name.startswith(p.split(":")[0])
                     and ":" in name), None)  # fmt: skip
        base = next((seconds[k] for k in seconds if peer and k.startswith(peer)), None)
        rows[i].append(f"{wall_ratio:.2f}" if base and (wall_ratio := seconds[name] / base) else "")
    # in-process: the Python API against the same query through an open DuckDB connection
    import duckdb

    from curate.config import SelectConfig
    from curate.select import select

    con = duckdb.connect()
    api, direct = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        select(SelectConfig(pool=pool, out=str(out / "api"), strategy="top-per-class", per_class=1000, score="energy"))
        api.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        con.execute(f"COPY ({TOP.replace('samples', glob)}) TO '{out}/duck2.parquet'")
        direct.append(time.perf_counter() - t0)
    a, d = float(np.median(api)), float(np.median(direct))
    rows.append(["top-per-class in one process: `select()` / DuckDB query", f"{a:.2f} / {d:.2f}", "", f"{a / d:.2f}"])
    n = duckdb.sql(f"SELECT count(*) FROM {glob}").fetchall()[0][0]
    body = (
        f"## Start-up and query overhead ({n:,}-row pool)\n\nMachine: {machine()}.\n\n"
        "`python benchmarks/query.py --startup`: each command a fresh process (median of "
        f"{reps}), wall time and the process's peak RSS; ratio = the command's time over DuckDB alone on the same "
        "query, also in a fresh Python process. The `curate` CLI imports only what the command uses (typer, "
        "DuckDB; torch and FAISS only for scoring, indexing and kNN strategies); `curate sql` runs the query "
        "through DuckDB over the pool's views, `curate select --strategy top-per-class` is one DuckDB window query "
        "plus the join that writes selection.parquet and selection.json. Bar: within 2x of DuckDB alone.\n\n"
        + table(["command", "seconds", "peak RSS MiB", "ratio to DuckDB alone"], rows)
    )
    write_section("startup", body, doc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--op")
    ap.add_argument("--memory", default="1GB", help="index budget for the IVF-PQ build")
    ap.add_argument(
        "--only", help="rerun only the operations whose names start with these (comma-separated); keep the other rows"
    )
    ap.add_argument("--pool", default=str(ROOT / "work" / "bench" / "query-pool"))
    ap.add_argument("--startup", action="store_true", help="start-up and query overhead on a 2M-row pool")
    add_options(ap)
    args = ap.parse_args()
    if args.smoke:  # a pool of 4,000 rows in a temporary folder, every operation in this process
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="kdcurate-bench-")
        args.rows, args.pool, args.memory = 4000, str(Path(tmp.name) / "pool"), "64MB"
    if args.startup:
        pool = ROOT / "work" / "bench" / "query-pool-2m"
        make_pool(pool, 2_000_000)
        startup(str(pool), args.doc)
        return
    if args.op:
        print(json.dumps(op(args.op, args.pool, str(Path(args.pool).parent / "query-sel"), args.rows, args.memory)))
        return
    make_pool(Path(args.pool), args.rows, unit=UNIT if not args.smoke else 500)
    disk = sum(p.stat().st_size for p in Path(args.pool, "samples").rglob("*.parquet"))
    bars = {
        "group-by per source": 2.0,
        "top-per-class": 10.0,
        "default selection (before the index)": 10.0,
        "default selection (after the index)": 10.0,
    }
    ops = ["derived scores (bn_z, auto: once per state of the pool)", "group-by per source",
           "predicted-class histogram + rel_entropy", "top-per-class", "weighted draw 1M",
           "default selection (before the index)",
           f"index ({'flat' if args.smoke else 'IVF-PQ'} build over {args.rows:,})", "near (1k refs, filtered)",
           "near (1k refs, filtered, nprobe 32)", "default selection (after the index)"]  # fmt: skip
    cache = Path(args.pool).parent / f"query-results-{args.rows}.json"
    done = json.loads(cache.read_text()) if cache.exists() and args.only else {}
    rows = []
    for name in ops:
        if args.only and not name.startswith(tuple(args.only.split(","))) and name in done:
            rows.append(done[name])
            continue
        if name.startswith("near") and not (Path(args.pool) / "index" / "embeddings.faiss").exists():
            continue
        if args.smoke:
            r = op(name, args.pool, str(Path(args.pool).parent / "query-sel"), args.rows, args.memory)
        else:
            cmd = [sys.executable, __file__, "--op", name, "--pool", args.pool, "--rows", str(args.rows)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-2000:])
                raise SystemExit(f"{name} failed")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
        bar = bars.get(name)
        verdict = ("pass" if r["seconds"] < bar else "FAIL") + f" (< {bar:g} s)" if bar else ""
        rows.append([name, f"{r['seconds']:.2f}", f"{r['rss_mib']:,.0f}", r["detail"], verdict])
        done[name] = rows[-1]
        cache.write_text(json.dumps(done))
        print(rows[-1], flush=True)
    body = (
        f"## Query: {args.rows:,}-row pool (C={C}, D={D}){' ' + SMOKE if args.smoke else ''}\n\n"
        f"Machine: {machine()}.\n\n"
        f"`python benchmarks/query.py`: a synthetic pool in the real format ({len(SOURCES)} sources, "
        f"{disk / 2**30:.2f} GiB of zstd Parquet, {disk / args.rows:.0f} bytes/row). Each operation runs in its own "
        "process; peak RSS is that process's, DuckDB's buffers included. Nothing goes through pandas: DuckDB "
        "aggregates; `select` pulls uid, pred and the score as Arrow/numpy, then joins the picked uids back. "
        "`near` searches the IVF-PQ index for 1,000 reference embeddings (400 neighbours each) through an "
        "`IDSelectorBatch` of the 7M uids the SQL filter keeps, then ranks the 0.4M candidates by their exact "
        "cosine to the 10th-nearest reference; its cost is the number of probed lists (the index's default "
        "nprobe 256, widened by 1/0.7 for the filter, or `--nprobe 32`). The pool stores 48 BatchNorm deviations "
        "per sample (`bn_layers`, as EfficientNet-Lite0 has), so `bn_z` and `auto` are what a real teacher gives; "
        "they are computed once per state of the pool (`curate score` does it as it ends) and joined to `samples` "
        "after. The default selection is `curate select POOL --n 1000000` (strategy related by `auto_knn`): "
        "before the index `auto_knn` is `auto`; `curate index` adds the neighbour graph (every sample searched "
        "for its 20 nearest in its own IVF list) and stores `auto_knn`.\n\n"
        + table(["operation", "seconds", "peak RSS MiB", "detail", "bar"], rows)
    )
    write_section("query", body, args.doc)


if __name__ == "__main__":
    main()
