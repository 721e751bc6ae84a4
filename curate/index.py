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
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow.dataset as ds

from curate.config import IndexConfig, parse_memory
from curate.pool import Pool
from curate.query import store_derived
from kdcore import progress, storage
from kdcore.errors import UserError

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


def dataset(files: list[str]) -> ds.Dataset:
    """A pyarrow dataset over pool files (local, or through the storage layer's filesystem)."""
    fs, _ = storage.arrow_filesystem(files[0])
    return ds.dataset([storage.arrow_filesystem(f)[1] for f in files], format="parquet", filesystem=fs)


def read_index(pool: Pool) -> faiss.Index:
    """The pool's index (downloaded to a temporary file first when the pool is remote)."""
    url = storage.join(pool.index_dir, "embeddings.faiss")
    if not storage.isfile(url):
        raise UserError(f"pool {storage.redact(pool.root)} has no index; run 'curate index {pool.root}' first")
    return _read(url)


def _read(url: str) -> faiss.Index:
    if storage.is_local(url):
        return faiss.read_index(str(storage.local(url)))
    with tempfile.NamedTemporaryFile(suffix=".faiss") as tmp:
        tmp.write(storage.read_bytes(url))
        tmp.flush()
        return faiss.read_index(tmp.name)


def _write(index: faiss.Index, url: str) -> int:
    """Write an index atomically; returns its size in bytes."""
    if storage.is_local(url):
        storage.makedirs(storage.parent(url))
        with storage.atomic_path(url, tag="index") as tmp:
            faiss.write_index(index, str(tmp))
        return storage.local(url).stat().st_size
    with tempfile.NamedTemporaryFile(suffix=".faiss") as tmp:
        faiss.write_index(index, tmp.name)
        data = Path(tmp.name).read_bytes()
    storage.write_bytes(url, data)
    return len(data)


def embedding_batches(pool: Pool, rows: int = BATCH_ROWS, files: list[str] | None = None):
    """(uids int64, float32 L2-normalised vectors) batches over complete units (or over `files`)."""
    files = pool.sample_files() if files is None else files
    if not files:
        raise UserError(f"pool {storage.redact(pool.root)} has no scored units; run 'curate score' first")
    # bounded read-ahead: the default buffers dozens of row groups, GiBs of embeddings on a large pool
    for batch in dataset(files).to_batches(
        columns=["uid", "embedding"], batch_size=rows, batch_readahead=2, fragment_readahead=1
    ):
        if batch.num_rows == 0:
            continue
        emb = batch.column("embedding")
        dim = emb.type.list_size
        vecs = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
        faiss.normalize_L2(vecs)
        yield batch.column("uid").to_numpy(), vecs


GRAPH_NPROBE = 1  # IVF lists probed per sample for the neighbour graph: its own cell (a neighbourhood)


def neighbour_graph(pool: Pool, idx: faiss.Index, ivf: Any, files: list[str], show: bool = False):
    """(uids, their K nearest neighbours' uids) batch by batch, every sample a query (curate/derived.py)."""
    from curate.derived import K

    before = ivf.nprobe if ivf is not None else None
    if ivf is not None:
        ivf.nprobe = min(ivf.nprobe, GRAPH_NPROBE)
    k = min(K, int(idx.ntotal))
    try:
        with progress.bar("neighbours", total=int(idx.ntotal), enabled=show) as advance:
            for uids, vecs in embedding_batches(pool, files=files):
                _, nb = idx.search(vecs, k)
                advance(len(uids))
                yield uids, nb
    finally:
        if ivf is not None:
            ivf.nprobe = before


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


def index(cfg: IndexConfig) -> IndexResult:
    """Build pool/index/embeddings.faiss (+ embeddings.json) from the pool's embeddings.

    With `cfg.sources` (per-source only), build just those sources' sub-indexes and stop before the merge,
    so machines sharing the pool's storage can each take some sources; a final run without it merges them."""
    t0 = time.perf_counter()
    pool = Pool(cfg.pool)
    meta = pool.meta()
    with pool.lock("index" if not cfg.sources else f"index-{'-'.join(sorted(cfg.sources))}"):
        return _index(cfg, pool, meta, t0)


def _index(cfg: IndexConfig, pool: Pool, meta: dict[str, Any], t0: float) -> IndexResult:
    files = pool.sample_files()
    n = dataset(files).count_rows() if files else 0
    if n == 0:
        raise UserError(f"pool {storage.redact(pool.root)} has no scored samples; run 'curate score' first")
    dim = int(meta["embedding"]["dim"])
    kind, factory = choose_kind(n, dim, parse_memory(cfg.memory), cfg.kind)
    if cfg.per_source and kind == "hnsw":
        raise UserError("HNSW indexes cannot be merged; use --kind ivf-pq or flat with --per-source")
    groups = _by_source(files)
    partial = bool(cfg.sources)
    if partial:
        unknown = sorted(set(cfg.sources) - set(groups))
        if unknown:
            raise UserError(f"no scored samples for source(s) {', '.join(unknown)}; the pool has {', '.join(groups)}")
        groups = {name: g for name, g in groups.items() if name in cfg.sources}
    storage.makedirs(pool.index_dir)
    rng = np.random.default_rng(cfg.seed)
    idx, factory = _trained(pool, kind, factory, dim, n, rng, keep=cfg.per_source, retrain=cfg.retrain)
    ivf = faiss.extract_index_ivf(idx) if factory.startswith("IVF") else None
    query_rate = min(1.0, cfg.queries / n)
    sample_q: list[np.ndarray] = []
    reused = built = 0
    total = n if not partial else dataset([f for g in groups.values() for f in g]).count_rows()
    with progress.bar("indexing", total=total, enabled=cfg.show_progress) as advance:
        if cfg.per_source:
            empty = faiss.clone_index(idx)
            trained_sig = hashlib.sha256(storage.read_bytes(storage.join(pool.index_dir, "trained.faiss"))).hexdigest()
            queries_to = None if partial else sample_q  # no merge, no recall to measure
            for name, source_files in groups.items():
                sub, was_reused = _sub_index(pool, name, empty, trained_sig, source_files, rng, query_rate,
                                             queries_to, advance)  # fmt: skip
                reused += was_reused
                built += int(sub.ntotal)
                if not partial:
                    idx.merge_from(sub, 0)
        else:
            for uids, vecs in embedding_batches(pool, files=files):
                idx.add_with_ids(vecs, uids)
                sample_q.append(vecs[rng.random(len(vecs)) < query_rate])
                advance(len(uids))
    if partial:  # sub-indexes only: the merge and its recall belong to the run without --sources
        size = sum(len(storage.read_bytes(_sub_path(pool, name))) for name in groups)
        seconds = round(time.perf_counter() - t0, 3)
        return IndexResult(storage.join(pool.index_dir, "sources"), kind, factory, built, dim, None, seconds, size)
    if ivf is not None:
        ivf.nprobe = min(ivf.nlist, max(8, ivf.nlist // 16))
    qs = np.concatenate(sample_q)[: cfg.queries] if sample_q else np.zeros((0, dim), np.float32)
    recall = measure_recall(pool, idx, qs, k=10)
    path = storage.join(pool.index_dir, "embeddings.faiss")
    size = _write(idx, path)
    info: dict[str, Any] = {
        "kind": kind,
        "factory": factory,
        "metric": "inner product on L2-normalised embeddings (cosine)",
        "ids": "pool uid",
        "rows": int(idx.ntotal),
        "dim": dim,
        "nprobe": int(ivf.nprobe) if ivf is not None else None,
        "bytes": size,
        "memory_budget": cfg.memory,
        "recall_at_10": recall,
        "recall_queries": len(qs),
        "units": len(files),
        "per_source": cfg.per_source,
        "sub_indexes_reused": reused if cfg.per_source else None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    storage.write_json(storage.join(pool.index_dir, "embeddings.json"), info, tag="index")
    if cfg.neighbours:
        t1 = time.perf_counter()
        store_derived(pool.root, lambda: neighbour_graph(pool, idx, ivf, files, cfg.show_progress))
        info["neighbours_seconds"] = round(time.perf_counter() - t1, 3)
        info["seconds"] = round(time.perf_counter() - t0, 3)
        storage.write_json(storage.join(pool.index_dir, "embeddings.json"), info, tag="index")
    return IndexResult(storage.redact(path), kind, factory, info["rows"], dim, recall, info["seconds"], size)


def _trained(pool: Pool, kind: str, factory: str, dim: int, n: int, rng, keep: bool, retrain: bool
             ) -> tuple[faiss.Index, str]:  # fmt: skip
    """An empty index and its factory, trained (IVF: on a uniform sample, streamed). With `keep`, the
    trained index is stored and reused while the kind is the same (its factory was chosen for the pool
    size it was trained on; --retrain chooses again), so sub-indexes built at different times merge."""
    path = storage.join(pool.index_dir, "trained.faiss")
    info = storage.join(pool.index_dir, "trained.json")
    if keep and not retrain and storage.exists(path) and storage.exists(info):
        stored = storage.read_json(info)
        if stored.get("kind") == kind:
            return _read(path), stored["factory"]
    idx = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if factory.startswith("IVF"):
        ivf = faiss.extract_index_ivf(idx)
        rate = min(n, max(ivf.nlist * 40, 20_000), 500_000) / n
        idx.train(np.concatenate([v[rng.random(len(v)) < rate] for _, v in embedding_batches(pool)]))
    if keep:
        _write(idx, path)
        storage.write_json(info, {"kind": kind, "factory": factory, "trained_on_rows": n, "at": time.time()})
    return idx, factory


def _by_source(files: list[str]) -> dict[str, list[str]]:
    """The pool's sample files by source name (from their NAME directory), sorted by name."""
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(storage.name(storage.parent(f)), []).append(f)
    return dict(sorted(groups.items()))


def _sub_path(pool: Pool, source: str) -> str:
    return storage.join(pool.index_dir, "sources", f"{source}.faiss")


def _sub_index(pool: Pool, source: str, empty: faiss.Index, trained_sig: str, files: list[str], rng,
               query_rate: float, sample_q: list[np.ndarray] | None, advance) -> tuple[faiss.Index, bool]:  # fmt: skip
    """The sub-index of one source: reused when its files and the trained index are unchanged.
    Recall queries go to `sample_q` (when given) from every source, rebuilt or not."""
    path = _sub_path(pool, source)
    info = path.removesuffix(".faiss") + ".json"
    h = hashlib.sha256(trained_sig.encode())
    for f in files:
        h.update(f"{storage.name(f)}:{_stamp(f)}".encode())
    fingerprint = h.hexdigest()
    first = next(embedding_batches(pool, rows=4096, files=files[:1]), None) if sample_q is not None else None
    if first is not None:
        sample_q.append(first[1][rng.random(len(first[1])) < min(1.0, query_rate * 16)])
    if storage.exists(path) and storage.exists(info) and storage.read_json(info).get("fingerprint") == fingerprint:
        sub = _read(path)
        advance(int(sub.ntotal))
        return sub, True
    sub = faiss.clone_index(empty)
    for uids, vecs in embedding_batches(pool, files=files):
        sub.add_with_ids(vecs, uids)
        advance(len(uids))
    _write(sub, path)
    storage.write_json(info, {"fingerprint": fingerprint, "rows": int(sub.ntotal), "files": len(files)})
    return sub, False


def _stamp(url: str) -> str:
    """size:mtime of a file (local stat or the object's listing)."""
    if storage.is_local(url):
        st = storage.local(url).stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    fs, path = storage.filesystem(url)
    info = fs.info(path)
    return f"{info.get('size')}:{info.get('LastModified') or info.get('mtime') or info.get('ETag')}"


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
