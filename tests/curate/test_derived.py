"""Derived scores stored once per state of the pool (curate/derived.py): the same values as their window
definitions, never read when stale, and auto_knn smoothed over mutual neighbours as a hand computation says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import derived
from curate.config import IndexConfig, ScoreConfig, SelectConfig
from curate.index import index
from curate.pool import Pool
from curate.query import connect, store_derived
from curate.score import score
from curate.select import read_selection, select


@pytest.fixture
def own_pool(pool, tmp_path) -> Path:
    """A copy of the shared pool as `curate score` leaves it (another test may have indexed the shared one)."""
    root = tmp_path / "pool"
    shutil.copytree(pool, root, ignore=shutil.ignore_patterns("index", "derived"))
    store_derived(str(root))
    return root


def columns(pool: Path, stored: bool) -> dict:
    con = connect(str(pool), stored_scores=stored)
    return con.execute("SELECT uid, bn_z, auto, auto_knn FROM samples ORDER BY uid").fetchnumpy()


def test_stored_scores_are_the_window_definitions(own_pool):
    assert derived.current(Pool(own_pool), Pool(own_pool).sample_files()) is not None  # score wrote it
    got, want = columns(own_pool, True), columns(own_pool, False)
    for k in ("uid", "bn_z", "auto"):
        np.testing.assert_array_equal(got[k], want[k])
    np.testing.assert_array_equal(got["auto_knn"], got["auto"])  # no index yet: auto_knn is auto


def test_a_stored_file_is_read_only_for_the_state_it_belongs_to(own_pool):
    url = own_pool / "derived" / json.loads((own_pool / "derived" / "scores.json").read_text())["file"]
    t = pq.read_table(url)
    fake = pa.array(np.full(t.num_rows, 5.0, np.float32))
    pq.write_table(t.set_column(t.schema.get_field_index("auto"), "auto", fake), url)
    assert (columns(own_pool, True)["auto"] == 5.0).all()  # same state: the stored file is what the view reads
    unit = Pool(own_pool).records("noise")[0]
    Pool(own_pool).drop_units("noise", {unit["unit"]})  # the rows changed: the file no longer belongs to the pool
    removed = unit["rows"]
    got = columns(own_pool, True)
    assert len(got["uid"]) == 997 - removed
    assert ((got["auto"] >= 0) & (got["auto"] <= 1)).all()
    np.testing.assert_array_equal(got["auto"], columns(own_pool, False)["auto"])


def test_percent_rank_is_duckdbs_with_ties_and_nulls():
    x = np.array([3.0, np.nan, 1.0, 3.0, 2.0, np.nan, 7.0, 1.0])
    con = duckdb.connect()
    con.register("t", pa.table({"i": np.arange(len(x)), "x": pa.array(x, from_pandas=True)}))
    want = con.execute("SELECT percent_rank() OVER (ORDER BY x NULLS FIRST) FROM t ORDER BY i").fetchnumpy()
    np.testing.assert_allclose(derived.percent_rank(x), list(want.values())[0])


def test_smoothing_counts_mutual_neighbours_only():
    """Three cluster members name each other; an outlier names the cluster, which does not name it back."""
    uid = np.array([-20, 10, 30, 40])  # uids are any int64
    auto = np.array([0.6, 0.9, 0.3, 0.1], np.float32)
    nb = np.array([[-20, 10, 30], [10, -20, 30], [30, 10, -20], [40, 10, -20]])

    def graph():
        yield uid[:2], nb[:2]
        yield uid[2:], nb[2:]

    got = derived.smooth(uid, auto, graph)
    np.testing.assert_allclose(got, [0.6, 0.6, 0.6, 0.1], rtol=1e-6)
    one_way = np.array([[-20, 30, -1], [10, -20, 30], [30, 10, -1], [40, 10, -1]])  # 10 <-> 30 only
    got = derived.smooth(uid, auto, lambda: iter([(uid, one_way)]))
    np.testing.assert_allclose(got, [0.6, (0.9 + 0.3) / 2, (0.3 + 0.9) / 2, 0.1], rtol=1e-6)


def test_index_stores_auto_knn_and_the_default_selection_uses_it(own_pool, teacher, tmp_path):
    index(IndexConfig(str(own_pool), show_progress=False))
    info = json.loads((own_pool / "derived" / "scores.json").read_text())
    assert info["smoothed"] and info["k"] == derived.K
    # by hand: exact cosine neighbours of every embedding, mutual edges, mean of auto over the sample and them
    con = connect(str(own_pool))
    t = con.execute("SELECT uid, embedding, auto, auto_knn FROM samples ORDER BY uid").fetchnumpy()
    emb = np.stack(t["embedding"]).astype(np.float32)
    faiss.normalize_L2(emb)
    flat = faiss.IndexFlatIP(emb.shape[1])
    flat.add(emb)
    _, nb = flat.search(emb, derived.K)
    sets = [set(r) - {i} for i, r in enumerate(nb)]
    want = np.array([(t["auto"][i] + sum(t["auto"][j] for j in s if i in sets[j])) /
                     (1 + sum(i in sets[j] for j in s)) for i, s in enumerate(sets)])  # fmt: skip
    close = np.isclose(t["auto_knn"], want, atol=1e-5)
    assert close.mean() >= 0.99, close.mean()  # ties among equal distances may order neighbours differently
    assert not np.allclose(t["auto_knn"], t["auto"])
    select(SelectConfig(pool=str(own_pool), out=str(tmp_path / "sel"), n=40))
    table, sel = read_selection(str(tmp_path / "sel"))
    assert sel["score"] == "auto_knn" and "mutual" in sel["auto_knn"]
    picked = dict(zip(t["uid"], t["auto_knn"], strict=True))
    scores = [picked[u] for u in table.column("uid").to_pylist()]
    np.testing.assert_allclose(table.column("score").to_numpy(), scores, rtol=1e-6)
    assert table.column("source").to_pylist().count("digits") / table.num_rows >= 0.9
    # scoring again with nothing new keeps the smoothed scores; a new source replaces them (stale index)
    cfg = json.loads((own_pool / "pool.json").read_text())
    sources = [v["spec"] for v in cfg["sources"].values()]
    score(ScoreConfig(str(teacher), sources, str(own_pool), batch_size=64, show_progress=False))
    assert json.loads((own_pool / "derived" / "scores.json").read_text())["smoothed"]
    score(ScoreConfig(str(teacher), [*sources, "more=synthetic:noise?n=50&size=8"], str(own_pool), batch_size=64,
                      show_progress=False))  # fmt: skip
    assert not json.loads((own_pool / "derived" / "scores.json").read_text())["smoothed"]
    select(SelectConfig(pool=str(own_pool), out=str(tmp_path / "sel2"), n=40))
    assert "run 'curate index'" in read_selection(str(tmp_path / "sel2"))[1]["auto_knn"]


def test_compaction_realigns_the_stored_scores_and_keeps_auto_knn(own_pool):
    from curate.compact import compact
    from curate.config import CompactConfig

    index(IndexConfig(str(own_pool), show_progress=False))
    before = columns(own_pool, True)
    compact(CompactConfig(str(own_pool), target_rows=400, show_progress=False))
    pool = Pool(own_pool)
    assert any("compact-" in f for f in pool.sample_files())
    assert derived.current(pool, pool.sample_files()) is not None  # aligned to the compact files
    info = json.loads((own_pool / "derived" / "scores.json").read_text())
    assert info["smoothed"] and [p.name for p in (own_pool / "derived").glob("scores-*")] == [info["file"]]
    after = columns(own_pool, True)
    for k in ("uid", "bn_z", "auto", "auto_knn"):
        np.testing.assert_array_equal(after[k], before[k])
    np.testing.assert_array_equal(after["auto"], columns(own_pool, False)["auto"])


def test_a_teacher_without_batchnorm_gets_the_same_columns_stored_or_not(mlp_teacher, tmp_path):
    root = tmp_path / "mlp-pool"
    score(ScoreConfig(str(mlp_teacher), ["d=builtin:digits?start=1500&stop=1600", "n=synthetic:noise?n=50&size=8"],
                      str(root), show_progress=False))  # fmt: skip
    assert derived.current(Pool(root), Pool(root).sample_files()) is not None
    got, want = (connect(str(root), stored_scores=s).sql("SELECT * FROM samples ORDER BY uid").to_arrow_table()
                 for s in (True, False))  # fmt: skip
    assert got.column_names == want.column_names and "bn_z" not in got.column_names  # no BatchNorm, no bn_z
    assert got.column("auto").equals(want.column("auto"))  # auto from span_score and energy
