"""Stage 2: `curate select`: a related subset of a pool. SQL filter -> strategy -> dedup.

`--where` and `--score` are checked to be single SQL expressions, then DuckDB evaluates them; a strategy
from curate/strategies.py picks uids (numpy over a few columns, or one DuckDB window query, never the
pool in pandas); dedup drops exact (content hash) or near (embedding cosine) duplicates; the picks are
joined back to the pool for selection.parquet, and selection.json records how they were made.

`weight` in selection.parquet is what the trainer multiplies each sample's loss by: the number of times
a with-replacement draw picked it, else 1. `prob` is the sampling probability of a weighted draw.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from curate.config import SelectConfig
from curate.derived import describe_knn
from curate.pool import Pool
from curate.query import connect
from curate.sqlcheck import expression
from curate.strategies import STRATEGIES, Context, Picked
from kdcore import storage
from kdcore.errors import UserError


@dataclass
class SelectResult:
    out: str
    rows: int
    candidates: int
    per_source: dict[str, int]
    per_class: dict[str, int]
    rel_entropy: float
    short_classes: dict[str, int]
    dedup_removed: int
    seconds: float


SELECTION_FILES = ("selection.parquet", "selection.json")


def select(cfg: SelectConfig) -> SelectResult:
    t0 = time.perf_counter()
    cfg.pool, cfg.out = storage.target(cfg.pool, "--pool"), storage.target(cfg.out, "--out")
    pool = Pool(cfg.pool)
    meta = pool.meta()
    storage.check_writable(cfg.out, "--out")
    if storage.inside(cfg.out, cfg.pool):
        raise UserError(f"--out {cfg.out} is inside the pool; selections live beside it")
    if storage.isfile(cfg.out):
        raise UserError(f"--out {cfg.out} is a file; give a directory")
    storage.check_only(cfg.out, SELECTION_FILES, "--out", "a selection")
    dedup = parse_dedup(cfg.dedup)
    strategy = STRATEGIES[cfg.strategy]
    con = connect(cfg.pool)
    if cfg.references and cfg.strategy != "near":  # references calibrate the score: ref_score, and auto uses it
        refs = embed_references(meta, cfg.references, unit_norm=False)
        con = connect(cfg.pool, reference=reference_scores(con, refs))
    where = f"WHERE ({expression(cfg.where, '--where', con)})" if cfg.where else ""
    if strategy.scored:
        expression(cfg.score, "--score", con)
    knn = {"auto_knn": describe_knn(pool, bool(cfg.references))} if strategy.scored and "auto_knn" in \
        cfg.score else {}  # fmt: skip
    ctx = Context(
        cfg,
        con,
        pool,
        meta,
        where,
        np.random.default_rng(cfg.seed),
        neighbours=SimpleNamespace(near=near, cluster=cluster, embed_references=embed_references),
    )
    try:
        picked = strategy.run(ctx)
        candidates = picked.candidates if picked.candidates is not None else _count(con, where)
    except duckdb.Error as e:
        raise UserError(f"SQL error in --where or --score: {str(e).strip().splitlines()[0]}") from None
    if candidates == 0:
        raise UserError("the filter leaves no samples" if where else "the pool has no samples")
    weight = np.ones(len(picked.uid), np.float32) if picked.weight is None else picked.weight.astype(np.float32)
    removed = 0
    if dedup is not None:
        keep = dedup_exact(con, picked.uid, picked.score) if dedup == "exact" else \
            dedup_near(con, picked.uid, picked.score, dedup)  # fmt: skip
        removed = len(keep) - int(keep.sum())
        prob = None if picked.prob is None else picked.prob[keep]
        picked = Picked(
            picked.uid[keep], picked.score[keep], weight[keep], prob, picked.short, picked.candidates, picked.info
        )
        weight = picked.weight
    table = _selection_table(con, picked, weight)
    short = {meta["classes"][c]: n for c, n in sorted(picked.short.items())}
    summary = write_selection(cfg, table, meta, pool, candidates, short, removed, {**knn, **(picked.info or {})})
    return SelectResult(storage.redact(cfg.out), table.num_rows, candidates, summary["per_source"],
                        summary["per_class"], summary["rel_entropy"], short, removed,
                        time.perf_counter() - t0)  # fmt: skip


def _count(con: duckdb.DuckDBPyConnection, where: str) -> int:
    return int(con.execute(f"SELECT count(*) FROM samples {where}").fetchall()[0][0])


# ------------------------------------------------------------------------------------------ near, diverse


def near(pool: Pool, con: duckdb.DuckDBPyConnection, refs: np.ndarray, uids: np.ndarray, n: int, k: int,
         restrict: bool, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """kNN expansion: each reference pulls its nearest pool samples (restricted to `uids`, sorted, when the
    pool was filtered); candidates are ranked by the cosine similarity to their k-th nearest reference.
    Returns (uids, scores) of the best n."""
    from curate.index import read_index

    index = read_index(pool)
    import faiss

    k = max(1, min(k, len(refs)))
    per_ref = min(len(uids), max(k, math.ceil(4 * n / len(refs))))
    ivf = _ivf(index)
    sel = faiss.IDSelectorBatch(np.ascontiguousarray(uids, dtype=np.int64)) if restrict else None
    if ivf is not None:  # a restricted search probes wider (by 1/allowed share, at most 8x) to find enough
        share = len(uids) / max(1, index.ntotal)
        base = nprobe or ivf.nprobe
        probes = min(ivf.nlist, math.ceil(base / max(share, 0.125))) if restrict else base
        params = faiss.SearchParametersIVF(sel=sel, nprobe=probes) if sel else faiss.SearchParametersIVF(nprobe=probes)
    else:
        params = faiss.SearchParameters(sel=sel) if sel else None
    _, found = index.search(refs, per_ref, params=params)
    cand = np.unique(found[found != -1])
    pos = np.searchsorted(uids, cand)
    ok = (pos < len(uids)) & (uids[np.minimum(pos, len(uids) - 1)] == cand)
    chosen = uids[pos[ok]]  # ids outside the filter can never pass (the selector); this is a second guard
    vecs = embeddings(con, chosen)
    ref_index = faiss.IndexFlatIP(refs.shape[1])
    ref_index.add(refs)
    sims, _ = ref_index.search(vecs, k)
    kth = sims[:, k - 1].astype(np.float64)
    order = np.lexsort((chosen, -kth))[:n]
    return chosen[order], kth[order]


def cluster(con: duckdb.DuckDBPyConnection, uids: np.ndarray, where: str, clusters: int, seed: int
            ) -> tuple[np.ndarray, int]:  # fmt: skip
    """FAISS spherical k-means on a sample of the filtered embeddings; every candidate's cluster."""
    import faiss

    clusters = max(1, min(clusters, len(uids) // 10 or 1))
    rng = np.random.default_rng(seed)
    train_pos = np.sort(rng.choice(len(uids), size=min(len(uids), 256 * clusters), replace=False))
    train = embeddings(con, uids[train_pos])
    km = faiss.Kmeans(train.shape[1], clusters, niter=20, seed=seed, spherical=True)
    km.train(train)
    assign = np.full(len(uids), -1, np.int64)
    for batch in con.sql(f"SELECT uid, embedding FROM samples {where}").to_arrow_reader(65_536):
        bu = batch.column("uid").to_numpy()
        vecs = batch.column("embedding").flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        vecs = vecs.reshape(len(bu), -1)
        faiss.normalize_L2(vecs)
        _, a = km.index.search(vecs, 1)
        pos = np.searchsorted(uids, bu)
        ok = (pos < len(uids)) & (uids[np.minimum(pos, len(uids) - 1)] == bu)
        assign[pos[ok]] = a[ok, 0]
    return np.maximum(assign, 0), clusters


# ------------------------------------------------------------------------------------------ dedup


def parse_dedup(spec: str | None) -> str | float | None:
    if not spec or spec == "none":
        return None
    if spec == "exact":
        return "exact"
    if spec.startswith("near:"):
        try:
            cos = float(spec[5:])
        except ValueError:
            cos = -1.0
        if 0 < cos <= 1:
            return cos
    raise UserError(f"--dedup must be exact or near:COS with 0 < COS <= 1 (e.g. near:0.98), got {spec!r}")


def dedup_exact(con: duckdb.DuckDBPyConnection, uids: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Keep, per content_hash, the highest-scoring sample (lowest uid on ties)."""
    con.register("_sel", {"uid": uids, "score": score})  # a dict of arrays: no pandas, no copy
    kept = con.execute(
        "SELECT uid FROM (SELECT s.uid, row_number() OVER (PARTITION BY s.content_hash ORDER BY x.score DESC, s.uid)"
        " AS r FROM samples s JOIN _sel x USING (uid)) WHERE r = 1"
    ).fetchnumpy()["uid"]
    con.unregister("_sel")
    return np.isin(uids, np.asarray(kept, dtype=np.int64))


def dedup_near(con: duckdb.DuckDBPyConnection, uids: np.ndarray, score: np.ndarray, cos: float) -> np.ndarray:
    """Greedy in score order: a sample is dropped when a kept, better-ranked sample has cosine >= cos with it."""
    import faiss

    vecs = embeddings(con, uids)
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    order = np.lexsort((uids, -score))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    keep = np.ones(len(uids), bool)
    for start in range(0, len(order), 4096):
        block = order[start : start + 4096]
        lims, _, ids = index.range_search(vecs[block], cos - 1e-6)
        for j, i in enumerate(block):
            if keep[i]:
                nbrs = ids[lims[j] : lims[j + 1]]
                keep[nbrs[rank[nbrs] > rank[i]]] = False
    return keep


# ------------------------------------------------------------------------------------------ references


def reference_scores(con: duckdb.DuckDBPyConnection, refs: np.ndarray, batch: int = 65_536) -> pa.Table:
    """ref_score per pool sample: minus the Euclidean distance from its embedding to the nearest reference's
    (FAISS, exact), streamed over the pool."""
    import faiss

    index = faiss.IndexFlatL2(refs.shape[1])
    index.add(refs)
    uids, scores = [], []
    reader = con.sql("SELECT uid, embedding FROM stored").to_arrow_reader(batch)
    for rb in reader:
        emb = rb.column(1)
        vecs = np.ascontiguousarray(emb.flatten().to_numpy(zero_copy_only=False).reshape(len(rb), -1), np.float32)
        dist, _ = index.search(vecs, 1)
        uids.append(rb.column(0).to_numpy())
        scores.append(-np.sqrt(np.maximum(dist[:, 0], 0)))
    return pa.table({"uid": np.concatenate(uids), "ref_score": np.concatenate(scores).astype(np.float32)})


def embed_references(meta: dict[str, Any], specs: list[str], unit_norm: bool = True) -> np.ndarray:
    """Embed reference images with the pool's own teacher and preprocessing; float32, L2-normalised unless
    `unit_norm` is False."""
    import faiss
    import torch

    from curate.scoring import UnitBatches
    from curate.sources import parse_sources
    from curate.teacher import ScoringModel
    from kdcore import models
    from kdcore.tensors import Normalize
    from kdcore.view import InputSpec

    teacher = models.load(meta["teacher"]["spec"])
    if teacher.fingerprint != meta["teacher"]["sha256"]:
        raise UserError("the teacher's weights changed since the pool was scored; references would not match it")
    spec = InputSpec.from_dict(meta["input"])
    scorer = ScoringModel(teacher.model, meta["settings"]["embed_layer"], teacher.scripted)
    sources = parse_sources(specs)
    units = [u for src in sources.values() for u in src.units()]
    normalize = Normalize(spec)
    out = []
    with torch.inference_mode():
        for chunk in UnitBatches(sources, units, spec, 256, 64_000_000):
            if "failed" in chunk:
                raise UserError(f"reference images: {chunk['failed']}")
            if len(chunk["keys"]):
                out.append(scorer(normalize(torch.as_tensor(chunk["pixels"]))).embedding.numpy())
    scorer.close()
    if not out:
        raise UserError("the reference sources hold no readable image")
    refs = np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
    if unit_norm:
        faiss.normalize_L2(refs)
    return refs


# ------------------------------------------------------------------------------------------ output


def write_selection(cfg: SelectConfig, table: pa.Table, meta: dict[str, Any], pool: Pool, candidates: int,
                    short: dict[str, int], removed: int, info: dict[str, Any] | None = None
                    ) -> dict[str, Any]:  # fmt: skip
    classes = meta["classes"]
    pred = table.column("pred").to_numpy()
    hist = np.bincount(pred.astype(np.int64), minlength=len(classes))
    sources, counts = np.unique(table.column("source").to_numpy(zero_copy_only=False), return_counts=True)
    summary: dict[str, Any] = {
        "pool": storage.redact(storage.absolute(pool.root)),
        "pool_id": pool.identity(meta),
        "teacher_sha256": meta["teacher"]["sha256"],
        "classes": classes,
        "where": cfg.where,
        "strategy": cfg.strategy,
        "params": {k: v for k, v in asdict(cfg).items() if k not in ("pool", "out", "where", "strategy", "seed")},
        "seed": cfg.seed,
        "score": "near" if cfg.strategy == "near" else cfg.score,
        "weight": "loss multiplier for the trainer: times drawn (weighted --replace), else 1",
        "candidates": candidates,
        "rows": table.num_rows,
        "dedup_removed": removed,
        "short_classes": short,
        "per_source": {str(s): int(c) for s, c in zip(sources, counts, strict=True)},
        "per_class": {classes[i]: int(c) for i, c in enumerate(hist)},
        "rel_entropy": rel_entropy(hist),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(info or {}),  # what the strategy decided (related: its threshold and caps)
    }
    storage.makedirs(cfg.out)
    storage.write_parquet(storage.join(cfg.out, "selection.parquet"), table, tag="select")
    storage.write_json(storage.join(cfg.out, "selection.json"), summary, tag="select")
    return summary


def rel_entropy(counts: np.ndarray) -> float:
    """H(p)/log C of a class histogram: 1 = perfectly balanced, 0 = a single class."""
    c = np.asarray(counts, dtype=np.float64)
    if c.sum() == 0 or len(c) < 2:
        return 0.0
    p = c[c > 0] / c.sum()
    return round(float(-(p * np.log(p)).sum() / math.log(len(c))), 6)


def _selection_table(con: duckdb.DuckDBPyConnection, picked: Picked, weight: np.ndarray) -> pa.Table:
    cols = {"uid": picked.uid, "weight": weight, "score": picked.score.astype(np.float32)}
    if picked.prob is not None:
        cols["prob"] = picked.prob.astype(np.float32)
    con.register("_picked", cols)
    extra = ", p.prob" if picked.prob is not None else ""
    table = con.sql(
        "SELECT s.uid, s.sample_id, s.source, s.pred, s.label, p.weight, p.score" + extra + " FROM samples s "
        "JOIN _picked p USING (uid) QUALIFY row_number() OVER (PARTITION BY s.uid) = 1 ORDER BY s.uid"
    ).to_arrow_table()
    con.unregister("_picked")
    return table


def embeddings(con: duckdb.DuckDBPyConnection, uids: np.ndarray) -> np.ndarray:
    """L2-normalised embeddings of `uids`, in that order."""
    import faiss

    con.register("_want", {"uid": uids, "pos": np.arange(len(uids))})
    t = con.sql("SELECT w.pos, s.embedding FROM samples s JOIN _want w USING (uid) "
                "QUALIFY row_number() OVER (PARTITION BY w.pos) = 1 ORDER BY w.pos").to_arrow_table()  # fmt: skip
    con.unregister("_want")
    emb = t.column("embedding").combine_chunks()
    vecs = np.ascontiguousarray(emb.flatten().to_numpy(zero_copy_only=False).reshape(len(t), -1), dtype=np.float32)
    faiss.normalize_L2(vecs)
    return vecs


def _ivf(index: Any) -> Any:
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def read_selection(path: str) -> tuple[pa.Table, dict[str, Any]]:
    sel = storage.join(path, "selection.parquet")
    if not storage.isfile(sel):
        raise UserError(f"{path} is not a selection (no selection.parquet); make one with 'curate select'")
    import io

    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(sel))), storage.read_json(storage.join(path, "selection.json"))
