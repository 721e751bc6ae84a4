"""`curate sql`: DuckDB views and macros over a real pool, read-only, errors as one line."""

from __future__ import annotations

import csv
import io
import json
import math

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from curate.config import ScoreConfig, SqlConfig
from curate.query import connect, sql
from curate.score import score
from kdcore.errors import UserError
from tests.conftest import run_cli


def snapshot(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_views_and_group_by(pool):
    con = connect(str(pool))
    rows = con.execute("SELECT source, count(*) FROM samples GROUP BY source ORDER BY source").fetchall()
    assert rows == [("digits", 297), ("glyphs", 200), ("leaves", 200), ("noise", 300)]
    assert con.execute("SELECT count(*) FROM errors").fetchone() == (0,)


def test_macros_match_hand_computations(pool):
    con = connect(str(pool))
    logits, pred, conf, p, top = con.execute(
        "SELECT logits, pred, confidence, prob(logits, pred), topk_classes(logits, 3) FROM samples LIMIT 1"
    ).fetchone()
    z = [math.exp(v - max(logits)) for v in logits]
    assert p == pytest.approx(z[pred] / sum(z), rel=1e-5) and p == pytest.approx(conf, rel=1e-5)
    assert top == sorted(range(10), key=lambda k: -logits[k])[:3] and top[0] == pred
    uniform, peaked = con.execute(
        "SELECT rel_entropy([5, 5, 5, 5, 5, 5, 5, 5, 5, 5]), rel_entropy([9, 0, 0])"
    ).fetchone()
    assert uniform == pytest.approx(1.0) and peaked == pytest.approx(0.0)
    h = con.execute(
        "SELECT rel_entropy(list(n)) FROM (SELECT pred, count(*) n FROM samples WHERE source='digits' GROUP BY pred)"
    ).fetchone()[0]
    assert 0.9 < h <= 1.0  # held-out digits: the teacher predicts all ten classes about evenly


def test_outputs_csv_json_parquet_and_the_pool_is_untouched(pool, tmp_path, capsys):
    before = snapshot(pool)
    q = "SELECT uid, source, confidence FROM samples WHERE confidence > 0.9 ORDER BY uid"
    expected = (
        duckdb.connect()
        .execute(
            f"SELECT count(*) FROM read_parquet('{pool}/samples/*/*.parquet', hive_partitioning=1) "
            "WHERE confidence > 0.9"
        )
        .fetchone()[0]
    )
    assert sql(SqlConfig(str(pool), q, format="parquet", out=str(tmp_path / "r.parquet"))) == expected
    assert pq.read_table(tmp_path / "r.parquet").num_rows == expected
    assert sql(SqlConfig(str(pool), q, format="csv")) == expected
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["uid", "source", "confidence"] and len(rows) == expected + 1
    sql(SqlConfig(str(pool), q + " LIMIT 3", format="json"))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and set(json.loads(lines[0])) == {"uid", "source", "confidence"}
    assert snapshot(pool) == before
    with pytest.raises(UserError, match="inside the pool"):
        sql(SqlConfig(str(pool), q, format="parquet", out=str(pool / "x.parquet")))


def test_csv_lines_end_with_a_newline_only(pool, tmp_path):
    """`n=$(curate sql ... --format csv | tail -n 1)` holds the number, not the number and a carriage return."""
    import subprocess
    import sys

    from tests.conftest import CLI_ENV, ROOT

    query = "SELECT source, count(*) AS n FROM samples GROUP BY source ORDER BY source"
    out = subprocess.run([sys.executable, "-m", "curate", "sql", str(pool), query, "--format", "csv"], env=CLI_ENV,
                         cwd=ROOT, capture_output=True, check=True).stdout  # fmt: skip
    assert b"\r" not in out and out.endswith(b"\n")
    assert out.splitlines()[0] == b"source,n" and out.splitlines()[-1] == b"noise,300"
    sql(SqlConfig(str(pool), query, format="csv", out=str(tmp_path / "r.csv")))
    assert (tmp_path / "r.csv").read_bytes() == out


def test_table_output_truncates_wide_lists(pool):
    proc = run_cli("curate", "sql", str(pool), "SELECT logits, embedding FROM samples", "--limit", "2")
    assert proc.returncode == 0, proc.stderr
    assert "…] (10)" in proc.stdout and "…] (32)" in proc.stdout and "first 2 rows shown" in proc.stderr


@pytest.mark.parametrize("query", ["SELECT nope FROM samples", "SELEKT 1", "SELECT * FROM missing_table"])
def test_sql_errors_are_one_line_exit_2(pool, query):
    proc = run_cli("curate", "sql", str(pool), query)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: SQL error:")


def percent_rank(x: np.ndarray) -> np.ndarray:
    """SQL percent_rank(): (rank - 1) / (n - 1), ties take the lowest rank."""
    order = np.sort(x)
    return np.searchsorted(order, x, side="left") / (len(x) - 1)


def test_auto_is_the_weighted_percentile_rank_of_the_scores_the_teacher_gives(pool, mlp_teacher, tmp_path):
    """auto = (3 rank(bn_z) + rank(span_score) + rank(energy)) / 5 over the stored pool, bn_z the BatchNorm
    deviations each divided by its layer's spread over the pool (float32 in the view, hence the tolerance)."""
    meta = json.loads((pool / "pool.json").read_text())
    assert {"bn_score", "span_score", "energy"} <= set(meta["available_scores"])
    t = pq.read_table(pool / "samples", columns=["uid", "bn_layers", "span_score", "energy"]).sort_by("uid")
    layers = np.array(t.column("bn_layers").to_pylist(), np.float64)
    bn_z = -(layers / (layers.std(0) + 1e-6)).sum(1) / layers.shape[1]
    ranks = [percent_rank(x) for x in (bn_z, t.column("span_score").to_numpy().astype(np.float64),
                                       t.column("energy").to_numpy().astype(np.float64))]  # fmt: skip
    want = (3 * ranks[0] + ranks[1] + ranks[2]) / 5
    got = np.array([r[0] for r in connect(str(pool)).execute("SELECT auto FROM samples ORDER BY uid").fetchall()])
    assert np.mean(np.abs(got - want) < 1e-3) > 0.99  # float32 bn_z may swap near-ties, nothing more
    # a teacher without BatchNorm: bn_score is null, so auto fuses the scores it does give
    mlp_pool = tmp_path / "mlp"
    score(ScoreConfig(str(mlp_teacher), ["digits=builtin:digits?stop=200", "noise=synthetic:noise?n=100&size=8"],
                      str(mlp_pool), show_progress=False))  # fmt: skip
    assert "bn_score" not in json.loads((mlp_pool / "pool.json").read_text())["available_scores"]
    t = pq.read_table(mlp_pool / "samples", columns=["uid", "span_score", "energy"]).sort_by("uid")
    want = np.mean([percent_rank(t.column(c).to_numpy().astype(np.float64)) for c in ("span_score", "energy")], 0)
    got = np.array([r[0] for r in connect(str(mlp_pool)).execute("SELECT auto FROM samples ORDER BY uid").fetchall()])
    np.testing.assert_allclose(got, want, atol=1e-6)
