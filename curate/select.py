"""Stage 2: select a related subset of a pool.  SQL filter -> strategy -> dedup.

The filter and the columns a strategy needs come out of DuckDB as Arrow (a few numeric columns, never
the whole pool in pandas); strategies are vectorised numpy over those columns, sorted by uid first so
every result is a function of the pool, the options and `--seed` alone.

    threshold       score >= --threshold, or the top --fraction by score
    top-per-class   the --per-class K best by score within each predicted class (short classes reported)
    weighted        draw --n with probability ∝ softmax(score/τ) (or score^γ), with or without replacement
                    (Begon & Geurts 2022: preferential sampling by relatedness)
    balanced        --n in total, predicted classes equalised (water-filling when a class is short)
    random          --n drawn uniformly without replacement (the blind-distillation baseline)
    near            kNN expansion from reference images through the pool's FAISS index, restricted to the
                    filtered uids; score = cosine similarity to the k-th nearest reference (deep kNN)
    diverse         k-means on the embeddings, equal quotas per cluster, best by score within a cluster

`weight` in selection.parquet is what the trainer multiplies each sample's loss by: the number of times
a with-replacement draw picked it, else 1. `prob` is the sampling probability of a weighted draw.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import UserError
from curate.pool import Pool, write_json_atomic, write_parquet_atomic
from curate.query import connect

STRATEGIES = ("threshold", "top-per-class", "weighted", "balanced", "random", "near", "diverse")


@dataclass
class SelectConfig:
    pool: str
    strategy: str
    out: str
    where: str | None = None
    score: str = "confidence"  # a column of samples or any SQL expression over it; higher = better
    n: int | None = None
    per_class: int | None = None
    threshold: float | None = None
    fraction: float | None = None
    temperature: float = 1.0  # weighted: p ∝ softmax(score / temperature)
    gamma: float | None = None  # weighted: p ∝ score ** gamma instead (scores must be >= 0)
    replace: bool = False
    references: list[str] = field(default_factory=list)  # near: source specs of reference images
    k: int = 10  # near: the k-th nearest reference defines the score
    nprobe: int | None = None  # near: IVF lists probed (default: the index's own, widened for a filter)
    clusters: int = 64  # diverse
    dedup: str | None = None  # exact | near:COS
    seed: int = 0


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


# ------------------------------------------------------------------------------------------ entry


def select(cfg: SelectConfig) -> SelectResult:
    t0 = time.perf_counter()
    if cfg.strategy not in STRATEGIES:
        raise UserError(f"unknown --strategy {cfg.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    pool = Pool(cfg.pool)
    meta = pool.meta()
    out = Path(cfg.out)
    if out.resolve().is_relative_to(pool.root.resolve()):
        raise UserError(f"--out {out} is inside the pool; selections live beside it")
    dedup = parse_dedup(cfg.dedup)
    con = connect(cfg.pool)
    where = f"WHERE ({cfg.where})" if cfg.where else ""
    score_sql = "0.0" if cfg.strategy == "near" else cfg.score
    # strategies that draw at random need a canonical row order (by uid) for --seed to mean the same draw
    ordered = cfg.strategy in ("weighted", "balanced", "random", "near", "diverse")
    cols = _fetch(con, f"SELECT uid, pred, ({score_sql})::DOUBLE AS score FROM samples {where}", ordered)
    candidates = len(cols["uid"])
    if candidates == 0:
        raise UserError("the filter leaves no samples" if cfg.where else "the pool has no samples")
    if cfg.strategy != "near":
        _drop_null_scores(cols, cfg.score)

    n_classes = len(meta["classes"])
    rng = np.random.default_rng(cfg.seed)
    short: dict[str, int] = {}
    prob = None
    if cfg.strategy == "threshold":
        idx, weight = threshold(cols["score"], cfg.threshold, cfg.fraction, cols["uid"]), None
    elif cfg.strategy == "top-per-class":
        k = _need(cfg.per_class, "--per-class K")
        idx, counts = top_per_class(cols["pred"], cols["score"], k, cols["uid"])
        short = {meta["classes"][c]: int(counts[c]) for c in range(n_classes) if counts[c] < k}
        weight = None
    elif cfg.strategy == "weighted":
        n = _need(cfg.n, "--n N")
        p = draw_probabilities(cols["score"], cfg.temperature, cfg.gamma)
        idx, weight = weighted_draw(p, n, cfg.replace, rng)
        prob = p[idx]
    elif cfg.strategy == "balanced":
        n = _need(cfg.n, "--n N")
        idx, weight = balanced(cols["pred"], n, n_classes, rng), None
    elif cfg.strategy == "random":  # the uniform baseline: every candidate equally likely, no repeats
        n = _need(cfg.n, "--n N")
        idx, weight = np.sort(rng.choice(candidates, min(n, candidates), replace=False)), None
    elif cfg.strategy == "near":
        n = _need(cfg.n, "--n N")
        if not cfg.references:
            raise UserError("--strategy near needs --reference NAME=SPEC (images of the target task)")
        refs = embed_references(meta, cfg.references)
        idx, near_score = near(pool, con, refs, cols["uid"], n, cfg.k, restrict=bool(cfg.where), nprobe=cfg.nprobe)
        cols["score"][idx] = near_score
        weight = None
    else:  # diverse
        n = _need(cfg.n, "--n N")
        idx, weight = diverse(con, cols, where, n, cfg.clusters, cfg.seed), None

    weight = np.ones(len(idx), np.float32) if weight is None else weight.astype(np.float32)
    removed = 0
    if dedup is not None:
        keep = (
            dedup_exact(con, cols["uid"][idx], cols["score"][idx])
            if dedup == "exact"
            else dedup_near(con, cols["uid"][idx], cols["score"][idx], dedup)
        )
        removed = len(idx) - int(keep.sum())
        idx, weight = idx[keep], weight[keep]
        prob = prob[keep] if prob is not None else None

    table = _selection_table(con, cols, idx, weight, prob, cfg)
    summary = write_selection(out, table, cfg, meta, pool, candidates, short, removed)
    return SelectResult(
        out=str(out),
        rows=table.num_rows,
        candidates=candidates,
        per_source=summary["per_source"],
        per_class=summary["per_class"],
        rel_entropy=summary["rel_entropy"],
        short_classes=short,
        dedup_removed=removed,
        seconds=time.perf_counter() - t0,
    )


# ------------------------------------------------------------------------------------------ strategies


def threshold(score: np.ndarray, t: float | None, fraction: float | None, uid: np.ndarray) -> np.ndarray:
    """Indices with score >= t, or of the top `fraction` (ties: lower uid first)."""
    if (t is None) == (fraction is None):
        raise UserError("--strategy threshold needs exactly one of --threshold T or --fraction F")
    if t is not None:
        return np.flatnonzero(score >= t)
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction must be in (0, 1], got {fraction}")
    k = math.ceil(fraction * len(score))
    order = np.lexsort((uid, -score))
    return np.sort(order[:k])


def top_per_class(pred: np.ndarray, score: np.ndarray, k: int, uid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The k best by score within each predicted class (ties: lower uid first); returns (indices,
    available count per class). A partition per class, no full sort: O(n) per class."""
    counts = np.bincount(pred.astype(np.int64), minlength=int(pred.max(initial=0)) + 1)
    picked = []
    for c in np.flatnonzero(counts):
        members = np.flatnonzero(pred == c)
        if len(members) <= k:
            picked.append(members)
            continue
        s = score[members]
        kth = -np.partition(-s, k - 1)[k - 1]
        above = members[s > kth]
        tie = members[s == kth]
        picked += [above, tie[np.argsort(uid[tie], kind="stable")[: k - len(above)]]]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64), counts


def draw_probabilities(score: np.ndarray, temperature: float = 1.0, gamma: float | None = None) -> np.ndarray:
    """p ∝ softmax(score / temperature), or p ∝ score ** gamma."""
    if gamma is not None:
        if (score < 0).any():
            raise UserError("--gamma needs non-negative scores; use --temperature (softmax) for signed scores")
        w = np.power(score, gamma, dtype=np.float64)
    else:
        if temperature <= 0:
            raise UserError(f"--temperature must be > 0, got {temperature}")
        z = score / temperature
        w = np.exp(z - z.max())
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        raise UserError("the weights of the draw sum to zero; lower --gamma or raise --temperature")
    return w / total


def weighted_draw(p: np.ndarray, n: int, replace: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(unique indices, times drawn). Without replacement: Efraimidis–Spirakis keys u^(1/p), top n."""
    if replace:
        counts = rng.multinomial(n, p)
        idx = np.flatnonzero(counts)
        return idx, counts[idx].astype(np.float32)
    positive = int((p > 0).sum())
    if n > positive:
        raise UserError(f"cannot draw {n:,} without replacement from {positive:,} samples of non-zero weight")
    with np.errstate(divide="ignore"):
        keys = np.log(rng.random(len(p))) / p  # log u / p: larger is better, -inf where p == 0
    idx = np.argpartition(-keys, n - 1)[:n] if n < len(p) else np.arange(len(p))
    return np.sort(idx), np.ones(n, np.float32)


def balanced(pred: np.ndarray, n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """n samples, predicted classes as equal as the pool allows, uniformly at random within a class."""
    counts = np.bincount(pred.astype(np.int64), minlength=n_classes)
    quota = water_fill(counts, min(n, len(pred)))
    keys = rng.random(len(pred))
    order = np.lexsort((keys, pred))
    p = pred[order]
    rank = np.arange(len(p)) - np.searchsorted(p, p, side="left")
    return np.sort(order[rank < quota[p]])


def water_fill(available: np.ndarray, n: int) -> np.ndarray:
    """Quotas summing to min(n, available.sum()), as equal as possible, never above `available`."""
    quota = np.zeros_like(available)
    left = min(n, int(available.sum()))
    open_ = available > 0
    while left > 0 and open_.any():
        share = max(1, left // int(open_.sum()))
        room = available - quota
        add = np.where(open_, np.minimum(room, share), 0)
        if add.sum() > left:  # hand out the last few one by one, lowest class first
            cum = np.cumsum(add)
            add = np.where(cum <= left, add, np.maximum(0, left - (cum - add)))
        quota += add
        left -= int(add.sum())
        open_ = quota < available
    return quota


def near(
    pool: Pool,
    con: duckdb.DuckDBPyConnection,
    refs: np.ndarray,
    uids: np.ndarray,
    n: int,
    k: int,
    restrict: bool,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """kNN expansion: each reference pulls its nearest pool samples (restricted to `uids` when the pool
    was filtered); candidates are ranked by the cosine similarity to their k-th nearest reference."""
    path = pool.index_dir / "embeddings.faiss"
    if not path.is_file():
        raise UserError(f"pool {pool.root} has no index; run 'curate index {pool.root}' first")
    index = faiss.read_index(str(path))
    k = max(1, min(k, len(refs)))
    per_ref = min(len(uids), max(k, math.ceil(4 * n / len(refs))))
    ivf = _ivf(index)
    sel = faiss.IDSelectorBatch(np.ascontiguousarray(uids, dtype=np.int64)) if restrict else None
    if ivf is not None:  # a restricted search probes wider (by 1/allowed share, at most 8x) to find enough
        share = len(uids) / max(1, index.ntotal)
        base = nprobe or ivf.nprobe
        nprobe = min(ivf.nlist, math.ceil(base / max(share, 0.125))) if restrict else base
        params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe) if sel else faiss.SearchParametersIVF(nprobe=nprobe)
    else:
        params = faiss.SearchParameters(sel=sel) if sel else None
    _, found = index.search(refs, per_ref, params=params)
    cand = np.unique(found[found != -1])
    pos = np.searchsorted(uids, cand)
    ok = (pos < len(uids)) & (uids[np.minimum(pos, len(uids) - 1)] == cand)
    pos = pos[ok]  # ids outside the filter can never pass (the selector), this is a second guard
    vecs = _embeddings(con, uids[pos])
    ref_index = faiss.IndexFlatIP(refs.shape[1])
    ref_index.add(refs)
    sims, _ = ref_index.search(vecs, k)
    kth = sims[:, k - 1]
    order = np.lexsort((uids[pos], -kth))[:n]
    return pos[order], kth[order]


def diverse(con: duckdb.DuckDBPyConnection, cols: dict, where: str, n: int, clusters: int, seed: int) -> np.ndarray:
    """k-means (FAISS) on the filtered embeddings, equal quotas per cluster, best by score in a cluster."""
    uids = cols["uid"]
    clusters = max(1, min(clusters, len(uids) // 10 or 1))
    rng = np.random.default_rng(seed)
    train_pos = np.sort(rng.choice(len(uids), size=min(len(uids), 256 * clusters), replace=False))
    train = _embeddings(con, uids[train_pos])
    km = faiss.Kmeans(train.shape[1], clusters, niter=20, seed=seed, spherical=True)
    km.train(train)
    assign = np.empty(len(uids), np.int64)
    rel = con.sql(f"SELECT uid, embedding FROM samples {where}").to_arrow_reader(65_536)
    for batch in rel:
        bu = batch.column("uid").to_numpy()
        emb = batch.column("embedding")
        vecs = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(bu), -1)
        faiss.normalize_L2(vecs)
        _, a = km.index.search(vecs, 1)
        assign[np.searchsorted(uids, bu)] = a[:, 0]
    quota = water_fill(np.bincount(assign, minlength=clusters), n)
    order = np.lexsort((np.arange(len(uids)), -cols["score"], assign))
    a = assign[order]
    rank = np.arange(len(a)) - np.searchsorted(a, a, side="left")
    return np.sort(order[rank < quota[a]])


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
    con.register("_sel", pa.table({"uid": uids, "score": score}))
    kept = con.execute(
        "SELECT uid FROM (SELECT s.uid, row_number() OVER (PARTITION BY s.content_hash ORDER BY x.score DESC, s.uid)"
        " AS r FROM samples s JOIN _sel x USING (uid)) WHERE r = 1"
    ).fetchnumpy()["uid"]
    con.unregister("_sel")
    return np.isin(uids, np.asarray(kept, dtype=np.int64))


def dedup_near(con: duckdb.DuckDBPyConnection, uids: np.ndarray, score: np.ndarray, cos: float) -> np.ndarray:
    """Greedy in score order: a sample is dropped when a kept, better-ranked sample has cosine >= cos with it."""
    vecs = _embeddings(con, uids)
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


def embed_references(meta: dict[str, Any], specs: list[str]) -> np.ndarray:
    """Embed reference images with the pool's own teacher and preprocessing; L2-normalised float32."""
    import torch

    from curate.score import UnitBatches
    from curate.scores import ScoringModel
    from curate.sources import parse_source
    from distill import models

    teacher = models.load(meta["teacher"]["spec"])
    if teacher.fingerprint != meta["teacher"]["sha256"]:
        raise UserError("the teacher's weights changed since the pool was scored; references would not match it")
    spec = models.InputSpec.from_dict(meta["input"])
    scorer = ScoringModel(teacher.model, meta["settings"]["embed_layer"], teacher.scripted)
    sources = {}
    for s in specs:
        src = parse_source(s)
        sources[src.name] = src
    units = [u for src in sources.values() for u in src.units()]
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    out = []
    with torch.inference_mode():
        for chunk in UnitBatches(sources, units, spec, 256, 64_000_000):
            if "failed" in chunk:
                raise UserError(f"reference images: {chunk['failed']}")
            if len(chunk["keys"]):
                x = torch.as_tensor(chunk["pixels"]).float().div(255).sub(mean).div(std)
                out.append(scorer(x).embedding.numpy())
    scorer.close()
    if not out:
        raise UserError("the reference sources hold no readable image")
    refs = np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
    faiss.normalize_L2(refs)
    return refs


# ------------------------------------------------------------------------------------------ output


def write_selection(
    out: Path,
    table: pa.Table,
    cfg: SelectConfig,
    meta: dict[str, Any],
    pool: Pool,
    candidates: int,
    short: dict[str, int],
    removed: int,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    classes = meta["classes"]
    pred = table.column("pred").to_numpy()
    hist = np.bincount(pred.astype(np.int64), minlength=len(classes))
    sources, counts = np.unique(table.column("source").to_numpy(zero_copy_only=False), return_counts=True)
    summary: dict[str, Any] = {
        "pool": str(pool.root.resolve()),
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
    }
    write_parquet_atomic(out / "selection.parquet", table)
    write_json_atomic(out / "selection.json", summary)
    return summary


def rel_entropy(counts: np.ndarray) -> float:
    """H(p)/log C of a class histogram: 1 = perfectly balanced, 0 = a single class."""
    c = np.asarray(counts, dtype=np.float64)
    if c.sum() == 0 or len(c) < 2:
        return 0.0
    p = c[c > 0] / c.sum()
    return round(float(-(p * np.log(p)).sum() / math.log(len(c))), 6)


def _selection_table(
    con: duckdb.DuckDBPyConnection, cols: dict, idx: np.ndarray, weight: np.ndarray, prob: np.ndarray | None, cfg
) -> pa.Table:
    picked = {"uid": cols["uid"][idx], "weight": weight, "score": cols["score"][idx]}
    if prob is not None:
        picked["prob"] = prob
    con.register("_picked", pa.table(picked))
    extra = ", p.prob" if prob is not None else ""
    table = con.sql(
        "SELECT s.uid, s.sample_id, s.source, s.pred, s.label, p.weight, p.score" + extra +
        " FROM samples s JOIN _picked p USING (uid) ORDER BY s.uid"
    ).to_arrow_table()  # fmt: skip
    con.unregister("_picked")
    return table.cast(
        pa.schema(
            [f if f.name not in ("weight", "score", "prob") else pa.field(f.name, pa.float32()) for f in table.schema]
        )
    )


def _fetch(con: duckdb.DuckDBPyConnection, query: str, ordered: bool) -> dict[str, np.ndarray]:
    try:
        table = con.sql(query).to_arrow_table()
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"SQL error in --where or --score: {first}") from None
    uid = table.column("uid").to_numpy()
    order = np.argsort(uid, kind="stable") if ordered else slice(None)
    cols = {
        "uid": uid[order],
        "pred": table.column("pred").to_numpy()[order].astype(np.int16),
        "score": table.column("score").to_numpy(zero_copy_only=False)[order].astype(np.float64),
    }
    if ordered and len(uid) > 1 and (np.diff(cols["uid"]) == 0).any():
        raise UserError("the pool holds duplicate uids (the same sample_id twice); rescore into a fresh pool")
    return cols


def _drop_null_scores(cols: dict, score: str) -> None:
    bad = np.isnan(cols["score"])
    if bad.all():
        raise UserError(f"--score {score} is null for every sample (e.g. bn_score of a teacher without BatchNorm)")
    if bad.any():
        for k in cols:
            cols[k] = cols[k][~bad]


def _embeddings(con: duckdb.DuckDBPyConnection, uids: np.ndarray) -> np.ndarray:
    """L2-normalised embeddings of `uids`, in that order."""
    con.register("_want", pa.table({"uid": uids, "pos": np.arange(len(uids))}))
    t = con.sql("SELECT w.pos, s.embedding FROM samples s JOIN _want w USING (uid) ORDER BY w.pos").to_arrow_table()
    con.unregister("_want")
    emb = t.column("embedding").combine_chunks()
    vecs = np.ascontiguousarray(emb.flatten().to_numpy(zero_copy_only=False).reshape(len(t), -1), dtype=np.float32)
    faiss.normalize_L2(vecs)
    return vecs


def _ivf(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _need(value: int | None, what: str) -> int:
    if value is None or value < 1:
        raise UserError(f"this strategy needs {what} (a positive number)")
    return int(value)


def read_selection(path: str) -> tuple[pa.Table, dict[str, Any]]:
    d = Path(path)
    if not (d / "selection.parquet").is_file():
        raise UserError(f"{path} is not a selection (no selection.parquet); make one with 'curate select'")
    return pq.read_table(d / "selection.parquet"), json.loads((d / "selection.json").read_text())
