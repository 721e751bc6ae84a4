"""curate select: each strategy on a pool whose right answer is known (held-out digits among noise,
dead leaves and glyphs, scored by a digits teacher trained in the test)."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.config import IndexConfig, ScoreConfig, SelectConfig
from curate.index import index
from curate.query import connect
from curate.score import score
from curate.select import read_selection, select
from curate.sources.builtin import digits as load_digits
from curate.strategies import draw_probabilities, top_per_class, water_fill
from tests.conftest import run_cli


def run(pool: Path, out: Path, **kw) -> tuple:
    select(SelectConfig(pool=str(pool), out=str(out), **kw))
    return read_selection(str(out))


@pytest.fixture(scope="module")
def indexed_pool(pool, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("indexed") / "pool"
    shutil.copytree(pool, root)
    index(IndexConfig(str(root), show_progress=False))
    return root


def pool_column(pool: Path, sql: str) -> dict:
    return connect(str(pool)).execute(sql).fetchnumpy()


def assert_ranked_within_classes(pool, table, score: str) -> None:
    """Nothing left out in a predicted class scores above what was kept there."""
    allp = pool_column(pool, f"SELECT uid, pred, {score} FROM samples")
    chosen = set(table.column("uid").to_pylist())
    for c in np.unique(allp["pred"]):
        mask = allp["pred"] == c
        kept = [s for u, s in zip(allp["uid"][mask], allp[score][mask], strict=True) if u in chosen]
        left = [s for u, s in zip(allp["uid"][mask], allp[score][mask], strict=True) if u not in chosen]
        if kept and left:
            assert min(kept) >= max(left)


def test_top_per_class_by_confidence_picks_in_distribution_and_respects_k(pool, tmp_path):
    table, info = run(pool, tmp_path / "sel", strategy="top-per-class", per_class=15, score="confidence")
    pred = table.column("pred").to_numpy()
    counts = np.bincount(pred, minlength=10)
    assert counts.max() <= 15
    assert all(counts[int(c)] == 15 for c in range(10) if info["classes"][c] not in info["short_classes"])
    src = table.column("source").to_pylist()
    assert src.count("digits") / len(src) >= 0.8  # the pool is 30% digits
    # the ranking really is by score: nothing left out in a class scores above what was kept there
    assert_ranked_within_classes(pool, table, "confidence")
    assert info["per_class"] == {info["classes"][c]: int(counts[c]) for c in range(10)}
    assert info["rel_entropy"] == pytest.approx(
        -sum(p * np.log(p) for p in counts[counts > 0] / counts.sum()) / np.log(10), abs=1e-5
    )


def test_short_classes_are_reported(pool, tmp_path):
    _, info = run(pool, tmp_path / "sel", strategy="top-per-class", per_class=10_000)
    assert set(info["short_classes"]) == set(info["classes"])  # every class is short of 10,000
    assert sum(info["per_class"].values()) == 997


def test_weighted_draw_frequencies_follow_the_weights(pool, tmp_path):
    n, tau = 200_000, 0.3
    table, info = run(
        pool, tmp_path / "sel", strategy="weighted", n=n, replace=True, temperature=tau, seed=3, score="confidence"
    )
    assert table.column("weight").to_numpy().sum() == pytest.approx(n)
    allp = pool_column(pool, "SELECT uid, source, confidence FROM samples ORDER BY uid")
    p = draw_probabilities(allp["confidence"].astype(np.float64), tau)
    drawn = dict(zip(table.column("uid").to_pylist(), table.column("weight").to_numpy(), strict=True))
    counts = np.array([drawn.get(u, 0.0) for u in allp["uid"]])
    # per source: observed draws within 5 standard deviations of the multinomial expectation
    for s in np.unique(allp["source"]):
        ps = p[allp["source"] == s].sum()
        got = counts[allp["source"] == s].sum()
        assert abs(got - n * ps) <= 5 * np.sqrt(n * ps * (1 - ps)) + 1, s
    # per sample: the draw counts track the probabilities
    assert np.corrcoef(counts, n * p)[0, 1] > 0.99
    # probabilities written beside the draw match the ones computed here
    prob = dict(zip(table.column("uid").to_pylist(), table.column("prob").to_numpy(), strict=True))
    some = list(prob)[:20]
    ref = dict(zip(allp["uid"], p, strict=True))
    assert np.allclose([prob[u] for u in some], [ref[u] for u in some], rtol=1e-4)


def test_weighted_without_replacement_prefers_high_scores_and_is_deterministic(pool, tmp_path):
    a, _ = run(pool, tmp_path / "a", strategy="weighted", n=150, temperature=0.1, seed=1)
    b, _ = run(pool, tmp_path / "b", strategy="weighted", n=150, temperature=0.1, seed=1)
    c, _ = run(pool, tmp_path / "c", strategy="weighted", n=150, temperature=0.1, seed=2)
    assert a.num_rows == 150 and len(set(a.column("uid").to_pylist())) == 150
    assert a.equals(b)
    assert a.column("uid").to_pylist() != c.column("uid").to_pylist()
    assert (tmp_path / "a" / "selection.parquet").read_bytes() == (tmp_path / "b" / "selection.parquet").read_bytes()
    mean_all = pool_column(pool, "SELECT avg(confidence) AS m FROM samples")["m"][0]
    assert np.mean(a.column("score").to_numpy()) > mean_all + 0.1


def test_balanced_equalises_predicted_classes(pool, tmp_path):
    table, info = run(pool, tmp_path / "sel", strategy="balanced", n=200, seed=0)
    counts = np.bincount(table.column("pred").to_numpy(), minlength=10)
    available = np.bincount(pool_column(pool, "SELECT pred FROM samples")["pred"], minlength=10)
    assert counts.sum() == 200
    assert all(counts[c] == available[c] or counts[c] >= counts.max() - 1 for c in range(10))
    assert info["rel_entropy"] > 0.95
    assert list(water_fill(np.array([3, 50, 50, 0]), 60)) == [3, 29, 28, 0]


def test_random_is_uniform_without_repeats(pool, tmp_path):
    table, info = run(pool, tmp_path / "r", strategy="random", n=500, seed=1, where="source <> 'digits'")
    uids = table.column("uid").to_numpy()
    assert len(uids) == len(set(uids)) == 500 and "digits" not in info["per_source"]
    share = {s: c / 500 for s, c in info["per_source"].items()}
    avail = pool_column(pool, "SELECT source, count(*) AS n FROM samples WHERE source <> 'digits' GROUP BY 1")
    total = avail["n"].sum()
    for s, n in zip(avail["source"], avail["n"], strict=True):  # within 5 sigma of the hypergeometric share
        p = n / total
        assert abs(share.get(s, 0) - p) < 5 * np.sqrt(p * (1 - p) / 500)
    again, _ = run(pool, tmp_path / "r2", strategy="random", n=500, seed=2, where="source <> 'digits'")
    assert set(again.column("uid").to_numpy()) != set(uids)


def test_threshold_by_value_and_by_fraction(pool, tmp_path):
    table, _ = run(pool, tmp_path / "t", strategy="threshold", threshold=0.9, score="confidence")
    assert table.num_rows > 0 and table.column("score").to_numpy().min() >= 0.9 - 1e-6
    n_above = pool_column(pool, "SELECT count(*) AS n FROM samples WHERE confidence >= 0.9")["n"][0]
    assert table.num_rows == n_above
    table, _ = run(pool, tmp_path / "f", strategy="threshold", fraction=0.1, score="-entropy")
    assert table.num_rows == 100  # ceil(0.1 * 997)
    with pytest.raises(Exception, match="exactly one"):
        run(pool, tmp_path / "x", strategy="threshold")


def test_where_filter_then_strategy(pool, tmp_path):
    table, info = run(pool, tmp_path / "sel", strategy="top-per-class", per_class=5, where="source = 'glyphs'")
    assert set(table.column("source").to_pylist()) == {"glyphs"}
    assert info["where"] == "source = 'glyphs'" and info["candidates"] == 200


def test_near_expands_from_references_and_respects_the_filter(indexed_pool, tmp_path):
    refs = ["task=builtin:digits?stop=300"]  # digits the pool never saw (the pool holds digits[1500:])
    table, _ = run(indexed_pool, tmp_path / "near", strategy="near", n=100, references=refs, k=5)
    src = table.column("source").to_pylist()
    assert table.num_rows == 100 and src.count("digits") >= 90
    sims = table.column("score").to_numpy()
    assert (sims <= 1.0 + 1e-5).all() and (sims >= -1.0 - 1e-5).all()

    where = "source <> 'digits' AND confidence < 0.9"
    allowed = set(pool_column(indexed_pool, f"SELECT uid FROM samples WHERE {where}")["uid"].tolist())
    table, _ = run(indexed_pool, tmp_path / "near2", strategy="near", n=60, references=refs, where=where)
    assert table.num_rows == 60 and set(table.column("uid").to_pylist()) <= allowed


def test_near_over_an_ivf_pq_index_with_a_filter(teacher, tmp_path):
    pool = tmp_path / "pool"
    sources = ["digits=builtin:digits?start=500", "shaders=synthetic:shaders?n=1200&size=8"]
    score(ScoreConfig(teacher=str(teacher), sources=sources, pool=str(pool), show_progress=False))
    assert index(IndexConfig(str(pool), memory="200KB", show_progress=False)).kind == "ivf-pq"
    table, _ = run(pool, tmp_path / "sel", strategy="near", n=50, references=["r=builtin:digits?stop=100"],
                   where="source = 'shaders'")  # fmt: skip
    assert table.num_rows == 50 and set(table.column("source").to_pylist()) == {"shaders"}


def test_diverse_spreads_over_the_embedding_space(pool, tmp_path):
    div, _ = run(pool, tmp_path / "div", strategy="diverse", n=100, clusters=10, seed=0)
    top, _ = run(pool, tmp_path / "top", strategy="threshold", fraction=100 / 997)
    assert div.num_rows == 100 and len(set(div.column("uid").to_pylist())) == 100

    def mean_cos(t):
        con = connect(str(pool))
        con.register("u", t.select(["uid"]))
        emb = con.execute("SELECT embedding FROM samples JOIN u USING (uid)").fetchnumpy()["embedding"]
        v = np.stack([np.asarray(e, np.float64) for e in emb])
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)  # ReLU features can be all zero
        return (v @ v.T).mean()

    assert mean_cos(div) < mean_cos(top) - 0.05
    assert len(set(div.column("source").to_pylist())) >= 3


def test_dedup_removes_planted_duplicates(teacher, tmp_path):
    x, _ = load_digits()
    folder = tmp_path / "imgs"
    folder.mkdir()

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    for i in range(60):
        (folder / f"orig-{i:03d}.png").write_bytes(png(x[i]))
    for i in range(10):  # exact copies of 0..9
        shutil.copy(folder / f"orig-{i:03d}.png", folder / f"copy-{i:03d}.png")
    for i in range(10, 20):  # near copies of 10..19: one pixel nudged
        a = x[i].copy()
        a[0, 0] = min(255, int(a[0, 0]) + 3)
        (folder / f"near-{i:03d}.png").write_bytes(png(a))
    pool = tmp_path / "pool"
    score(ScoreConfig(teacher=str(teacher), sources=[f"f=folder:{folder}"], pool=str(pool), show_progress=False))

    table, info = run(pool, tmp_path / "exact", strategy="threshold", threshold=-1e9, dedup="exact")
    keys = table.column("sample_id").to_pylist()
    assert table.num_rows == 70 and info["dedup_removed"] == 10
    for i in range(10):  # exactly one of each planted pair survives
        assert (f"f/orig-{i:03d}.png" in keys) != (f"f/copy-{i:03d}.png" in keys)

    table, info = run(pool, tmp_path / "near", strategy="threshold", threshold=-1e9, dedup="near:0.999")
    keys = set(table.column("sample_id").to_pylist())
    for i in range(20):
        twin = f"f/copy-{i:03d}.png" if i < 10 else f"f/near-{i:03d}.png"
        assert (f"f/orig-{i:03d}.png" in keys) != (twin in keys)
    assert info["dedup_removed"] >= 20


def test_selection_files_follow_the_format(pool, tmp_path):
    run(pool, tmp_path / "sel", strategy="top-per-class", per_class=3, seed=7)
    schema = pq.read_schema(tmp_path / "sel" / "selection.parquet")
    assert schema.names[:6] == ["uid", "sample_id", "source", "pred", "label", "weight"]
    info = json.loads((tmp_path / "sel" / "selection.json").read_text())
    for key in ("pool", "where", "strategy", "params", "seed", "per_source", "per_class", "rel_entropy"):
        assert key in info
    assert info["pool"] == str(pool.resolve()) and info["seed"] == 7


def test_cli_select_and_its_errors(pool, tmp_path):
    out = tmp_path / "sel"
    proc = run_cli("curate", "select", str(pool), "--strategy", "balanced", "--n", "50", "--out", str(out), check=True)
    assert "50 of 997 candidates" in proc.stdout and (out / "selection.parquet").is_file()
    for bad, msg in [
        (["--strategy", "balanced", "--n", "5", "--where", "confidence >>> 1"], "SQL error"),
        (["--strategy", "magic"], "unknown --strategy"),
        (["--strategy", "balanced"], "needs --n"),
        (["--strategy", "threshold", "--fraction", "0.5", "--dedup", "near:2"], "--dedup"),
        (["--strategy", "near", "--n", "5"], "--reference"),
    ]:
        proc = run_cli("curate", "select", str(pool), *bad, "--out", str(tmp_path / "x"))
        assert proc.returncode == 2, proc.stderr
        assert msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = run_cli("curate", "select", str(pool), "--strategy", "balanced", "--n", "5", "--out", str(pool / "sel"))
    assert proc.returncode == 2 and "inside the pool" in proc.stderr


def test_top_per_class_with_absent_and_short_classes_matches_a_reference(pool, tmp_path):
    """A filter that leaves some classes out (the highest among them) and others short: the picks are exactly
    the K best per present class, every absent or short class is reported with what it had."""
    allp = pool_column(pool, "SELECT uid, pred, energy FROM samples WHERE pred NOT IN (9, 3)")
    counts = np.bincount(allp["pred"], minlength=10)
    k = int(np.sort(counts[counts > 0])[len(counts[counts > 0]) // 2])  # some classes short of K, some not
    table, info = run(pool, tmp_path / "sel", strategy="top-per-class", per_class=k, score="energy",
                      where="pred NOT IN (9, 3)")  # fmt: skip
    want = allp["uid"][top_per_class(allp["pred"], allp["energy"].astype(np.float64), k, allp["uid"])]
    assert sorted(table.column("uid").to_pylist()) == sorted(want.tolist())
    short = {c: int(counts[c]) for c in range(10) if counts[c] < k}
    assert info["short_classes"] == {info["classes"][c]: n for c, n in short.items()}
    assert {"9", "3"} <= set(info["short_classes"]) and info["short_classes"]["9"] == 0
    assert any(counts[c] > k for c in range(10))


def test_weighted_probabilities_against_a_hand_computation():
    score = np.array([1.0, 2.0, 4.0])
    p = draw_probabilities(score, temperature=2.0)
    e = [math.exp(0.5), math.exp(1.0), math.exp(2.0)]
    assert p.tolist() == pytest.approx([v / sum(e) for v in e])
    assert draw_probabilities(score, gamma=2.0).tolist() == pytest.approx([1 / 21, 4 / 21, 16 / 21])


def test_the_default_score_is_auto_knn_and_ranks_by_it(pool, tmp_path):
    """Before `curate index` the pool has no neighbour graph: auto_knn is auto, and selection.json says so."""
    table, info = run(pool, tmp_path / "sel", strategy="top-per-class", per_class=15)
    assert info["score"] == "auto_knn" and info["auto_knn"].startswith("equal to auto")
    both = pool_column(pool, "SELECT auto, auto_knn FROM samples")
    np.testing.assert_array_equal(both["auto"], both["auto_knn"])
    assert_ranked_within_classes(pool, table, "auto")
    src = table.column("source").to_pylist()
    assert src.count("digits") / len(src) >= 0.9
    # a filter applies after the ranking over the whole pool: the same auto values, a subset of rows
    filtered, _ = run(pool, tmp_path / "f", strategy="threshold", threshold=0.5, where="source <> 'digits'")
    assert set(filtered.column("source").to_pylist()) <= {"noise", "leaves", "glyphs"}
    allp = pool_column(pool, "SELECT uid, auto, source FROM samples")
    want = (allp["auto"] >= 0.5) & (allp["source"] != "digits")
    assert set(filtered.column("uid").to_pylist()) == set(allp["uid"][want].tolist())


def test_references_calibrate_the_score(pool, teacher, tmp_path):
    """With --reference and a strategy other than near, ref_score (minus the distance to the nearest reference's
    embedding) joins the pool, and auto averages its rank with the teacher-only auto."""
    refs = "task=builtin:digits?stop=20"
    ref_pool = tmp_path / "refs"
    score(ScoreConfig(str(teacher), [refs], str(ref_pool), show_progress=False))
    ref_emb = np.stack(pq.read_table(ref_pool / "samples", columns=["embedding"]).column("embedding").to_pylist())
    everything = pool_column(pool, "SELECT uid, embedding, auto, source FROM samples ORDER BY uid")
    emb = np.stack(everything["embedding"])
    want = -np.sqrt(((emb[:, None, :] - ref_emb[None]) ** 2).sum(-1).min(1))
    table, info = run(pool, tmp_path / "ref", strategy="threshold", fraction=1.0, score="ref_score", references=[refs])
    got = dict(zip(table.column("uid").to_pylist(), table.column("score").to_numpy(), strict=True))
    np.testing.assert_allclose([got[u] for u in everything["uid"]], want, rtol=1e-4, atol=1e-4)
    assert info["params"]["references"] == [refs]

    def prank(x):
        return np.searchsorted(np.sort(x), x, side="left") / (len(x) - 1)

    table, _ = run(pool, tmp_path / "auto", strategy="threshold", fraction=1.0, references=[refs])
    got = dict(zip(table.column("uid").to_pylist(), table.column("score").to_numpy(), strict=True))
    fused = (everything["auto"].astype(np.float64) + prank(want)) / 2
    np.testing.assert_allclose([got[u] for u in everything["uid"]], fused, atol=2e-3)
    top, _ = run(pool, tmp_path / "top", strategy="threshold", fraction=0.2, references=[refs])
    assert top.column("source").to_pylist().count("digits") / top.num_rows >= 0.95


def test_related_gives_no_quota_to_sparse_classes_of_high_looking_noise():
    """A 100-class teacher: the task's samples sit in 10 classes; 90 noise samples, one in each other class, look
    related (above the split) but less than the task. A quota per class (top-per-class K=1) fills 90 of 100 slots
    with noise; the related recipe holds each class to its share of the related-looking samples, so 60 picks are
    all task; when N exceeds every class's cap, the related-looking samples come by score and the unrelated
    background last."""
    from curate.scores import two_component_split
    from curate.strategies import related_caps, related_order

    rng = np.random.default_rng(0)
    task_pred = np.repeat(np.arange(10), 30)
    noise_pred = np.arange(10, 100)
    back_pred = rng.integers(0, 100, 600)
    pred = np.concatenate([task_pred, noise_pred, back_pred])
    score = np.concatenate([rng.normal(2.0, 0.2, 300), np.full(90, 1.7), rng.normal(0.0, 0.3, 600)])
    kind = np.array(["task"] * 300 + ["noise"] * 90 + ["back"] * 600)
    uid = np.arange(len(pred)) * 7 + 3
    split = two_component_split(score)
    assert 0.5 < split.threshold < 1.7 and split.verdict == "clean"
    quota = top_per_class(pred, score, 1, uid)
    assert (kind[quota] == "noise").sum() == 90
    picked = related_order(pred, score, uid, split.threshold, 60)
    assert (kind[picked] == "task").all()
    caps = related_caps(pred, score, split.threshold, 60)
    assert caps[0] == pytest.approx(4 * 60 * 30 / 390) and caps[50] == pytest.approx(4 * 60 / 390)
    everything = related_order(pred, score, uid, split.threshold, 990)  # caps above every class's size
    assert (kind[everything[:390]] != "back").all() and (kind[everything[390:]] == "back").all()
    assert (np.diff(score[everything[:390]]) <= 0).all()  # one tier: by score


def test_related_is_the_default_recipe_and_matches_its_reference(pool, tmp_path):
    """`curate select POOL --n N --out SEL` runs strategy related by auto_knn (auto on a pool without an index);
    the DuckDB form picks what the numpy reference picks with the threshold of the two-component fit of auto,
    and selection.json records it."""
    from curate.scores import related_split
    from curate.strategies import related_floor, related_order

    proc = run_cli("curate", "select", str(pool), "--n", "40", "--out", str(tmp_path / "sel"))
    assert proc.returncode == 0, proc.stderr
    table, info = read_selection(str(tmp_path / "sel"))
    assert info["strategy"] == "related" and info["score"] == "auto_knn" and table.num_rows == 40
    allp = pool_column(pool, "SELECT uid, pred, auto::DOUBLE AS auto, source FROM samples")
    split = related_split(allp["auto"])
    assert info["related"]["threshold"] == pytest.approx(split.threshold, abs=1e-5)
    assert info["related"]["looks_related"] == int((allp["auto"] >= split.threshold).sum())
    assert info["related"]["floor_per_class"] == related_floor(40, 10) == 4  # 10 classes: each one's share first
    want = related_order(allp["pred"].astype(np.int64), allp["auto"], allp["uid"], split.threshold, 40, 4)
    assert set(table.column("uid").to_pylist()) == set(allp["uid"][want].tolist())
    assert np.mean(allp["source"][want] == "digits") >= 0.9
    proc = run_cli("curate", "select", str(pool), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "--n" in proc.stderr and "Traceback" not in proc.stderr


def test_related_gives_every_class_of_a_few_class_teacher_its_floor():
    """A 10-class teacher whose score ranks one class (9) below most unrelated samples: without a floor the
    selection of 400 holds none of it; with the floor (400 / 10 = 40) it holds that class's best 40, as every
    other class."""
    from curate.strategies import related_floor, related_order

    rng = np.random.default_rng(1)
    pred = np.concatenate([np.repeat(np.arange(10), 100), rng.integers(0, 10, 500)])
    score = np.concatenate([rng.normal(2.0, 0.2, 900), rng.normal(0.3, 0.2, 100), rng.normal(0.5, 0.2, 500)])
    uid = np.arange(len(pred))
    plain = related_order(pred, score, uid, 1.0, 400)
    assert (pred[plain] == 9).sum() == 0
    floor = related_floor(400, 10)
    picked = related_order(pred, score, uid, 1.0, 400, floor)
    assert floor == 40 and (pred[picked] == 9).sum() == 40 and np.bincount(pred[picked], minlength=10).min() == 40
    nine = np.flatnonzero(pred == 9)
    assert set(picked[pred[picked] == 9]) == set(nine[np.argsort(-score[nine])][:40])  # its best 40
    assert related_floor(150, 1000) == 0  # many classes, N far below: no floor
