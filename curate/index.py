"""Stage 1b: a FAISS index over the pool's embeddings, chosen under a memory budget.

Vectors are L2-normalised and searched by inner product (cosine). The FAISS ids are the pool's
uids. `auto` picks an exact flat index while it fits the budget and the pool is small, IVF-PQ
otherwise; HNSW on request. Embeddings stream from Parquet in batches: IVF-PQ is trained on a
sample and filled batch by batch. Recall@10 against exact search is measured on sampled queries
and written beside the index in embeddings.json.

`per_source`: the index is trained once (index/trained.faiss, kept), each source is filled into its
own sub-index (index/sources/NAME.faiss, rebuilt only when that source's files changed), and the
sub-indexes are merged into embeddings.faiss (FAISS checks that they share the trained quantizer).
Adding a source to a large pool then encodes only the new source; sub-indexes can be built apart.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow.dataset as ds

from curate import progress
from curate.errors import UserError
from curate.pool import Pool, write_json_atomic

FLAT_MAX_ROWS = 2_000_000
BATCH_ROWS = 65_536


@dataclass
class IndexResult:
    path: str
    kind: str
    factory: str
    rows: int
    dim: int
    recall_at_10: float | None  # None when only sub-indexes were built (--sources)
    seconds: float
    bytes: int


def parse_memory(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(f"cannot read memory budget {text!r}; write e.g. 512MB or 4GB")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_"))


def embedding_batches(pool: Pool, rows: int = BATCH_ROWS, files: list[Path] | None = None):
    """(uids int64, float32 L2-normalised vectors) batches over complete units (or over `files`)."""
    files = [str(p) for p in (pool.sample_files() if files is None else files)]
    if not files:
        raise UserError(f"pool {pool.root} has no scored units; run 'curate score' first")
    dataset = ds.dataset(files, format="parquet")
    # bounded read-ahead: the default buffers dozens of row groups, GiBs of embeddings on a large pool
    for batch in dataset.to_batches(
        columns=["uid", "embedding"], batch_size=rows, batch_readahead=2, fragment_readahead=1
    ):
        if batch.num_rows == 0:
            continue
        emb = batch.column("embedding")
        dim = emb.type.list_size
        vecs = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
        faiss.normalize_L2(vecs)
        yield batch.column("uid").to_numpy(), vecs


def choose_kind(n: int, dim: int, budget: int, kind: str) -> tuple[str, str]:
    """(kind, FAISS factory string) for n vectors of dim under `budget` bytes."""
    flat_bytes = n * (dim * 4 + 8)
    if kind == "auto":
        kind = "flat" if flat_bytes <= budget and n <= FLAT_MAX_ROWS else "ivf-pq"
    if kind == "flat":
        if flat_bytes > budget:
            raise UserError(f"a flat index needs {flat_bytes / 2**30:.1f} GiB, over --memory; use --kind ivf-pq")
        return kind, "IDMap2,Flat"
    if kind == "hnsw":
        return kind, "IDMap2,HNSW32,Flat"
    if kind == "ivf-pq":
        if n < 1000:
            raise UserError(f"IVF-PQ needs at least 1,000 vectors to train, the pool has {n}; use --kind flat")
        # 4·sqrt(n) lists, at most 4,096 below 50M vectors (coarse assignment is n·nlist·d flops: minutes on a
        # few cores past that); beyond, up to 65,536 lists behind an HNSW coarse quantizer
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39, 4096 if n <= 50_000_000 else 65536))
        coarse = f"IVF{nlist}_HNSW32" if nlist > 4096 else f"IVF{nlist}"
        # sub-vectors of at least 2 dims: 1-dim sub-quantizers train ~20x slower in FAISS and buy little recall
        fits = [m for m in range(1, min(64, dim // 2) + 1) if dim % m == 0 and n * (m + 8) <= budget]
        if not fits:
            raise UserError(f"{n:,} vectors do not fit --memory {budget / 2**30:.1f} GiB even as 1-byte codes")
        nbits = max(4, min(8, int(math.log2(min(n, 500_000) / 39))))  # enough points per PQ centroid
        return kind, f"{coarse},PQ{fits[-1]}x{nbits}"
    raise UserError(f"unknown --kind {kind!r}; use auto, flat, ivf-pq or hnsw")


def index(
    pool_dir: str,
    kind: str = "auto",
    memory: str = "4GB",
    queries: int = 500,
    seed: int = 0,
    per_source: bool = False,
    retrain: bool = False,
    sources: list[str] | None = None,
    show_progress: bool = True,
) -> IndexResult:
    """Build pool/index/embeddings.faiss (+ embeddings.json) from the pool's embeddings.

    With `sources` (per-source only), build just those sources' sub-indexes and stop before the merge, so
    machines sharing the pool's storage can each take some sources; a final run without it merges them."""
    t0 = time.perf_counter()
    pool = Pool(pool_dir)
    meta = pool.meta()
    files = pool.sample_files()
    n = ds.dataset([str(f) for f in files], format="parquet").count_rows() if files else 0
    if n == 0:
        raise UserError(f"pool {pool.root} has no scored samples; run 'curate score' first")
    dim = int(meta["embedding"]["dim"])
    kind, factory = choose_kind(n, dim, parse_memory(memory), kind)
    if per_source and kind == "hnsw":
        raise UserError("HNSW indexes cannot be merged; use --kind ivf-pq or flat with --per-source")
    groups = _by_source(files)
    if sources is not None:
        if not per_source:
            raise UserError("--sources builds sub-indexes: add --per-source")
        unknown = sorted(set(sources) - set(groups))
        if unknown:
            have = ", ".join(groups)
            raise UserError(f"no scored samples for source(s) {', '.join(unknown)}; the pool has {have}")
        groups = {name: g for name, g in groups.items() if name in sources}
    pool.index_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    idx, factory = _trained(pool, kind, factory, dim, n, rng, keep=per_source, retrain=retrain)
    ivf = faiss.extract_index_ivf(idx) if factory.startswith("IVF") else None
    query_rate = min(1.0, queries / n)
    sample_q: list[np.ndarray] = []
    reused = built = 0
    chosen = [str(f) for g in groups.values() for f in g]
    total = n if sources is None else ds.dataset(chosen, format="parquet").count_rows()
    with progress.bar("indexing", total=total, enabled=show_progress) as advance:
        if per_source:
            empty = faiss.clone_index(idx)
            trained_sig = hashlib.sha256((pool.index_dir / "trained.faiss").read_bytes()).hexdigest()
            queries_to = sample_q if sources is None else None  # no merge, no recall to measure
            for name, source_files in groups.items():
                sub, was_reused = _sub_index(pool, name, empty, trained_sig, source_files, rng, query_rate,
                                             queries_to, advance)  # fmt: skip
                reused += was_reused
                built += int(sub.ntotal)
                if sources is None:
                    idx.merge_from(sub, 0)
        else:
            for uids, vecs in embedding_batches(pool, files=files):
                idx.add_with_ids(vecs, uids)
                sample_q.append(vecs[rng.random(len(vecs)) < query_rate])
                advance(len(uids))
    if sources is not None:  # sub-indexes only: the merge and its recall belong to the run without --sources
        size = sum(_sub_path(pool, name).stat().st_size for name in groups)
        seconds = round(time.perf_counter() - t0, 3)
        return IndexResult(str(pool.index_dir / "sources"), kind, factory, built, dim, None, seconds, size)
    if ivf is not None:
        ivf.nprobe = min(ivf.nlist, max(8, ivf.nlist // 16))
    qs = np.concatenate(sample_q)[:queries] if sample_q else np.zeros((0, dim), np.float32)
    recall = measure_recall(pool, idx, qs, k=10)

    path = pool.index_dir / "embeddings.faiss"
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(idx, str(tmp))
    tmp.replace(path)
    info: dict[str, Any] = {
        "kind": kind,
        "factory": factory,
        "metric": "inner product on L2-normalised embeddings (cosine)",
        "ids": "pool uid",
        "rows": int(idx.ntotal),
        "dim": dim,
        "nprobe": int(ivf.nprobe) if ivf is not None else None,
        "bytes": path.stat().st_size,
        "memory_budget": memory,
        "recall_at_10": recall,
        "recall_queries": len(qs),
        "units": len(files),
        "per_source": per_source,
        "sub_indexes_reused": reused if per_source else None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json_atomic(pool.index_dir / "embeddings.json", info)
    return IndexResult(str(path), kind, factory, info["rows"], dim, recall, info["seconds"], info["bytes"])


def _trained(
    pool: Pool, kind: str, factory: str, dim: int, n: int, rng, keep: bool, retrain: bool
) -> tuple[faiss.Index, str]:
    """An empty index and its factory, trained (IVF: on a uniform sample, streamed). With `keep`, the
    trained index is stored and reused while the kind is the same (its factory was chosen for the pool
    size it was trained on; --retrain chooses again), so sub-indexes built at different times merge."""
    path = pool.index_dir / "trained.faiss"
    info = path.with_suffix(".json")
    if keep and not retrain and path.exists() and info.exists():
        stored = json.loads(info.read_text())
        if stored.get("kind") == kind:
            return faiss.read_index(str(path)), stored["factory"]
    idx = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if factory.startswith("IVF"):
        ivf = faiss.extract_index_ivf(idx)
        rate = min(n, max(ivf.nlist * 40, 20_000), 500_000) / n
        idx.train(np.concatenate([v[rng.random(len(v)) < rate] for _, v in embedding_batches(pool)]))
    if keep:
        faiss.write_index(idx, str(path.with_name(path.name + ".tmp")))
        path.with_name(path.name + ".tmp").replace(path)
        write_json_atomic(info, {"kind": kind, "factory": factory, "trained_on_rows": n, "at": time.time()})
    return idx, factory


def _by_source(files: list[Path]) -> dict[str, list[Path]]:
    """The pool's sample files by source name (from their source=NAME directory), sorted by name."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(f.parent.name.split("=", 1)[1], []).append(f)
    return dict(sorted(groups.items()))


def _sub_path(pool: Pool, source: str) -> Path:
    return pool.index_dir / "sources" / f"{source}.faiss"


def _sub_index(pool: Pool, source: str, empty: faiss.Index, trained_sig: str, files: list[Path], rng,
               query_rate: float, sample_q: list[np.ndarray] | None, advance) -> tuple[faiss.Index, bool]:  # fmt: skip
    """The sub-index of one source: reused when its files and the trained index are unchanged.
    Recall queries go to `sample_q` (when given) from every source, rebuilt or not."""
    path = _sub_path(pool, source)
    path.parent.mkdir(exist_ok=True)
    info = path.with_suffix(".json")
    h = hashlib.sha256(trained_sig.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    fingerprint = h.hexdigest()
    first = next(embedding_batches(pool, rows=4096, files=files[:1]), None) if sample_q is not None else None
    if first is not None:
        sample_q.append(first[1][rng.random(len(first[1])) < min(1.0, query_rate * 16)])
    if path.exists() and info.exists() and json.loads(info.read_text()).get("fingerprint") == fingerprint:
        sub = faiss.read_index(str(path))
        advance(int(sub.ntotal))
        return sub, True
    sub = faiss.clone_index(empty)
    for uids, vecs in embedding_batches(pool, files=files):
        sub.add_with_ids(vecs, uids)
        advance(len(uids))
    faiss.write_index(sub, str(path.with_name(path.name + ".tmp")))
    path.with_name(path.name + ".tmp").replace(path)
    write_json_atomic(info, {"fingerprint": fingerprint, "rows": int(sub.ntotal), "files": len(files)})
    return sub, False


def measure_recall(pool: Pool, idx: faiss.Index, queries: np.ndarray, k: int = 10) -> float:
    """Recall@k of `idx` against exact search, tie-aware: a returned id is a hit when its exact
    similarity reaches the k-th best exact similarity (duplicates make id sets ambiguous). The exact
    top-k and the returned ids' vectors are gathered in one streamed pass."""
    if len(queries) == 0:
        return 1.0
    k_eff = min(k, idx.ntotal)
    _, found = idx.search(queries, k_eff)
    wanted = np.unique(found[found != -1])
    best = np.full((len(queries), k_eff), -np.inf, np.float32)
    kept_ids, kept_vecs = [], []
    for uids, vecs in embedding_batches(pool):
        s = queries @ vecs.T
        merged = np.concatenate([best, s], 1)
        best = -np.partition(-merged, k_eff - 1, axis=1)[:, :k_eff]
        mask = np.isin(uids, wanted)
        kept_ids.append(uids[mask])
        kept_vecs.append(vecs[mask])
    ids, vecs = np.concatenate(kept_ids), np.concatenate(kept_vecs)
    row_of = {int(u): i for i, u in enumerate(ids)}
    kth = best.min(1)
    hits = 0
    for q, row in enumerate(found):
        rows = [row_of[int(u)] for u in row if int(u) in row_of]
        if rows:
            hits += int((vecs[rows] @ queries[q] >= kth[q] - 1e-5).sum())
    return round(hits / (len(queries) * k_eff), 4)
