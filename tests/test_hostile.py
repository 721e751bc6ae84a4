"""A corpus of hostile and changing inputs, one row per defect found: every one is refused in one line with
exit code 2 (or lands in errors/), writes nothing it should not, and leaves no row twice. Add a row for each
new defect."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from curate.config import ExportConfig, ScoreConfig
from curate.export import export
from curate.score import score
from tests.conftest import CLI_ENV, ROOT, run_cli, start_cli


def tree_digest(root: Path) -> str:
    """A hash of every file under root (names and bytes): 'byte-identical' made checkable."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def one_line_exit_2(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit 2 and one error line, the last of stderr (a job logs the stages it starts before it)."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], proc.stderr[-1500:])
    lines = proc.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert all(ln.startswith("[") for ln in lines[:-1]), proc.stderr
    assert message in errors[0], errors[0]


def run_all(cases: list[tuple[list[str], str]]) -> None:
    """Run CLI cases two at a time (the machine's cores) and check each is one line, exit 2, with its message."""
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda c: run_cli(*c[0]), cases))
    for (args, message), proc in zip(cases, procs, strict=True):
        try:
            one_line_exit_2(proc, message)
        except AssertionError as e:
            raise AssertionError(f"{args}: {e}") from None


# ------------------------------------------------------------------------------ security


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "digits"
    export(ExportConfig(out=str(out), sources=["d=builtin:digits?stop=200"], shard_size=100, show_progress=False))
    return out


def test_a_checkpoint_never_runs_code_it_names(tmp_path, labelled_shards):
    """`factory: subprocess:getoutput` with kwargs that would create a file: refused before any import, on every
    path a checkpoint reaches (file, run directory, --init, --teacher, distill eval, a job's teacher)."""
    pwned = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "factory": "subprocess:getoutput", "kwargs": {"cmd": f"touch {pwned}"},
                "classes": [str(i) for i in range(10)],
                "input": {"size": 8, "channels": 1, "mean": [0.5], "std": [0.5]}}, evil)  # fmt: skip
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(evil, run_dir / "student.pt")
    job = tmp_path / "job.toml"
    job.write_text(f'[job]\nwork = "{tmp_path / "work"}"\n[teacher]\nspec = "{evil}"\n'
                   '[score]\nsources = ["n=synthetic:noise?n=10&size=8"]\n')  # fmt: skip
    train = ["distill", "train", str(labelled_shards), "--steps", "2", "--workers", "0", "--no-progress"]
    run_all([
        (["curate", "score", "--teacher", str(evil), "--pool", str(tmp_path / "p"), "--source",
          "n=synthetic:noise?n=10&size=8"], "'subprocess:getoutput'"),
        (["curate", "score", "--teacher", str(run_dir), "--pool", str(tmp_path / "p2"), "--source",
          "n=synthetic:noise?n=10&size=8"], "never runs code it names"),
        ([*train, "--out", str(tmp_path / "r1"), "--init", str(evil), "--loss", "ce", "--labels", "true"],
         "'subprocess:getoutput'"),
        ([*train, "--out", str(tmp_path / "r2"), "--teacher", str(evil)], "'subprocess:getoutput'"),
        (["distill", "eval", str(run_dir), "--data", str(labelled_shards)], "'subprocess:getoutput'"),
        (["pipelines", "run", str(job), "--no-progress"], "'subprocess:getoutput'"),
    ])  # fmt: skip
    assert not pwned.exists()


@pytest.fixture(scope="module")
def small_pool(teacher, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small") / "pool"
    score(ScoreConfig(str(teacher), ["g=synthetic:glyphs?n=120", "d=builtin:digits?start=1500&stop=1600"],
                      str(root), show_progress=False))  # fmt: skip
    return root


def test_sql_cannot_write_attach_or_install(small_pool, tmp_path):
    before = tree_digest(small_pool)
    target = tmp_path / "x.csv"
    part = small_pool / "samples" / "g" / "unit-999999.parquet"
    cases = [
        (f"COPY (SELECT 1) TO '{target}'", "COPY statements are refused"),
        (f"COPY (SELECT * FROM samples) TO '{part}' (FORMAT parquet)", "read-only"),
        (f"COPY (SELECT 'owned' AS x) TO '{small_pool / 'pool.json'}' (FORMAT json)", "read-only"),
        (f"ATTACH '{tmp_path / 'x.db'}' AS x", "ATTACH statements are refused"),
        ("INSTALL httpfs", "refused"),
        ("LOAD httpfs", "refused"),
        ("SET threads = 1", "refused"),
        ("CREATE TABLE t AS SELECT 1", "refused"),
        (f"SELECT 1; COPY (SELECT 1) TO '{target}'", "one query at a time"),
        ("", "the query is empty"),
    ]
    run_all([(["curate", "sql", str(small_pool), q], msg) for q, msg in cases])
    assert not target.exists() and not part.exists() and not (tmp_path / "x.db").exists()
    assert tree_digest(small_pool) == before
    ok = run_cli("curate", "sql", str(small_pool), "SELECT count(*) AS n FROM samples", "--format", "json", check=True)
    assert json.loads(ok.stdout) == {"n": 220}


def test_where_and_score_take_one_expression(small_pool, tmp_path):
    inj = tmp_path / "inj.csv"
    base = ["curate", "select", str(small_pool), "--strategy", "threshold", "--fraction", "0.5", "--out",
            str(tmp_path / "sel")]  # fmt: skip
    run_all([
        ([*base, "--where", f"1=1); COPY (SELECT 42 AS x) TO '{inj}'; SELECT uid, pred, 0.0::DOUBLE AS score "
          "FROM samples WHERE (1=1"], "--where"),
        ([*base, "--where", "1=1) UNION SELECT 1,2,3 --"], "must be one SQL expression"),
        ([*base, "--score", "energy) AS score FROM samples UNION SELECT 1, 2, 3 --"], "--score"),
        ([*base, "--where", "confidence > 0.5 ORDER BY uid"], "--where"),
    ])  # fmt: skip
    assert not inj.exists() and not (tmp_path / "sel").exists()
    job = tmp_path / "job.toml"
    job.write_text(f'[job]\nwork = "{tmp_path / "w"}"\n[teacher]\nspec = "t.pt"\n[score]\nsources = []\n'
                   f'[select]\nstrategy = "random"\nn = 3\nwhere = "1=1) UNION SELECT 1,2,3 --"\n')  # fmt: skip
    one_line_exit_2(run_cli("pipelines", "run", str(job)), "must be one SQL expression")


def peak_rss_mib(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run a console entry in a small wrapper process and return its peak RSS (MiB), the entry's own."""
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print('RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(p.returncode)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", *args], capture_output=True,
                          text=True, env=CLI_ENV, cwd=ROOT, timeout=300)  # fmt: skip
    rss = int(proc.stderr.strip().splitlines()[-1].split()[1]) / 1024
    return proc, rss


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar makes the sparse member")
def test_a_sparse_tar_member_and_a_huge_parquet_cell_stay_within_bounded_memory(teacher, tmp_path):
    """A 10 KB tar whose GNU-sparse member declares 2 GB, and a Parquet file with a 300 MB cell: both refused by
    --max-bytes as error rows, the rest scored, the process's peak memory far below what reading them takes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    src = tmp_path / "sparse"
    src.mkdir()
    Image.new("L", (8, 8), 9).save(src / "ok.png")
    with open(src / "big.png", "wb") as f:
        f.truncate(2 << 30)
    subprocess.run(["tar", "--sparse", "-cf", str(tmp_path / "s.tar"), "-C", str(src), "ok.png", "big.png"],
                   check=True)  # fmt: skip
    assert (tmp_path / "s.tar").stat().st_size < 100_000
    (src / "big.png").unlink()
    png = (src / "ok.png").read_bytes()
    cell = np.random.default_rng(0).integers(0, 256, 300 << 20, dtype=np.uint8).tobytes()
    pq.write_table(pa.table({"image": [png, cell, png]}), tmp_path / "c.parquet", compression="none")
    del cell

    def run(name: str, *source: str, rate: str = "0.5") -> float:
        proc, rss = peak_rss_mib("curate", "score", "--teacher", str(teacher), "--pool", str(tmp_path / name),
                                 *source, "--max-error-rate", rate, "--no-progress")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-1500:]
        return rss

    base = run("base", "--source", "n=synthetic:noise?n=3&size=8")
    sparse = run("pool", "--source", f"t=wds:{tmp_path / 's.tar'}")
    cell = run("pool", "--source", f"p=parquet:{tmp_path / 'c.parquet'}")
    errors = dict(duckdb.sql(f"SELECT key, reason FROM '{tmp_path}/pool/errors/*/*.parquet'").fetchall())
    assert "exceeds --max-bytes" in errors["s/big"] and "exceeds --max-bytes" in errors["c/1"]
    rows = duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/pool/samples/*/*.parquet'").fetchall()[0][0]
    assert rows == 3  # ok.png, and the two small cells
    assert sparse < base + 100, (base, sparse)  # the 2 GB member is never read
    assert cell < base + 2 * 300, (base, cell)  # the cell's page is read once, never converted or copied again


# ------------------------------------------------------------------------------ changing inputs


def write_pngs(folder: Path, names: list[str], value: int = 7) -> None:
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for i, n in enumerate(names):
        Image.fromarray(np.full((8, 8), (value + 13 * i) % 256, np.uint8)).save(folder / n)


def test_a_folder_that_changes_between_runs_keeps_one_row_per_current_file(teacher, tmp_path):
    folder, pool = tmp_path / "imgs", tmp_path / "pool"
    write_pngs(folder, [f"m{i:03d}.png" for i in range(34)])
    cfg = ScoreConfig(str(teacher), [f"f=folder:{folder}?unit=8"], str(pool), show_progress=False)
    assert score(cfg).rows == 34
    write_pngs(folder, [f"a{i:03d}.png" for i in range(7)], value=200)  # 7 files that sort first
    (folder / "m010.png").unlink()
    write_pngs(folder, ["m020.png"], value=99)  # rewritten in place
    time.sleep(0.01)
    res = score(cfg)
    keys = duckdb.sql(f"SELECT key, content_hash FROM '{pool}/samples/*/*.parquet'").fetchall()
    names = sorted(p.name for p in folder.iterdir())
    assert sorted(k for k, _ in keys) == names and len(keys) == 40  # 34 + 7 - 1, each once
    hashes = dict(keys)
    assert hashes["m020.png"] == hashlib.blake2b((folder / "m020.png").read_bytes(), digest_size=16).hexdigest()
    st = res.per_source["f"]
    assert st.units_changed + st.units_removed >= 1 and st.units_skipped >= 1  # unchanged units were not redone
    assert score(cfg).rows == 0  # and a third run has nothing to do


def test_duplicate_keys_in_a_tar_give_one_row_per_uid(teacher, tmp_path):
    import io
    import tarfile

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 50).save(buf, format="PNG")
    with tarfile.open(tmp_path / "d.tar", "w") as tar:
        for i, name in enumerate(["k1.png", "k2.png", "k3.png", "k1.png", "k4.png", "k2.png"]):
            info = tarfile.TarInfo(name)
            data = buf.getvalue() if i < 3 else buf.getvalue()[:-12] + bytes(12)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pool = tmp_path / "pool"
    score(ScoreConfig(str(teacher), [f"t=wds:{tmp_path / 'd.tar'}"], str(pool), max_error_rate=1.0,
                      show_progress=False))  # fmt: skip
    n, distinct = duckdb.sql(f"SELECT count(*), count(DISTINCT uid) FROM '{pool}/samples/*/*.parquet'").fetchall()[0]
    assert n == distinct == 4
    for args in (["--strategy", "threshold", "--threshold", "-1e9"], ["--strategy", "weighted", "--n", "3"]):
        out = tmp_path / args[1]
        run_cli("curate", "select", str(pool), *args, "--out", str(out), check=True)
        assert len(duckdb.sql(f"SELECT uid FROM '{out}/selection.parquet'").fetchall()) == (4 if "threshold" in args
                                                                                             else 3)  # fmt: skip


def test_a_second_scorer_is_refused_naming_the_holder(teacher, tmp_path):
    from curate.pool import Pool

    pool = tmp_path / "pool"
    with Pool(str(pool)).lock("score"):  # this process holds the pool, as a running `curate score` would
        proc = run_cli("curate", "score", "--teacher", str(teacher), "--pool", str(pool), "--source",
                       "n=synthetic:noise?n=5&size=8")  # fmt: skip
    one_line_exit_2(proc, f"is being written by curate score (pid {os.getpid()}")
    run_cli(
        "curate",
        "score",
        "--teacher",
        str(teacher),
        "--pool",
        str(pool),
        "--source",
        "n=synthetic:noise?n=5&size=8",
        "--no-progress",
        check=True,
    )  # released: the next one runs


def test_compact_beside_a_running_score(teacher, tmp_path):
    """Compactions while `curate score` writes units: neither fails, no row lost or doubled."""
    pool = tmp_path / "pool"
    source = "s=synthetic:dead-leaves?n=6000&size=16&unit=200"
    scorer = start_cli("curate", "score", "--teacher", str(teacher), "--pool", str(pool), "--source", source,
                       "--batch-size", "64", "--no-progress")  # fmt: skip
    try:
        deadline = time.time() + 120
        while len(list((pool / "units" / "s").glob("unit-*.json"))) < 3 and time.time() < deadline:
            time.sleep(0.1)
        compactions = 0
        while scorer.poll() is None and time.time() < deadline:
            c = run_cli("curate", "compact", str(pool), "--target-rows", "400", "--no-progress")
            assert c.returncode == 0, c.stderr[-1500:]
            compactions += 1
        _, err = scorer.communicate(timeout=120)
    finally:
        if scorer.poll() is None:
            scorer.kill()
    assert scorer.returncode == 0, err[-1500:]
    assert compactions >= 1
    run_cli("curate", "compact", str(pool), "--no-progress", check=True)
    q = run_cli("curate", "sql", str(pool), "SELECT count(*) AS n, count(DISTINCT uid) AS d FROM samples", "--format",
                "json", check=True)  # fmt: skip
    assert json.loads(q.stdout) == {"n": 6000, "d": 6000}


# ------------------------------------------------------------------------------ bad input


def test_bad_inputs_are_one_line_and_exit_2(teacher, small_pool, tmp_path, labelled_shards):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.parquet").write_bytes(b"PAR1 definitely not parquet PAR1")
    good = tmp_path / "good.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [b"x" * 10] * 100}), good)
    (tmp_path / "cut.parquet").write_bytes(good.read_bytes()[:-40])
    np.save(tmp_path / "img.npy", np.zeros((10, 8, 8), np.uint8))
    np.save(tmp_path / "lab.npy", np.zeros(7, np.int64))
    bad_pool = tmp_path / "bad-pool"
    shutil.copytree(small_pool, bad_pool)
    (bad_pool / "pool.json").write_text("{ this is not json")
    job = tmp_path / "job.toml"
    job.write_text(f'[job]\nwork = "{a_file}"\n[teacher]\nspec = "t.pt"\n')
    job2 = tmp_path / "job2.toml"
    job2.write_text('[teacher]\nspec = "t.pt"\n[score]\nsources = [1, 2]\n')
    pools = iter(range(100))

    def scored(*source: str) -> list[str]:  # each case its own pool: the cases run two at a time
        return ["curate", "score", "--teacher", str(teacher), "--pool", str(tmp_path / f"p{next(pools)}"), *source]

    resumed = tmp_path / "resumed"
    run_cli("distill", "train", str(labelled_shards), "--out", str(resumed), "--steps", "2", "--loss", "ce",
            "--labels", "true", "--student", "cnn-tiny", "--workers", "0", "--no-progress", check=True)  # fmt: skip
    run_all([
        (scored("--source", f"x=parquet:{tmp_path / 'x.parquet'}"), "not a readable Parquet file"),
        (scored("--source", f"x=parquet:{tmp_path / 'cut.parquet'}"), "not a readable Parquet file"),
        (["curate", "score", "--teacher", str(teacher), "--pool", str(a_file), "--source", "n=synthetic:noise?n=5"],
         "is a file"),
        (["curate", "select", str(small_pool), "--strategy", "random", "--n", "3", "--out", str(a_file)], "is a file"),
        (["curate", "export", str(small_pool), "--selection", str(tmp_path), "--out", str(a_file)], "is a file"),
        (["pipelines", "run", str(job)], "is a file"),
        (["pipelines", "run", str(job2)], "must be a list of strings"),
        (["curate", "score", "--teacher", str(teacher), "--pool", str(bad_pool), "--source",
          "g=synthetic:glyphs?n=120"], "not valid JSON"),
        (["curate", "select", str(bad_pool), "--strategy", "random", "--n", "3", "--out", str(tmp_path / "s")],
         "not valid JSON"),
        (["curate", "sql", str(small_pool), ""], "the query is empty"),
        (["distill", "train", str(labelled_shards), "--out", str(tmp_path / "r"), "--steps", "5", "--batch-size",
          "0"], "--batch-size must be at least 1"),
        (["distill", "train", str(labelled_shards), "--out", str(resumed), "--steps", "4", "--loss", "ce",
          "--labels", "true", "--student", "cnn-wide", "--resume", "--workers", "0"], "resume with the run's own"),
        (scored("--source", "n=synthetic:noise?n=-5"), "must be at least 1"),
        (scored("--source", "n=synthetic:noise?n=0"), "must be at least 1"),
        (scored("--source", f"e=folder:{tmp_path / 'empty'}"), "hold no sample"),
        (scored("--source", "n=synthetic:noise?seeed=3"), "unknown option 'seeed'"),
        (["distill", "train", str(labelled_shards), "--out", str(tmp_path / "r"), "--steps", "0"], "--steps"),
        (["distill", "train", str(labelled_shards), "--out", str(tmp_path / "r"), "--steps", "-1"], "--steps"),
        (scored("--source", "n=synthetic:noise?size=abc"), "option size= needs an integer, got 'abc'"),
        (scored("--source", "n=synthetic:noise?size=0"), "size= must be at least 4"),
        (scored("--source", f"n=npy:{tmp_path / 'img.npy'}?labels={tmp_path / 'lab.npy'}"),
         "7 labels for 10 images"),
    ])  # fmt: skip
    assert not list(tmp_path.glob("p*/samples"))  # a refused run writes no pool


def test_listing_skips_what_is_not_a_file_and_says_so(teacher, tmp_path):
    folder = tmp_path / "imgs"
    write_pngs(folder, ["a.png", "b.png"])
    os.symlink(tmp_path / "missing.png", folder / "dangling.png")
    proc = run_cli("curate", "score", "--teacher", str(teacher), "--pool", str(tmp_path / "pool"), "--source",
                   f"f=folder:{folder}", "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "1 entries skipped, not regular files" in proc.stderr and "dangling.png" in proc.stderr
    assert duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/pool/samples/*/*.parquet'").fetchall()[0][0] == 2
    assert not list((tmp_path / "pool").glob("errors/*/*.parquet"))


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connecting is refused


def _score(**kw) -> ScoreConfig:
    return ScoreConfig(**{"teacher": "t.pt", "sources": ["n=synthetic:noise?n=5"], "pool": "p", **kw})


def _select(**kw):
    from curate.config import SelectConfig

    return SelectConfig(pool="p", out="sel", **kw)


def _units(spec: str) -> list:
    from curate.sources import parse_source

    return parse_source(spec).cached_units()


def _job(tmp: Path, teacher: str = "t.pt", source: str = "n=synthetic:noise?n=5") -> Path:
    job = tmp / "job.toml"
    job.write_text(f'[job]\nwork = "{tmp / "w"}"\n[teacher]\nspec = "{teacher}"\n[score]\nsources = ["{source}"]\n')
    return job


# (what, call(tmp_path), message): values taken silently (a NaN pool, a negative worker count as auto, an option
# the strategy ignores, an inverted preference), misleading messages, tracebacks and sizes that hung; each is
# refused up front by the config or the spec (a UserError: one line, exit 2), before any work
REFUSED_UP_FRONT = [
    ("odin temperature 0", lambda t: _score(odin=True, odin_temperature=0.0), "--odin-temperature must be > 0"),
    ("negative workers", lambda t: _score(workers=-2), "--workers must be -1 (pick for me), 0"),
    ("export negative workers", lambda t: ExportConfig(out="o", sources=["d=builtin:digits"], workers=-3),
     "--workers must be -1"),
    ("absurd batch size", lambda t: _score(batch_size=100_000_000), "--batch-size 100,000,000 is over 65,536"),
    ("synthetic size", lambda t: _units("n=synthetic:noise?size=100000"), "size=100,000 is over 4,096 pixels"),
    ("synthetic n", lambda t: _units("n=synthetic:noise?n=1000000000000000"), "n=1,000,000,000,000,000 is over"),
    ("too many units", lambda t: _units("n=synthetic:noise?n=100000000&unit=1"),
     "make 100,000,000 units, over 1,000,000"),
    ("builtin photo size", lambda t: _units("p=builtin:photos?size=100000"), "size=100,000 is over 4,096"),
    ("folder given an image", lambda t: (write_pngs(t / "imgs", ["one.png"]), _units(f"f=folder:{t}/imgs/one.png")),
     "is a file, not a folder; give the folder holding it, f=folder:"),
    ("folder given a tar", lambda t: ((t / "s.tar").write_bytes(b"x"), _units(f"f=folder:{t / 's.tar'}")),
     "is a file, not a folder; use f=wds:"),
    ("HTTP refused", lambda t: _units(f"t=wds:http://user:hunter2@127.0.0.1:{_closed_port()}/a.tar"),
     "connection refused by http://127.0.0.1:"),
    ("per-class with random", lambda t: _select(strategy="random", n=3, per_class=5),
     "--per-class is not used by --strategy random (it takes --n)"),
    ("n with top-per-class", lambda t: _select(strategy="top-per-class", per_class=5, n=3),
     "--n is not used by --strategy top-per-class"),
    ("negative gamma", lambda t: _select(strategy="weighted", n=3, gamma=-1.0), "--gamma must be > 0"),
    ("zero gamma", lambda t: _select(strategy="weighted", n=3, gamma=0.0), "--gamma must be > 0"),
    ("index memory 0", lambda t: __import__("curate.config").config.IndexConfig("p", memory="0"),
     "--memory must be a positive memory budget"),
    ("index memory text", lambda t: __import__("curate.config").config.IndexConfig("p", memory="lots"),
     "give a size such as 512MB or 4GB"),
    ("sql out a directory", lambda t: __import__("curate.query").query.sql(
        __import__("curate.config").config.SqlConfig(str(t / "p"), "SELECT 1", out=str(t))), "is a directory"),
    ("binary job", lambda t: __import__("pipelines.run").run.load_job(
        str((t / "b.toml", (t / "b.toml").write_bytes(bytes(range(256))))[0])), "is not a TOML job spec"),
    ("dry run, unknown teacher kind", lambda t: __import__("pipelines.run").run.run(
        str(_job(t, teacher="nosuchkind:x")), dry_run=True), "unknown teacher spec 'nosuchkind:x'"),
    ("dry run, unknown source kind", lambda t: __import__("pipelines.run").run.run(
        str(_job(t, source="n=nosuchkind:x")), dry_run=True), "unknown kind 'nosuchkind'"),
]  # fmt: skip


@pytest.mark.parametrize("call,message", [c[1:] for c in REFUSED_UP_FRONT], ids=[c[0] for c in REFUSED_UP_FRONT])
def test_bad_values_are_refused_up_front(tmp_path, call, message):
    from kdcore.errors import UserError

    with pytest.raises(UserError) as e:
        call(tmp_path)
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
    assert "hunter2" not in str(e.value)
    assert not (tmp_path / "w").exists() and not (tmp_path / "p").exists()  # nothing written


def test_bad_values_are_one_line_and_exit_2_from_the_command_line(tmp_path):
    """The same refusals through the CLIs: the ones that were tracebacks, a config value, a dry run."""
    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(256)) * 4)
    (tmp_path / "d").mkdir()
    run_all([
        (["pipelines", "run", str(binary)], "is not a TOML job spec"),
        (["curate", "sql", str(tmp_path / "pool"), "SELECT 1", "--out", str(tmp_path / "d")], "is a directory"),
        (["pipelines", "run", str(_job(tmp_path, teacher="nosuchkind:x")), "--dry-run"], "unknown teacher spec"),
        (["curate", "score", "--teacher", "t.pt", "--pool", str(tmp_path / "p"), "--source",
          "n=synthetic:noise?n=5", "--odin", "--odin-temperature", "0"], "--odin-temperature must be > 0"),
    ])  # fmt: skip
