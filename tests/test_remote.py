"""Sources, pools and shards on an S3 API (moto's server on loopback), over HTTP and through pipe: commands:
the same stages, the same resume, the same bytes as on a local disk, and no credential written anywhere."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import duckdb
import pytest
import s3fs

from tests.conftest import ROOT, SECRET, odd_images, run_cli, start_cli, write_odd_folder
from tests.test_hostile import one_line_exit_2, run_all
from tests.test_stages import write_img2dataset_parquet, write_img2dataset_wds

pytestmark = pytest.mark.usefixtures("s3")


def fs() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture(scope="module")
def remote_sources(s3, http_root, tmp_path_factory):
    """The odd folder, img2dataset's webdataset and parquet layouts: on S3, over HTTP, and local for pipe:."""
    local = tmp_path_factory.mktemp("remote-src")
    write_odd_folder(local / "folder", labelled=True)
    n_wds = write_img2dataset_wds(local / "wds")
    n_pq = write_img2dataset_parquet(local / "pq")
    bucket = s3()
    fs().put(f"{local}/", bucket.removeprefix("s3://") + "/", recursive=True)
    root, base = http_root
    shutil.copytree(local / "wds", root / "wds")
    shutil.copytree(local / "folder", root / "folder")
    return bucket, base, local, {"folder": len(odd_images()), "wds": n_wds, "pq": n_pq}


def rows(pool: str) -> dict[str, int]:
    proc = run_cli("curate", "sql", pool, "SELECT source, count(*) AS n, count(DISTINCT uid) AS d FROM samples "
                   "GROUP BY 1 ORDER BY 1", "--format", "json", check=True)  # fmt: skip
    out = {}
    for line in proc.stdout.splitlines():
        r = json.loads(line)
        assert r["n"] == r["d"]  # one row per sample
        out[r["source"]] = r["n"]
    return out


def test_sources_on_s3_over_http_and_through_pipes(remote_sources, teacher, tmp_path):
    bucket, base, local, n = remote_sources
    specs = [f"f=folder:{bucket}/folder?labels=dirs", f"w=wds:{bucket}/wds/{{00000..00002}}.tar",
             f"p=parquet:{bucket}/pq/*.parquet?column=jpg&meta=url,caption", f"h=wds:{base}/wds/00000.tar",
             f"x=wds:pipe:cat {local}/wds/00002.tar", f"hf=folder:{base}/folder"]  # fmt: skip
    args = ["curate", "score", "--teacher", str(teacher), "--pool", str(tmp_path / "pool"), "--max-error-rate", "0.5",
            "--no-progress"]  # fmt: skip
    for s in specs:
        args += ["--source", s]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "w/00001" in proc.stderr  # the gap in the range: one failed unit, the rest scored
    assert rows(str(tmp_path / "pool")) == {"f": n["folder"], "w": n["wds"], "p": n["pq"], "h": 5, "x": 4,
                                            "hf": n["folder"]}  # fmt: skip
    meta = json.loads((tmp_path / "pool" / "pool.json").read_text())
    assert meta["sources"]["f"]["classes"] == ["a", "b"]


def test_pool_and_shards_on_s3_through_every_stage(teacher, tmp_path, s3):
    bucket = s3()
    pool, sel, shards = f"{bucket}/pool", f"{bucket}/sel", f"{bucket}/shards"
    run_cli("curate", "score", "--teacher", str(teacher), "--pool", pool, "--source",
            "d=builtin:digits?start=1500&unit=100", "--source", "n=synthetic:noise?n=200&size=8&unit=100",
            "--no-progress", check=True)  # fmt: skip
    assert rows(pool) == {"d": 297, "n": 200}
    assert not fs().exists(f"{bucket}/pool/locks/score.lock")  # released
    run_cli("curate", "index", pool, "--no-progress", check=True)
    run_cli("curate", "compact", pool, "--target-rows", "250", "--no-progress", check=True)
    assert rows(pool) == {"d": 297, "n": 200}
    run_cli("curate", "select", pool, "--strategy", "top-per-class", "--per-class", "15", "--out", sel, check=True)
    run_cli("curate", "select", pool, "--strategy", "near", "--reference", "r=builtin:digits?stop=20", "--n", "30",
            "--out", f"{bucket}/near", check=True)  # fmt: skip
    run_cli("curate", "report", pool, "--selection", sel, "--out", f"{bucket}/report", "--thumbs", "2", check=True)
    assert fs().exists(f"{bucket}/report/report.html") and fs().exists(f"{bucket}/report/roc.png")
    run_cli("curate", "export", pool, "--selection", sel, "--out", shards, "--shard-size", "40", "--no-progress",
            check=True)  # fmt: skip
    # the same export to a local disk: the same bytes
    run_cli("curate", "export", pool, "--selection", sel, "--out", str(tmp_path / "local"), "--shard-size", "40",
            "--no-progress", check=True)  # fmt: skip
    remote = json.loads(fs().cat(f"{shards.removeprefix('s3://')}/manifest.json"))
    local = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert [s["sha256"] for s in remote["shards"]] == [s["sha256"] for s in local["shards"]]
    # a killed export: a marker gone; the rerun rewrites that shard only, with the same bytes
    fs().rm(f"{shards.removeprefix('s3://')}/shard-000001.json")
    proc = run_cli("curate", "export", pool, "--selection", sel, "--out", shards, "--shard-size", "40",
                   "--no-progress", check=True)  # fmt: skip
    assert "(3 already done)" in proc.stdout
    again = json.loads(fs().cat(f"{shards.removeprefix('s3://')}/manifest.json"))
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in remote["shards"]]
    # distill reads shards from S3: the directory, a brace pattern of URLs, and pipe: commands
    n = len(remote["shards"])
    for data, extra in [(shards, []), (f"{shards}/shard-{{000000..{n - 1:06d}}}.tar", []),
                        (f"pipe:cat {tmp_path / 'local'}/shard-{{000000..{n - 1:06d}}}.tar",
                         ["--manifest", str(tmp_path / "local" / "manifest.json")])]:  # fmt: skip
        out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
        run_cli("distill", "train", data, *extra, "--out", str(out), "--student", "cnn-tiny", "--steps", "4",
                "--batch-size", "16", "--workers", "0", "--no-progress", check=True)  # fmt: skip
        res = run_cli("distill", "eval", str(out), "--data", data, *extra, "--workers", "0", check=True)
        assert "agreement with the teacher" in res.stdout


def test_a_score_killed_on_s3_resumes_with_one_row_per_sample(teacher, s3):
    pool = f"{s3()}/pool"
    args = ["curate", "score", "--teacher", str(teacher), "--pool", pool, "--source",
            "s=synthetic:dead-leaves?n=3000&size=16&unit=100", "--batch-size", "50", "--no-progress"]  # fmt: skip
    proc = start_cli(*args)
    records = f"{pool.removeprefix('s3://')}/units/s"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if fs().exists(records) and len(fs().ls(records)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = len(fs().ls(records))
    assert 0 < done < 30
    res = run_cli(*args, check=True)  # the dead holder's lock is taken over at once on the same host
    assert f"{3000 - 100 * done:,} rows scored" in res.stdout or "rows scored" in res.stdout
    assert rows(pool) == {"s": 3000}


def test_no_credential_is_written_anywhere(teacher, tmp_path, s3, http_root):
    root, base = http_root
    (root / "cred").mkdir(exist_ok=True)
    for name, data in list(odd_images().items())[:3]:
        (root / "cred" / name).write_bytes(data)
    secret_url = base.replace("http://", "http://user:hunter2-secret@")
    bucket = s3()
    outputs = []
    outputs.append(run_cli("curate", "score", "--teacher", str(teacher), "--pool", f"{bucket}/pool", "--source",
                           f"c=folder:{secret_url}/cred", "--no-progress", check=True))  # fmt: skip
    outputs.append(run_cli("curate", "select", f"{bucket}/pool", "--strategy", "threshold", "--threshold", "-1e9",
                           "--out", f"{bucket}/sel", check=True))  # fmt: skip
    outputs.append(run_cli("curate", "export", f"{bucket}/pool", "--selection", f"{bucket}/sel", "--out",
                           str(tmp_path / "shards"), "--no-progress", check=True))  # fmt: skip
    written = b"".join(fs().cat(p) for p in fs().find(bucket.removeprefix("s3://")))
    written += b"".join(p.read_bytes() for p in (tmp_path / "shards").iterdir())
    logs = "".join(p.stdout + p.stderr for p in outputs)
    for secret in (SECRET, "hunter2-secret"):
        assert secret.encode() not in written and secret not in logs
    assert rows(f"{bucket}/pool") == {"c": 3}


def test_storage_mistakes_are_one_line(teacher, tmp_path, s3, http_root):
    _, base = http_root
    bucket = s3()
    score = ["curate", "score", "--teacher", str(teacher), "--source", "n=synthetic:noise?n=5&size=8", "--pool"]
    run_all([
        ([*score, "ftp://host/pool"], "unknown storage scheme 'ftp://'"),
        ([*score, "s3://no-such-bucket-kdc/pool"], "bucket 'no-such-bucket-kdc' does not exist"),
        ([*score, f"{base}/pool"], "http:// is read-only"),
        (["curate", "score", "--teacher", str(teacher), "--pool", str(tmp_path / "p"), "--source",
          "f=folder:s3://no-such-bucket-kdc/images"], "folder not found: s3://no-such-bucket-kdc/images"),
        (["curate", "score", "--teacher", str(teacher), "--pool", str(tmp_path / "p2"), "--source",
          f"w=wds:{bucket}/nothing-{{0..3}}.tar"], "no tar file at"),
        (["curate", "sql", f"{bucket}/nopool", "SELECT 1"], "is not a pool"),
        (["distill", "train", f"{bucket}/noshards/", "--out", str(tmp_path / "r"), "--steps", "2"], "no shard"),
    ])  # fmt: skip
    assert not (ROOT / "s3:").exists() and not (Path.cwd() / "s3:").exists()  # never a local folder named s3:
    assert duckdb is not None
    one_line_exit_2(run_cli("curate", "export", "--source", "n=synthetic:noise?n=5", "--out", f"{base}/x"), "read-only")


def test_a_denied_request_is_one_line(teacher, tmp_path):
    """An S3 API that checks credentials (moto with authentication on) refuses ours: one line, exit 2."""
    import os
    import subprocess
    import sys
    import urllib.request

    from tests.conftest import CLI_ENV, _free_port

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=1)
            except urllib.error.HTTPError:
                break  # answering (with a refusal)
            except OSError:
                time.sleep(0.1)
        env = {**CLI_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        for pool, source in [
            ("s3://locked/pool", "n=synthetic:noise?n=5"),
            (str(tmp_path / "p"), "f=folder:s3://locked/x"),
        ]:
            cmd = [
                sys.executable,
                "-m",
                "curate",
                "score",
                "--teacher",
                str(teacher),
                "--pool",
                pool,
                "--source",
                source,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
            one_line_exit_2(proc, "access denied to s3://locked/")
    finally:
        server.terminate()
        server.wait(timeout=10)


def _png(value: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(keys: list[str], value: int) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, key in enumerate(keys):
            data = _png((value + 40 * i) % 256)
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _parquet(values: list[int]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"image": [_png(v) for v in values]}), buf)
    return buf.getvalue()


def test_files_rewritten_in_place_on_s3_are_rescored(teacher, tmp_path, s3):
    """wds:, parquet: and folder: units on object storage carry the listing's size, ETag and mtime: a file
    rewritten under the same name is rescored, and the rows of samples it no longer holds are dropped."""
    from curate.config import ScoreConfig
    from curate.score import score

    bucket = s3()
    b = bucket.removeprefix("s3://")
    fs().pipe(
        {
            f"{b}/wds/a.tar": _tar(["k0", "k1", "k2", "k3"], 10),
            f"{b}/wds/b.tar": _tar(["k0", "k1"], 90),
            f"{b}/pq/p.parquet": _parquet([1, 2, 3]),
            f"{b}/img/x.png": _png(5),
            f"{b}/img/y.png": _png(6),
        }
    )
    cfg = ScoreConfig(teacher=str(teacher), pool=str(tmp_path / "pool"), show_progress=False,
                      sources=[f"w=wds:{bucket}/wds/{{a,b}}.tar", f"p=parquet:{bucket}/pq/p.parquet",
                               f"f=folder:{bucket}/img"])  # fmt: skip
    assert score(cfg).rows == 6 + 3 + 2

    def hashes() -> dict[str, str]:
        files = [str(f) for f in (tmp_path / "pool" / "samples").glob("*/*.parquet")]
        return dict(duckdb.sql(f"SELECT sample_id, content_hash FROM read_parquet({files})").fetchall())

    before = hashes()
    # same names, same sizes where it can be: a tar of other samples, other pixels in the same layout
    fs().pipe({f"{b}/wds/a.tar": _tar(["k0", "k9"], 200), f"{b}/pq/p.parquet": _parquet([7, 8, 9]),
               f"{b}/img/x.png": _png(250)})  # fmt: skip
    res = score(cfg)
    changed = {name: (st.units_changed, st.units_skipped) for name, st in res.per_source.items()}
    assert changed["w"] == (1, 1) and changed["p"] == (1, 0), changed
    after = hashes()
    assert sorted(k for k in after if k.startswith("w/")) == ["w/a/k0", "w/a/k9", "w/b/k0", "w/b/k1"]
    assert after["w/a/k0"] != before["w/a/k0"] and after["w/b/k0"] == before["w/b/k0"]
    assert all(after[f"p/p/{i}"] != before[f"p/p/{i}"] for i in range(3))
    assert after["f/x.png"] != before["f/x.png"] and len(after) == 4 + 3 + 2
