"""Derived scores stored once per state of the pool: bn_z, auto and auto_knn.

bn_z and auto are defined over the whole pool (each BatchNorm layer's spread, percentile ranks), so a query
that computes them passes over every row with window functions: instant on thousands of rows, about a minute on
10M. They are computed once for each state of the pool and stored:

    pool/derived/scores-H.parquet bn_z, auto, auto_knn (FLOAT), uid: one row per sample, in the order the sample
                                  files hold them (sorted file list, each file's rows in order); H names the write
    pool/derived/scores.json      the file (`file`), the layout it is aligned to (each sample file's relative path
                                  and version: size and mtime, or ETag), the content (row count, XOR of
                                  hash(uid, content_hash)), the definitions, and whether auto_knn is smoothed

`curate score` writes them after a run, `curate index` again with auto_knn smoothed over the neighbour graph,
`curate compact` again for its new files (auto_knn carried over by uid: the rows are the same). `query.connect`
joins the file by position when its layout is the pool's (no hash join: a zip of two scans), and computes the
window definitions otherwise, with the same values; a stale or missing file is never read.

auto_knn is auto averaged over the sample and its mutual K nearest neighbours in the teacher's embedding space
(the pool's FAISS index): related images cluster, so a neighbourhood's mean is a steadier guess than one image's
score; only mutual neighbours count, so the hubs of a dense cluster do not lend their score to the outliers whose
nearest they are. Without a current index it equals auto.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.pool import Pool
from curate.scores import DERIVED
from kdcore import storage

K = 20  # neighbours averaged by auto_knn (the sample included); chosen in benchmarks/relatedness.py
VERSION = 1


def scores_url(pool: Pool, meta: dict[str, Any] | None = None) -> str:
    """The scores file scores.json names (each write names its own file, so two writers racing never pair one's
    json with the other's scores)."""
    return pool.url("derived", (meta or {}).get("file", "scores.parquet"))


def state(con: duckdb.DuckDBPyConnection, source: str = "stored") -> dict[str, Any]:
    """What the derived scores depend on: the rows (uid, content) and the definitions."""
    n, x = con.execute(f"SELECT count(*), bit_xor(hash(uid, content_hash)) FROM {source}").fetchall()[0]
    return {"rows": int(n), "xor": str(x), "definitions": state_definitions()}


def layout(pool: Pool, files: list[str]) -> list[list[str | None]]:
    """The sample files in reading order, each with its version: what a positional join is aligned to."""
    versions = storage.versions(files)
    return [[pool.relative(f), versions.get(f)] for f in files]


def _meta(pool: Pool) -> dict[str, Any] | None:
    meta_url = pool.url("derived", "scores.json")
    if not storage.isfile(meta_url):
        return None
    try:
        meta = storage.read_json(meta_url)
    except Exception:  # noqa: BLE001 - a torn or foreign file: recompute rather than trust it
        return None
    return meta if isinstance(meta, dict) and storage.isfile(scores_url(pool, meta)) else None


def current(pool: Pool, files: list[str]) -> str | None:
    """The stored scores' URL when they are aligned to `files` (the pool's sample files, in reading order) as they
    are now, with today's definitions; None otherwise."""
    meta = _meta(pool)
    if meta is None or None in (v for _, v in meta.get("layout", [[None, None]])):
        return None
    defs = state_definitions()
    ok = meta.get("layout") == layout(pool, files) and meta.get("definitions") == defs
    return scores_url(pool, meta) if ok else None


def state_definitions() -> str:
    defs = json.dumps({k: [d.parts, d.weights] for k, d in DERIVED.items()}, sort_keys=True)
    return hashlib.sha256(f"{VERSION}{defs}{K}".encode()).hexdigest()


def percent_rank(x: np.ndarray) -> np.ndarray:
    """DuckDB's percent_rank() OVER (ORDER BY x NULLS FIRST): (rank - 1) / (n - 1), ties at their lowest rank,
    NaN (NULL) first."""
    n = len(x)
    key = np.where(np.isnan(x), -np.inf, x)
    nulls = np.isnan(x)
    order = np.argsort(key, kind="stable")
    ranked = key[order]
    first = np.searchsorted(ranked, key, side="left").astype(np.float64)
    first[nulls] = 0  # every NULL shares the first rank
    return first / max(1, n - 1)


def compute(con: duckdb.DuckDBPyConnection, available: set[str], layers: int) -> dict[str, np.ndarray]:
    """uid, bn_z and auto for every row of the `stored` view in its reading order, as the window definitions give
    them: the layers' spreads in one aggregate pass, bn_z as an expression of constants, the ranks in numpy."""
    from curate.scores import derived_parts

    if layers:
        sds = con.execute("SELECT " + ", ".join(f"stddev_pop(bn_layers[{i}])" for i in range(1, layers + 1))
                          + " FROM stored").fetchall()[0]  # fmt: skip
        terms = " + ".join(f"bn_layers[{i}] / ({(sd or 0.0)!r} + 1e-6)" for i, sd in enumerate(sds, 1))
        bn_z = f"(-({terms}) / {layers})::FLOAT"
    else:
        bn_z = "bn_score" if "bn_score" in available else "NULL::FLOAT"
    parts = derived_parts("auto", available, layers)
    cols = sorted({p for p, _ in parts} - {"bn_z"})
    t = con.execute(f"SELECT uid, {bn_z} AS bn_z{''.join(', ' + c for c in cols)} FROM stored").fetchnumpy()
    out = {"uid": np.asarray(t["uid"], np.int64), "bn_z": _floats(t["bn_z"])}
    if parts:
        total = sum(w for _, w in parts)
        fused = None
        for p, w in parts:
            term = w * percent_rank(_floats(t[p]).astype(np.float64))
            fused = term if fused is None else fused + term
        out["auto"] = (fused / total).astype(np.float32)
    else:
        out["auto"] = np.full(len(out["uid"]), np.nan, np.float32)
    return out


def _floats(col: Any) -> np.ndarray:
    """A fetched column as float32, NULL as NaN."""
    if isinstance(col, np.ma.MaskedArray):
        return col.astype(np.float32).filled(np.nan)
    return np.asarray(col, np.float32)


def smooth(uid: np.ndarray, auto: np.ndarray, neighbours: Callable[[], Any], batch: int = 65_536) -> np.ndarray:
    """auto_knn: the mean of auto over the sample and its mutual neighbours. `neighbours` yields (query uids,
    neighbour uids [n, K], -1 where the index had fewer). Only mutual edges count (j among i's K nearest and i
    among j's): a sample far from everything (noise, say) has the dense related cluster's hubs as its nearest
    neighbours, but is not theirs, so it keeps its own score; a sample with no mutual neighbour keeps auto."""
    order = np.argsort(uid, kind="stable")  # the rows in uid order, for lookups
    uid, auto = uid[order], auto[order]
    n = len(uid)
    graph = np.full((n, K), -1, np.int32)  # neighbour positions in uid order; 800 MB at 10M rows
    for q, nb in neighbours():
        qpos = np.searchsorted(uid, q)
        pos = np.searchsorted(uid, nb).clip(max=n - 1)  # uids are any int64, negative too; FAISS's none is -1
        ok = (nb != -1) & (uid[pos] == nb) & (pos != qpos[:, None])
        width = min(K, nb.shape[1])
        graph[qpos, :width] = np.where(ok, pos, -1)[:, :width]
    a = auto.astype(np.float64)
    out = a.copy()
    for start in range(0, n, batch):
        rows = np.arange(start, min(n, start + batch))
        g = graph[rows]  # [b, K]
        back = graph[g.clip(min=0)]  # [b, K, K]: each neighbour's own neighbours
        mutual = (g >= 0) & (back == rows[:, None, None]).any(axis=2)
        vals = np.where(mutual, a[g.clip(min=0)], 0.0)
        out[rows] = (a[rows] + vals.sum(1)) / (1 + mutual.sum(1))
    back_to = np.empty_like(out)
    back_to[order] = out  # the caller's row order
    return back_to.astype(np.float32)


def write(pool: Pool, con: duckdb.DuckDBPyConnection, files: list[str], available: set[str], layers: int,
          neighbours: Callable[[], Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Compute and store the derived scores of the pool as `con`'s `stored` view reads `files` (`neighbours`: the
    graph for auto_knn). Without a graph, a smoothed auto_knn of the same rows (a compaction moved them) is kept."""
    now = state(con)
    cols = compute(con, available, layers)
    old, smoothed = _meta(pool), neighbours is not None
    if smoothed:
        cols["auto_knn"] = smooth(cols["uid"], cols["auto"], neighbours)
    elif old and old.get("smoothed") and all(old.get(k) == v for k, v in now.items()):
        fs, path = storage.arrow_filesystem(scores_url(pool, old))
        prev = pq.read_table(path, columns=["uid", "auto_knn"], filesystem=fs)
        pu, pk = prev.column("uid").to_numpy(), prev.column("auto_knn").to_numpy()
        o = np.argsort(pu)
        cols["auto_knn"] = pk[o][np.searchsorted(pu[o], cols["uid"])]
        smoothed = True
    else:
        cols["auto_knn"] = cols["auto"]
    table = pa.table(
        {**{k: pa.array(cols[k], mask=np.isnan(cols[k])) for k in ("bn_z", "auto", "auto_knn")}, "uid": cols["uid"]}
    )  # NaN is NULL, as the window definitions give it
    info = {**now, "layout": layout(pool, files), "smoothed": smoothed, "k": K if smoothed else None}
    name = f"scores-{hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]}.parquet"
    storage.write_parquet(pool.url("derived", name), table, tag="derived")
    info["file"] = name
    storage.write_json(pool.url("derived", "scores.json"), info, tag="derived")
    for url in storage.glob(pool.url("derived", "scores-*.parquet")):  # earlier writes: nothing names them now
        if storage.name(url) != name:
            with contextlib.suppress(Exception):
                storage.remove(url)
    return info


def describe_knn(pool: Pool, reference: bool = False) -> str:
    """How auto_knn was computed for this pool, in words (selection.json, select's summary)."""
    if reference:
        return "auto with the references' share, not smoothed (the references already calibrate it)"
    meta = _meta(pool)
    if meta and meta.get("smoothed") and current(pool, pool.sample_files()):
        return f"auto averaged over each sample and its mutual {K} nearest neighbours in the pool's index"
    return "equal to auto: the pool has no neighbour graph for its current rows (run 'curate index' to add it)"
