"""Nothing lands in the wrong place: an empty or root location is refused for every --pool, --out and a
job's work; a selection is only ever read against the pool it was made on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from curate.config import (
    CompactConfig,
    ExportConfig,
    IndexConfig,
    ReportConfig,
    ScoreConfig,
    SelectConfig,
    SqlConfig,
)
from curate.export import export
from curate.query import sql
from curate.report import report
from curate.score import score
from curate.select import select
from distill.config import FinetuneConfig, TrainConfig
from kdcore.errors import UserError
from tests.conftest import run_cli, start_cli

EMPTY_OR_ROOT = ["", "  ", "/", "file:///", "s3://bucket", "s3://bucket/"]


@pytest.fixture
def in_empty_dir(tmp_path, monkeypatch):
    """Run in an empty working directory, to see that nothing was written into it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _stages(pool: str, out: str, selection: str, run: str) -> dict:
    from curate.compact import compact
    from curate.index import index
    from distill.finetune import finetune
    from distill.train import train

    return {
        "compact --pool": lambda p: compact(CompactConfig(pool=p, show_progress=False)),
        "index --pool": lambda p: index(IndexConfig(pool=p, show_progress=False)),
        "sql --pool": lambda p: sql(SqlConfig(pool=p, query="SELECT 1")),
        "select --pool": lambda p: select(SelectConfig(pool=p, out=out, strategy="random", n=30)),
        "select --out": lambda o: select(SelectConfig(pool=pool, out=o, strategy="random", n=30)),
        "report --pool": lambda p: report(ReportConfig(pool=p, out=out)),
        "report --out": lambda o: report(ReportConfig(pool=pool, out=o)),
        "export --pool": lambda p: export(ExportConfig(pool=p, selection=selection, out=out)),
        "export --out": lambda o: export(ExportConfig(pool=pool, selection=selection, out=o)),
        "train --out": lambda o: train(TrainConfig(shards=out, out=o, steps=1)),
        "finetune --out": lambda o: finetune(FinetuneConfig(run=run, data=out, out=o)),
    }


@pytest.mark.parametrize("where", EMPTY_OR_ROOT)
def test_every_pool_and_out_refuses_an_empty_or_root_location(pool, teacher, tmp_path, in_empty_dir, where):
    sel = tmp_path / "sel"
    select(SelectConfig(pool=str(pool), out=str(sel), strategy="random", n=30))
    for name, call in _stages(str(pool), str(tmp_path / "out"), str(sel), str(teacher)).items():
        option = name.split()[1]
        with pytest.raises(UserError, match=f"^{option} .*(empty|root)") as e:
            call(where)
        assert "\n" not in str(e.value), name
    assert list(in_empty_dir.iterdir()) == [] and not (tmp_path / "out").exists()


def test_score_refuses_an_empty_pool_before_anything_runs(teacher, in_empty_dir):
    proc = run_cli("curate", "score", "--teacher", str(teacher), "--source", "n=synthetic:noise?n=8&size=8",
                   "--pool", "", "--no-progress")  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --pool is empty: give a folder (an unset shell " \
        "variable?)"  # fmt: skip
    with pytest.raises(UserError, match="^--pool / is the filesystem root"):
        score(ScoreConfig(teacher=str(teacher), sources=["n=synthetic:noise?n=8&size=8"], pool="/"))
    assert list(in_empty_dir.iterdir()) == []


def test_an_empty_work_in_a_job_is_refused(tmp_path, teacher):
    from pipelines.run import load_job

    job = tmp_path / "job.toml"
    job.write_text(f'[job]\nname = "j"\nwork = ""\n\n[teacher]\nspec = "{teacher}"\n\n'
                   '[score]\nsources = ["n=synthetic:noise?n=8&size=8"]\n')  # fmt: skip
    with pytest.raises(UserError, match=r"\[job\] work is empty"):
        load_job(str(job))


def test_select_refuses_a_folder_of_other_files_and_overwrites_its_own(pool, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(UserError, match=r"already holds other files \(cat.jpg\)"):
        select(SelectConfig(pool=str(pool), out=str(photos), strategy="random", n=30))
    assert [p.name for p in photos.iterdir()] == ["cat.jpg"]
    sel = tmp_path / "sel"
    for n in (10, 20):  # a previous selection is replaced
        select(SelectConfig(pool=str(pool), out=str(sel), strategy="random", n=n))
    assert sorted(p.name for p in sel.iterdir()) == ["selection.json", "selection.parquet"]
    assert json.loads((sel / "selection.json").read_text())["rows"] == 20


@pytest.fixture(scope="module")
def other_pool(teacher, tmp_path_factory):
    """A second pool with a source named as one of `pool`'s ('noise'): the same uids, other images."""
    root = tmp_path_factory.mktemp("other") / "other"
    score(ScoreConfig(teacher=str(teacher), sources=["noise=synthetic:noise?n=300&size=8&seed=7"], pool=str(root),
                      show_progress=False))  # fmt: skip
    return root


def test_a_selection_made_on_another_pool_is_refused(pool, other_pool, tmp_path):
    sel = tmp_path / "sel"
    select(SelectConfig(pool=str(other_pool), out=str(sel), strategy="random", n=50))
    ids = [json.loads((p / "pool.json").read_text())["pool_id"] for p in (pool, other_pool)]
    assert ids[0] != ids[1] and json.loads((sel / "selection.json").read_text())["pool_id"] == ids[1]
    calls = {
        "export": lambda: export(ExportConfig(pool=str(pool), selection=str(sel), out=str(tmp_path / "shards"))),
        "report": lambda: report(ReportConfig(pool=str(pool), selection=str(sel), out=str(tmp_path / "report"))),
        "sql": lambda: sql(SqlConfig(pool=str(pool), selection=str(sel), query="SELECT count(*) FROM selection")),
    }
    for name, call in calls.items():
        with pytest.raises(UserError, match=f"made on pool .*{ids[1]}.*not on .*{ids[0]}") as e:
            call()
        assert "\n" not in str(e.value), name
    assert not (tmp_path / "shards").exists() and not (tmp_path / "report").exists()
    proc = run_cli("curate", "export", str(pool), "--selection", str(sel), "--out", str(tmp_path / "shards"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "select again" in proc.stderr
    # on its own pool the selection is read as before
    export(ExportConfig(pool=str(other_pool), selection=str(sel), out=str(tmp_path / "own"), show_progress=False))
    assert json.loads((tmp_path / "own" / "manifest.json").read_text())["count"] == 50


def test_a_pool_written_before_ids_gets_a_stable_one(other_pool, teacher, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(other_pool, old)
    meta = json.loads((old / "pool.json").read_text())
    del meta["pool_id"]
    (old / "pool.json").write_text(json.dumps(meta))
    sel = tmp_path / "sel"
    select(SelectConfig(pool=str(old), out=str(sel), strategy="random", n=5))
    derived = json.loads((sel / "selection.json").read_text())["pool_id"]
    assert derived.startswith("legacy-")
    sql(SqlConfig(pool=str(old), selection=str(sel), query="SELECT count(*) FROM selection"))  # accepted
    score(ScoreConfig(teacher=str(teacher), sources=["noise=synthetic:noise?n=300&size=8&seed=7"], pool=str(old),
                      show_progress=False))  # fmt: skip
    assert json.loads((old / "pool.json").read_text())["pool_id"] == derived  # recorded by the next score


def _writers(parent: int) -> list[int]:
    """The spawned writer processes of a process (not its resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has stopped; only its exit status waits to be collected


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_export_writers_end_when_the_export_is_killed(tmp_path):
    out = tmp_path / "shards"
    proc = start_cli("curate", "export", "--source", "n=synthetic:noise?n=400000&size=32", "--out", str(out),
                     "--workers", "2", "--shard-size", "200000", "--no-progress")  # fmt: skip
    writers: list[int] = []
    for _ in range(3000):  # until both writers are writing their shards (generous: spawning imports a lot)
        writers = _writers(proc.pid)
        if len(writers) == 2 and len(list(out.glob(".shard-*.tmp"))) == 2 or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert len(writers) == 2 and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else writers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(300):  # the writers go with it (they would write their 200,000 samples on otherwise)
        if not any(_running(w) for w in writers):
            break
        time.sleep(0.1)
    assert not any(_running(w) for w in writers)
    assert not list(out.glob("shard-*.tar"))
