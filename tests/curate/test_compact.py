"""`curate compact`: fewer files, the same rows, markers kept, safe to kill at any step."""

from __future__ import annotations

import json
import shutil
import signal

import duckdb
import pyarrow.parquet as pq
import pytest

from curate.compact import compact
from curate.config import CompactConfig, IndexConfig, ScoreConfig
from curate.index import index
from curate.pool import Pool
from curate.query import connect
from curate.score import score
from tests.conftest import run_cli

SOURCES = ["noise=synthetic:noise?n=1000&size=8&unit=50", "digits=builtin:digits?start=1500&unit=100"]


@pytest.fixture()
def small_units(teacher, tmp_path):
    cfg = ScoreConfig(str(teacher), SOURCES, str(tmp_path / "pool"), batch_size=64, show_progress=False)
    score(cfg)
    return tmp_path / "pool", cfg


def snapshot(pool) -> list[tuple]:
    con = connect(str(pool))
    return con.sql("SELECT source, sample_id, unit, pred, energy, embedding FROM samples ORDER BY uid").fetchall()


def test_compact_merges_parts_and_every_reader_sees_the_same_rows(small_units):
    root, cfg = small_units
    before = snapshot(root)
    done = {s: Pool(root).done_units(s) for s in ("noise", "digits")}
    proc = run_cli("curate", "compact", str(root), "--target-rows", "300", "--row-group-rows", "128", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "23 files -> 5" in proc.stdout  # 20 noise parts -> 4 files, 3 digits parts (297 rows) -> 1
    noise = root / "samples" / "noise"
    assert not list(noise.glob("unit-*.parquet")) and len(list(noise.glob("compact-*.parquet"))) == 4
    manifest = json.loads((root / "units" / "noise" / "compact-000001.json").read_text())
    assert manifest["units"] == [f"{i:06d}" for i in range(6)] and manifest["rows"] == 300
    meta = pq.read_metadata(noise / "compact-000001.parquet")
    assert meta.num_rows == 300 and meta.num_row_groups == 3  # 128 + 128 + 44
    assert snapshot(root) == before
    assert {s: Pool(root).done_units(s) for s in ("noise", "digits")} == done  # markers kept
    assert score(cfg).rows == 0  # nothing to redo
    assert index(IndexConfig(str(root), show_progress=False)).rows == 1297
    again = compact(CompactConfig(str(root), target_rows=300, show_progress=False))
    assert again.units_merged == 0 and again.files_after == 5


def test_a_compaction_killed_at_any_step_loses_and_duplicates_nothing(small_units):
    root, _ = small_units
    before = snapshot(root)
    noise = root / "samples" / "noise"
    saved = noise.parent.parent.parent / "saved"
    shutil.copytree(noise, saved)
    compact(CompactConfig(str(root), target_rows=300, show_progress=False))
    # killed after writing compact file 1 but before its manifest: a compact file no manifest vouches for
    shutil.copy(noise / "compact-000001.parquet", noise / "compact-000009.parquet")
    (noise / ".compact-000010.parquet.compact.tmp").write_bytes(b"half a file")
    # killed after the manifest but before deleting the parts: the parts are back
    for p in saved.glob("unit-00000[0-5].parquet"):
        shutil.copy(p, noise / p.name)
    assert snapshot(root) == before  # readers see every row once
    con = duckdb.connect()
    assert con.sql(f"SELECT count(*) FROM read_parquet('{noise}/*.parquet')").fetchall()[0][0] > 1000  # raw glob: dups
    res = compact(CompactConfig(str(root), target_rows=300, show_progress=False))
    assert res.units_merged == 0
    assert not (noise / "compact-000009.parquet").exists() and not list(noise.glob("*.tmp"))
    assert not list(noise.glob("unit-*.parquet")) and snapshot(root) == before


KILL_AT = """
import os, signal, sys
from kdcore import storage

calls, kill_at = [0], int(sys.argv[2])


def counted(op):
    def run(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:  # before this write or delete: the state every earlier step left
            os.kill(os.getpid(), signal.SIGKILL)
        return op(*args, **kwargs)
    return run


for name in ("remove", "write_bytes", "open_write", "write_parquet"):
    setattr(storage, name, counted(getattr(storage, name)))
from curate.compact import compact
from curate.config import CompactConfig

compact(CompactConfig(sys.argv[1], target_rows=300, show_progress=False))
"""


def documented_read(root) -> list[tuple]:
    """The README's way for outside readers: the files snapshot.json lists, with DuckDB alone."""
    con = duckdb.connect()
    con.execute(f"SET VARIABLE files = (SELECT list('{root}/' || f) FROM (SELECT unnest(files) AS f "
                f"FROM read_json('{root}/snapshot.json')))")  # fmt: skip
    return con.sql("SELECT source, sample_id, unit, pred, energy FROM read_parquet(getvariable('files')) "
                   "ORDER BY uid").fetchall()  # fmt: skip


def test_outside_readers_see_each_sample_once_while_a_compaction_is_killed_at_every_step(small_units, tmp_path):
    import subprocess
    import sys

    from tests.conftest import CLI_ENV, ROOT

    root, _ = small_units
    before = documented_read(root)
    assert len(before) == len({r[1] for r in before}) == 1297
    through_sql = snapshot(root)
    # each run is killed one step further into its own work: before its first snapshot, before writing a compact
    # file, before its manifest, before the snapshot that switches to it, between deleting its parts, ...
    for kill_at in (1, 2, 3, 4, 6, 12, 14):
        proc = subprocess.run([sys.executable, "-c", KILL_AT, str(root), str(kill_at)], env=CLI_ENV, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert documented_read(root) == before, kill_at
        assert snapshot(root) == through_sql, kill_at  # and `curate sql`'s views
    res = compact(CompactConfig(str(root), target_rows=300, show_progress=False))
    assert documented_read(root) == before and res.files_after == 5
    glob = duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/samples/*/*.parquet')").fetchall()[0][0]
    assert glob == 1297  # and once it has ended, the plain glob agrees
