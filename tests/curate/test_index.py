"""Per-source sub-indexes: trained once, filled per source, merged; unchanged sources are reused."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from curate.config import IndexConfig, ScoreConfig
from curate.index import embedding_batches, index
from curate.pool import Pool
from curate.score import score
from tests.conftest import run_cli, start_cli


def test_per_source_sub_indexes_merge_into_the_same_index_and_are_reused(teacher, tmp_path):
    root = tmp_path / "pool"
    base = ["noise=synthetic:noise?n=800&size=8&unit=400", "glyphs=synthetic:glyphs?n=400"]
    score(ScoreConfig(str(teacher), base, str(root), show_progress=False))
    res = index(IndexConfig(str(root), kind="ivf-pq", memory="64MB", per_source=True, show_progress=False))
    assert res.rows == 1200
    subs = root / "index" / "sources"
    assert {p.name for p in subs.glob("*.faiss")} == {"noise.faiss", "glyphs.faiss"}

    # the merged index answers exactly as one index filled with every vector on the same quantizer
    merged = faiss.read_index(str(root / "index" / "embeddings.faiss"))
    single = faiss.read_index(str(root / "index" / "trained.faiss"))
    for uids, vecs in embedding_batches(Pool(root)):
        single.add_with_ids(vecs, uids)
    faiss.extract_index_ivf(single).nprobe = faiss.extract_index_ivf(merged).nprobe
    queries = np.concatenate([v[:20] for _, v in embedding_batches(Pool(root))])
    d_merged, i_merged = merged.search(queries, 10)
    d_single, i_single = single.search(queries, 10)
    assert np.allclose(d_merged, d_single, atol=1e-5)
    assert (np.sort(i_merged, 1) == np.sort(i_single, 1)).mean() > 0.99  # ties may swap places

    # a new source: only its sub-index is built, the others are read back as they were
    stamps = {p.name: p.stat().st_mtime_ns for p in subs.glob("*.faiss")}
    score(ScoreConfig(str(teacher), [*base, "digits=builtin:digits?start=1500"], str(root), show_progress=False))
    res = index(IndexConfig(str(root), kind="ivf-pq", memory="64MB", per_source=True, show_progress=False))
    info = json.loads((root / "index" / "embeddings.json").read_text())
    assert res.rows == 1200 + 297 and info["sub_indexes_reused"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in subs.glob("*.faiss") if p.name in stamps} == stamps
    found = faiss.read_index(str(root / "index" / "embeddings.faiss"))
    assert found.ntotal == 1497 and res.recall_at_10 > 0.3  # 4-bit PQ on a tiny pool


def test_per_source_refuses_hnsw_in_one_line(teacher, tmp_path):
    score(ScoreConfig(str(teacher), ["g=synthetic:glyphs?n=50"], str(tmp_path / "p"), show_progress=False))
    proc = run_cli("curate", "index", str(tmp_path / "p"), "--kind", "hnsw", "--per-source", "--no-progress")
    assert proc.returncode == 2 and "HNSW indexes cannot be merged" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_sources_split_across_processes_then_one_merge(teacher, tmp_path):
    root = tmp_path / "pool"
    srcs = ["noise=synthetic:noise?n=600&size=8", "glyphs=synthetic:glyphs?n=400", "digits=builtin:digits?start=1500"]
    score(ScoreConfig(str(teacher), srcs, str(root), show_progress=False))
    args = ["curate", "index", str(root), "--kind", "ivf-pq", "--memory", "64MB", "--per-source", "--no-progress"]
    first = run_cli(*args, "--sources", "noise")  # trains the shared quantizer
    assert first.returncode == 0, first.stderr
    assert "sub-indexes" in first.stdout and "600 vectors" in first.stdout
    # two more "machines" on the same storage, at the same time, each with its own sources
    procs = [start_cli(*args, "--sources", s) for s in ("glyphs", "digits")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    subs = root / "index" / "sources"
    assert {p.name for p in subs.glob("*.faiss")} == {"noise.faiss", "glyphs.faiss", "digits.faiss"}
    assert not (root / "index" / "embeddings.faiss").exists()  # nothing merged yet

    res = index(IndexConfig(str(root), kind="ivf-pq", memory="64MB", per_source=True, show_progress=False))
    info = json.loads((root / "index" / "embeddings.json").read_text())
    assert info["sub_indexes_reused"] == 3 and res.rows == 600 + 400 + 297
    merged = faiss.read_index(str(root / "index" / "embeddings.faiss"))
    uids = np.concatenate([u for u, _ in embedding_batches(Pool(root))])
    lists = faiss.extract_index_ivf(merged).invlists
    ids = np.concatenate(
        [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(lists.nlist)]
    )  # fmt: skip
    assert np.array_equal(np.sort(ids), np.sort(uids)) and len(ids) == 1297  # every vector once

    proc = run_cli(*args, "--sources", "nope")
    assert proc.returncode == 2 and "no scored samples for source(s) nope" in proc.stderr
    proc = run_cli(*[a for a in args if a != "--per-source"], "--sources", "noise")
    assert proc.returncode == 2 and "add --per-source" in proc.stderr and "Traceback" not in proc.stderr


def test_recall_at_10_is_measured_not_assumed(pool):
    """On an index built to be poor (IVF with 1 probe over 4-bit PQ codes) the measured recall matches an
    exact computation done here, and is far from the 1.0 of a flat index."""
    import numpy as np

    from curate.index import embedding_batches, measure_recall
    from curate.pool import Pool

    p = Pool(str(pool))
    uids, vecs = map(np.concatenate, zip(*embedding_batches(p), strict=True))
    poor = faiss.index_factory(vecs.shape[1], "IVF32,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    poor.train(vecs)
    poor.add_with_ids(vecs, uids)
    faiss.extract_index_ivf(poor).nprobe = 1
    queries = vecs[::7][:100]
    measured = measure_recall(p, poor, queries, k=10)
    _, found = poor.search(queries, 10)
    sims = queries @ vecs.T
    kth = -np.partition(-sims, 9, axis=1)[:, 9]
    row = {int(u): i for i, u in enumerate(uids)}
    hits = sum(int(sims[q, row[int(u)]] >= kth[q] - 1e-5) for q in range(len(queries)) for u in found[q] if u != -1)
    assert measured == pytest.approx(hits / (len(queries) * 10), abs=1e-3)
    assert measured < 0.8
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(vecs.shape[1]))
    flat.add_with_ids(vecs, uids)
    assert measure_recall(p, flat, queries, k=10) == 1.0
