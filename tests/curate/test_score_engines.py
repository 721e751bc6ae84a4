"""Unit retries, failed-unit reports, and the Ray engine writing the same pool as the local one."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.config import ScoreConfig
from curate.pool import Pool
from curate.score import score
from curate.sources.builtin import BuiltinSource
from curate.sources.builtin import digits as load_digits
from kdcore.errors import UserError
from tests.conftest import ROOT

DIGITS = "d=builtin:digits?start=1400&stop=1700&unit=100"


def rows_of(pool) -> dict[str, dict]:
    con = duckdb.connect()
    t = con.sql(f"SELECT * FROM read_parquet('{pool}/samples/*/*.parquet', hive_partitioning=1)").to_arrow_table()
    return {r["sample_id"]: r for r in t.to_pylist()}


def flaky_reads(monkeypatch, unit_id: str, failures: int) -> dict[str, int]:
    """Reading `unit_id` raises half-way through on its first `failures` tries (after yielding samples)."""
    calls = {"tries": 0}
    real = BuiltinSource.read

    def read(self, unit, only=None):
        if unit.id != unit_id:
            yield from real(self, unit, only)
            return
        calls["tries"] += 1
        for i, item in enumerate(real(self, unit, only)):
            if i == 50 and calls["tries"] <= failures:
                raise OSError("stale file handle")
            yield item

    monkeypatch.setattr(BuiltinSource, "read", read)
    return calls


def test_a_unit_that_fails_mid_read_is_retried_and_scored_exactly_once(teacher, tmp_path, monkeypatch):
    clean = score(ScoreConfig(str(teacher), [DIGITS], str(tmp_path / "clean"), batch_size=32, show_progress=False))
    calls = flaky_reads(monkeypatch, "000001", failures=2)
    res = score(ScoreConfig(str(teacher), [DIGITS], str(tmp_path / "p"), batch_size=32, show_progress=False))
    assert calls["tries"] == 3 and not res.failed_units
    assert res.rows == clean.rows == 300
    got, want = rows_of(tmp_path / "p"), rows_of(tmp_path / "clean")
    assert got.keys() == want.keys()  # the 50 samples of each failed try were dropped, not kept twice
    assert all(np.allclose(got[k]["logits"], want[k]["logits"], atol=1e-5) for k in want)


def test_a_unit_that_keeps_failing_is_reported_and_the_next_run_tries_it_again(teacher, tmp_path, monkeypatch):
    cfg = ScoreConfig(str(teacher), [DIGITS], str(tmp_path / "p"), batch_size=32, retries=1, show_progress=False)
    calls = flaky_reads(monkeypatch, "000001", failures=99)
    res = score(cfg)
    assert calls["tries"] == 2
    assert res.failed_units == [("d", "000001", "reading the unit failed: OSError: stale file handle")]
    assert res.rows == 200 and res.error_rate == pytest.approx(100 / 300)  # its 100 samples count as errors
    assert res.per_source["d"].errors == 100  # in the summary's errors too, not only in the rate
    pool = Pool(tmp_path / "p")
    assert set(pool.done_units("d")) == {"000000", "000002"}  # no marker: not silently done
    errors = duckdb.sql(f"SELECT key, reason FROM '{tmp_path}/p/errors/*/*.parquet'").fetchall()
    assert errors == [("<unit 000001>", "reading the unit failed: OSError: stale file handle")]
    assert len(rows_of(tmp_path / "p")) == 200  # the partial rows of the failed tries are nowhere

    monkeypatch.undo()  # the storage recovered
    res = score(cfg)
    assert res.per_source["d"].units_skipped == 2 and res.rows == 100 and not res.failed_units
    assert set(pool.done_units("d")) == {"000000", "000001", "000002"}
    assert not list((tmp_path / "p" / "errors").rglob("*.parquet"))  # the failure row went with the success
    assert len(rows_of(tmp_path / "p")) == 300


def png_parquet(path, images: np.ndarray, per_group: int, corrupt_group: int) -> None:
    """Digits as PNG bytes in a Parquet file; one row group's first page header overwritten with garbage."""
    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        blobs.append(buf.getvalue())
    pq.write_table(pa.table({"image": blobs}), path, row_group_size=per_group, compression="none")
    offset = pq.ParquetFile(path).metadata.row_group(corrupt_group).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def loopback_only(cmd: list[str]) -> list[str]:
    """Ray binds the machine's interface address: run it in a network namespace with only loopback."""
    inner = "ip link set lo up && exec " + " ".join(f"'{c}'" for c in cmd)
    return ["unshare", "-n", "sh", "-c", inner]


def test_ray_engine_writes_the_same_pool_as_the_local_engine(teacher, tmp_path):
    pytest.importorskip("ray")
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"]).returncode != 0:
        pytest.skip("Ray tests need a loopback-only network namespace (unshare -n, as root)")
    x, _ = load_digits()
    png_parquet(tmp_path / "png.parquet", x[1500:1620], per_group=40, corrupt_group=1)
    srcs = [DIGITS, f"p=parquet:{tmp_path / 'png.parquet'}", "g=synthetic:glyphs?n=150&unit=64"]
    args = ["--teacher", str(teacher), "--batch-size", "32", "--max-error-rate", "0.5", "--no-progress", "--json"]
    for s in srcs:
        args += ["--source", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the terminal's COLUMNS as it is: the assertions read JSON

    def run(pool: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "curate", "score", "--pool", str(tmp_path / pool), *args, *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)

    local = run("local")
    ray_run = subprocess.run(
        loopback_only([sys.executable, "-m", "curate", "score", "--pool", str(tmp_path / "ray"), *args,
                       "--engine", "ray"]),
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    for proc, engine in ((local, "local"), (ray_run, "ray")):
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "1 unit(s) failed 3 tries" in proc.stderr and "p/png-00001" in proc.stderr
        assert "Traceback" not in proc.stderr
        summary = json.loads(proc.stdout)  # the result as data: no terminal width or path length in the way
        assert summary["engine"] == engine and summary["batch_size"] == 32
        assert summary["errors"] == summary["per_source"]["p"]["errors"] == 40  # the failed unit's 40 samples
    want, got = rows_of(tmp_path / "local"), rows_of(tmp_path / "ray")
    assert len(want) == 300 + 80 + 150 and got.keys() == want.keys()
    for k, w in want.items():
        g = got[k]
        assert (g["uid"], g["key"], g["unit"], g["content_hash"], g["pred"], g["source"]) == (
            w["uid"], w["key"], w["unit"], w["content_hash"], w["pred"], w["source"])  # fmt: skip
        assert np.allclose(g["logits"], w["logits"], atol=1e-4) and np.allclose(
            g["embedding"], w["embedding"], atol=1e-4
        )
    assert set(Pool(tmp_path / "ray").done_units("p")) == set(Pool(tmp_path / "local").done_units("p")) == {
        "png-00000", "png-00002"}  # fmt: skip

    # resume: units lost from the Ray pool (a killed run) are redone by the next Ray run, the rest skipped
    for unit in ("000001", "000002"):
        os.unlink(Pool(tmp_path / "ray").record("d", unit))
    again = subprocess.run(
        loopback_only([sys.executable, "-m", "curate", "score", "--pool", str(tmp_path / "ray"), *args,
                       "--engine", "ray"]),
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert rows_of(tmp_path / "ray").keys() == want.keys()
    assert set(Pool(tmp_path / "ray").done_units("d")) == {"000000", "000001", "000002"}


def test_the_default_batch_follows_the_memory_budget_and_the_input_size(teacher):
    from curate.scoring import TeacherRunner
    from curate.sources import parse_source

    big = "torchvision:resnet18?num_classes=10&size=240&weights=random"
    units = parse_source("n=synthetic:noise?n=1270&size=240&unit=1270").units()
    chosen = {mem: TeacherRunner(ScoreConfig(big, [], "p", memory=mem)).choose_batch(units, workers=1)
              for mem in ("1GB", "256MB")}  # fmt: skip
    assert chosen["256MB"][0] < chosen["1GB"][0] < 256 and "auto" in chosen["1GB"][1]
    assert all(b & (b - 1) == 0 for b, _ in chosen.values())  # powers of two
    small = TeacherRunner(ScoreConfig(str(teacher), [], "p"))  # 8x8 inputs: the ceiling, no more than the data
    assert small.choose_batch(units, workers=1)[0] == 256
    assert small.choose_batch(parse_source("n=synthetic:noise?n=40&size=8").units(), workers=1)[0] == 40


def test_a_batch_larger_than_the_data_is_clamped(teacher, tmp_path):
    res = score(ScoreConfig(str(teacher), ["n=synthetic:noise?n=40&size=8"], str(tmp_path / "p"), batch_size=60_000,
                            show_progress=False))  # fmt: skip
    assert res.rows == 40 and res.batch_size == 40 and "clamped" in res.batch_note


def test_ray_workers_get_the_drivers_storage_environment(monkeypatch, tmp_path):
    ray = pytest.importorskip("ray")
    from curate import score_ray
    from kdcore import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/secrets/sa.json")
    monkeypatch.setenv("KDCURATE_UNRELATED", "x")
    env = storage.environment()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and "GOOGLE_APPLICATION_CREDENTIALS" in env
    assert "KDCURATE_UNRELATED" not in env and "PATH" not in env
    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        raise ConnectionError("no cluster here")

    monkeypatch.setattr(ray, "init", init)
    units = [score_ray.Unit("n", "000000", (), 1, None)]
    cfg = ScoreConfig("t", [], str(tmp_path / "p"), engine="ray", ray_address="127.0.0.1:1")
    with pytest.raises(UserError, match="cannot reach a Ray cluster"):
        score_ray.run_ray(cfg, units, None, None)
    assert seen["runtime_env"]["env_vars"] == env
