"""The score stage end to end: real pools, real DuckDB, real FAISS, real subprocess CLI calls."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.config import IndexConfig, ScoreConfig
from curate.index import choose_kind, index
from curate.pool import Pool
from curate.score import score
from curate.sources import content_hash, uid_of
from curate.sources.builtin import digits as load_digits
from tests.conftest import ROOT, auroc, run_cli

SAMPLES = "read_parquet('{pool}/samples/*/*.parquet')"


def test_pool_layout_columns_and_conventions(pool):
    meta = json.loads((pool / "pool.json").read_text())
    assert meta["teacher"]["sha256"] and meta["classes"] == [str(i) for i in range(10)]
    assert all("higher means more related" in s["direction"] for s in meta["scores"].values())
    assert meta["embedding"]["dim"] == 32 and meta["input"]["size"] == 8
    parts = sorted((pool / "samples" / "digits").glob("unit-*.parquet"))
    records = pool / "units" / "digits"
    assert len(parts) == 3 and all((records / f"{p.stem}.json").exists() for p in parts)
    assert not [p for p in (pool / "samples").rglob("*") if p.is_file() and p.suffix != ".parquet"]
    assert pq.read_metadata(parts[0]).row_group(0).column(0).compression == "ZSTD"
    t = pq.read_table(parts[0])
    assert t.column("source").to_pylist() == ["digits"] * t.num_rows  # also the hive partition
    row = t.slice(0, 1).to_pylist()[0]
    assert row["sample_id"] == "digits/1500" and row["uid"] == uid_of("digits/1500")
    x, y = load_digits()
    assert row["content_hash"] == content_hash(x[1500]) and row["label"] == y[1500]
    assert len(row["logits"]) == 10 and len(row["embedding"]) == 32
    assert row["pred"] == int(np.argmax(row["logits"]))
    assert (row["width"], row["height"]) == (8, 8)


def test_generic_readers_read_the_pool_folder_as_it_is(pool):
    """pyarrow datasets (hive discovery or not), pq.read_table, pandas and DuckDB read samples/ as it is: only
    Parquet there, the source a column of every file."""
    import pandas as pd
    import pyarrow.dataset as ds

    tables = [
        ds.dataset(pool / "samples", partitioning="hive").to_table(columns=["uid", "source"]),
        ds.dataset(pool / "samples", format="parquet").to_table(columns=["uid", "source"]),
        pq.read_table(pool / "samples", columns=["uid", "source"]),
        pa.Table.from_pandas(pd.read_parquet(pool / "samples", columns=["uid", "source"])),
        duckdb.sql(
            f"SELECT uid, source FROM read_parquet('{pool}/samples/*/*.parquet', hive_partitioning=1)"
        ).to_arrow_table(),
    ]
    for t in tables:
        assert t.num_rows == 997
        assert sorted(set(map(str, t.column("source").to_pylist()))) == ["digits", "glyphs", "leaves", "noise"]


def test_duckdb_reads_the_pool(pool):
    q = f"SELECT source, count(*) n, count(label) labelled FROM {SAMPLES} GROUP BY source ORDER BY source"
    rows = duckdb.sql(q.format(pool=pool)).fetchall()
    assert rows == [("digits", 297, 297), ("glyphs", 200, 0), ("leaves", 200, 0), ("noise", 300, 0)]
    dup = duckdb.sql(f"SELECT count(*) - count(DISTINCT uid) FROM {SAMPLES}".format(pool=pool)).fetchall()[0]
    assert dup == (0,)


def test_scores_separate_in_distribution_from_noise(pool):
    """On a teacher trained in the test (with outlier exposure), confidence, energy and bn_score rank
    held-out digits above noise."""
    con = duckdb.connect()
    for col in ("confidence", "energy", "bn_score"):
        pos = con.sql(f"SELECT {col} FROM {SAMPLES} WHERE source='digits'".format(pool=pool)).fetchnumpy()[col]
        neg = con.sql(f"SELECT {col} FROM {SAMPLES} WHERE source='noise'".format(pool=pool)).fetchnumpy()[col]
        assert auroc(pos, neg) > 0.9, col


def test_bn_score_separates_noise_even_for_an_overconfident_teacher(plain_teacher, tmp_path):
    """bn_score needs no calibrated softmax: it flags noise from the BatchNorm statistics alone."""
    score(
        ScoreConfig(
            teacher=str(plain_teacher),
            sources=["digits=builtin:digits?start=1500", "noise=synthetic:noise?n=300"],
            pool=str(tmp_path),
            show_progress=False,
        )
    )
    q = f"SELECT bn_score FROM {SAMPLES} WHERE source=".format(pool=tmp_path)
    pos, neg = (duckdb.sql(q + f"'{s}'").fetchnumpy()["bn_score"] for s in ("digits", "noise"))
    assert auroc(pos, neg) > 0.9


def test_teacher_accuracy_is_visible_through_sql(pool):
    acc = duckdb.sql(f"SELECT avg((pred = label)::INT) FROM {SAMPLES} WHERE label IS NOT NULL".format(pool=pool))
    assert acc.fetchall()[0][0] > 0.8


def test_rerun_skips_done_units(pool, teacher):
    before = {p: p.stat().st_mtime_ns for p in pool.glob("samples/*/*.parquet")}
    res = score(
        ScoreConfig(
            teacher=str(teacher),
            sources=["noise=synthetic:noise?n=300&size=8&unit=128"],
            pool=str(pool),
            show_progress=False,
        )
    )
    assert res.per_source["noise"].units_skipped == 3 and res.rows == 0
    assert before == {p: p.stat().st_mtime_ns for p in pool.glob("samples/*/*.parquet")}


def test_faiss_index_returns_each_sample_as_its_own_neighbour(pool):
    res = index(IndexConfig(str(pool), show_progress=False))
    assert res.kind == "flat" and res.rows == 997 and res.recall_at_10 > 0.99
    idx = faiss.read_index(str(pool / "index" / "embeddings.faiss"))
    t = duckdb.sql(f"SELECT uid, embedding FROM {SAMPLES} WHERE source='digits' LIMIT 50".format(pool=pool))
    uids, embs = zip(*t.fetchall(), strict=True)
    q = np.array(embs, np.float32)
    faiss.normalize_L2(q)
    _, found = idx.search(q, 1)
    assert found[:, 0].tolist() == list(uids)
    info = json.loads((pool / "index" / "embeddings.json").read_text())
    assert info["ids"] == "pool uid" and info["recall_at_10"] == res.recall_at_10


def test_ivf_pq_index_under_a_small_budget(teacher, tmp_path):
    score(
        ScoreConfig(
            teacher=str(teacher), sources=["s=synthetic:shaders?n=3000&size=8"], pool=str(tmp_path), show_progress=False
        )
    )
    assert choose_kind(3000, 32, 4 * 2**30, "auto")[0] == "flat"
    assert choose_kind(3000, 32, 200_000, "auto")[0] == "ivf-pq"
    res = index(IndexConfig(str(tmp_path), memory="200KB", show_progress=False))
    assert res.kind == "ivf-pq" and res.factory.startswith("IVF") and 0.3 < res.recall_at_10 <= 1.0


def test_topk_logits_and_teacher_without_batchnorm(mlp_teacher, tmp_path):
    score(
        ScoreConfig(
            teacher=str(mlp_teacher),
            sources=["d=builtin:digits?stop=50"],
            pool=str(tmp_path),
            logits="topk:3",
            odin=True,
            show_progress=False,
        )
    )
    t = duckdb.sql(f"SELECT * FROM {SAMPLES}".format(pool=tmp_path)).to_arrow_table()
    assert "logits" not in t.column_names and {"topk_idx", "topk_val", "logsumexp"} <= set(t.column_names)
    assert t.column("bn_score").null_count == 50  # null, not garbage
    row = t.slice(0, 1).to_pylist()[0]
    assert row["topk_idx"][0] == row["pred"] and row["topk_val"][0] == pytest.approx(row["max_logit"])
    meta = json.loads((tmp_path / "pool.json").read_text())
    assert meta["bn_score_available"] is False and "odin" in meta["scores"]
    odin = t.column("odin").to_numpy()
    assert t.column("odin").null_count == 0 and ((odin > 0) & (odin <= 1)).all()


def make_bad_folder(root) -> int:
    """Good images of several modes, plus truncated, zero-byte, non-image and bomb files."""
    root.mkdir()
    good = {
        "rgb.jpg": Image.new("RGB", (30, 20), (200, 10, 10)),
        "rgba.png": Image.new("RGBA", (12, 12), (10, 200, 10, 128)),
        "pal.gif": Image.new("P", (12, 12), 5),
        "cmyk.jpg": Image.new("CMYK", (12, 12), (0, 50, 0, 0)),
        "deep.png": Image.fromarray(np.full((9, 9), 40000, np.uint16)),
    }
    for name, img in good.items():
        img.save(root / name)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[:50])
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("just text")
    Image.new("1", (9000, 9000), 0).save(root / "bomb.png")
    return len(good)


def test_corrupt_files_land_in_errors_and_the_exit_code_follows_the_rate(teacher, tmp_path):
    n_good = make_bad_folder(tmp_path / "imgs")
    args = [
        "curate",
        "score",
        "--teacher",
        str(teacher),
        "--source",
        f"f=folder:{tmp_path / 'imgs'}",
        "--pool",
        str(tmp_path / "pool"),
        "--no-progress",
    ]
    proc = run_cli(*args)
    assert proc.returncode == 1 and "exceeds --max-error-rate" in proc.stderr
    assert "Traceback" not in proc.stderr
    errs = duckdb.sql(f"SELECT key, reason FROM '{tmp_path}/pool/errors/*/*.parquet' ORDER BY key").fetchall()
    reasons = dict(errs)
    assert set(reasons) == {"bomb.png", "empty.png", "text.png", "truncated.png"}
    assert "decompression bomb" in reasons["bomb.png"] and "zero-byte" in reasons["empty.png"]
    assert "not an image" in reasons["text.png"] and "corrupt" in reasons["truncated.png"]
    rows = duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/pool/samples/*/*.parquet'").fetchall()[0][0]
    assert rows == n_good
    proc = run_cli(*args, "--max-error-rate", "0.5")
    assert proc.returncode == 0, proc.stderr


def test_sigkill_at_any_moment_then_rerun_is_exactly_once(teacher, tmp_path):
    n = 2400
    args = [
        sys.executable,
        "-m",
        "curate",
        "score",
        "--teacher",
        str(teacher),
        "--pool",
        str(tmp_path / "p"),
        "--source",
        f"s=synthetic:shaders?n={n}&size=32&unit=100",
        "--batch-size",
        "50",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    pool = Pool(tmp_path / "p")
    for kill_after in (2, 9):  # kill twice, at different points
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while len(pool.done_units("s")) < kill_after and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(pool.done_units("s")) < n // 100  # it really was cut short
    subprocess.run(args, env=env, cwd=ROOT, check=True, capture_output=True, timeout=300)
    keys = duckdb.sql(f"SELECT key FROM '{tmp_path}/p/samples/*/*.parquet'").fetchnumpy()["key"]
    assert len(keys) == n and len(set(keys)) == n
    assert not list((tmp_path / "p").rglob("*.tmp"))


def test_rescoring_with_another_teacher_is_refused(teacher, mlp_teacher, tmp_path):
    base = ["curate", "score", "--source", "d=builtin:digits?stop=20", "--pool", str(tmp_path), "--no-progress"]
    assert run_cli(*base, "--teacher", str(teacher)).returncode == 0
    proc = run_cli(*base, "--teacher", str(mlp_teacher))
    assert proc.returncode == 2 and "another teacher_sha256" in proc.stderr and "--overwrite" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli(*base, "--teacher", str(mlp_teacher), "--overwrite")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--source", "bad-spec"], "needs a name"),
        (["--source", "x=folder:/no/such/dir"], "folder not found"),
        (["--source", "x=builtin:digits", "--logits", "topk:99"], "topk:K"),
        (["--source", "x=builtin:digits", "--embed-layer", "nope"], "no module 'nope'"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(teacher, tmp_path, extra, message):
    proc = run_cli("curate", "score", "--teacher", str(teacher), "--pool", str(tmp_path / "p"), *extra)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_cli_bad_teacher_is_one_line_exit_2(teacher, tmp_path):
    for spec, message in [
        (str(tmp_path / "missing.pt"), "not found"),
        (f"torchvision:resnet18?num_classes=10&weights={teacher}", "does not fit the architecture"),
        ("python:nowhere.module:fn?size=8&channels=1", "cannot import factory"),
    ]:
        proc = run_cli("curate", "score", "--teacher", spec, "--source", "d=builtin:digits", "--pool", str(tmp_path))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("curate", "index", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "not a pool" in proc.stderr


def test_embedding_batches_smaller_than_a_row_group_keep_rows_aligned(pool):
    from curate.index import embedding_batches
    from curate.pool import Pool
    from curate.query import connect

    got = {}
    for uids, vecs in embedding_batches(Pool(pool), rows=37):  # batches slice the row groups
        assert len(uids) == len(vecs)
        got.update(zip(uids.tolist(), vecs, strict=True))
    want = dict(connect(str(pool)).execute("SELECT uid, embedding FROM samples").fetchall())
    assert len(got) == len(want) == 997
    for uid in list(want)[::50]:
        v = np.asarray(want[uid], np.float32)
        assert np.allclose(got[uid], v / max(np.linalg.norm(v), 1e-12), atol=1e-5)
