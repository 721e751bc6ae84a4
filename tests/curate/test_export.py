"""curate export: shards read back by plain webdataset match the pool; resume; labelled sources; errors."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from curate.config import ExportConfig, ScoreConfig, SelectConfig
from curate.export import export
from curate.query import connect
from curate.score import score
from curate.select import select
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def selection(pool, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sel") / "sel"
    select(SelectConfig(pool=str(pool), out=str(out), strategy="weighted", n=300, replace=True, seed=1))
    return out


def read_plain(out: Path) -> dict[str, dict]:
    """Every sample of the shards, read by webdataset alone (no kdcurate code)."""
    urls = sorted(str(p) for p in out.glob("shard-*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def test_export_round_trips_through_plain_webdataset(pool, selection, tmp_path):
    out = tmp_path / "shards"
    res = export(ExportConfig(out=str(out), pool=str(pool), selection=str(selection), shard_size=64,
                              show_progress=False))  # fmt: skip
    sel = pq.read_table(selection / "selection.parquet").to_pylist()
    assert res.samples == len(sel) and res.errors == 0 and res.shards == -(-len(sel) // 64)
    samples = read_plain(out)
    assert len(samples) == len(sel)
    rows = (
        connect(str(pool))
        .execute(
            "SELECT uid, sample_id, logits, label, pred, source, width, height FROM samples WHERE uid IN "
            f"(SELECT uid FROM read_parquet('{selection}/selection.parquet'))"
        )
        .fetchall()
    )
    weight = {r["uid"]: r["weight"] for r in sel}
    for uid, sample_id, logits, label, pred, source, width, height in rows:
        key = f"{uid & 0xFFFFFFFFFFFFFFFF:016x}"
        assert "." not in key
        s = samples[key]
        got = np.load(io.BytesIO(s["logits.npy"]))
        assert got.dtype == np.float16 and np.array_equal(got, np.asarray(logits, np.float32).astype(np.float16))
        meta = json.loads(s["json"])
        assert meta["uid"] == uid and meta["sample_id"] == sample_id and meta["pred"] == pred
        assert meta["weight"] == pytest.approx(weight[uid])
        assert ("cls" in s) == (source == "digits")  # only digits carry labels in the teacher's classes
        if "cls" in s:
            assert int(s["cls"]) == label
        with Image.open(io.BytesIO(s["png"])) as img:
            assert img.size == (width, height)  # the original, not the teacher's view
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == [str(i) for i in range(10)] and manifest["soft_labels"] == "full"
    assert manifest["input"]["size"] == 8 and manifest["teacher"]["sha256"]
    for sh in manifest["shards"]:
        data = (out / sh["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sh["sha256"] and len(data) == sh["bytes"]


def test_original_bytes_kept_and_resume_skips_complete_shards(teacher, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    originals = {}
    for i in range(40):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(buf, format="JPEG" if i % 2 else "PNG")
        name = f"im{i:02d}.{'jpg' if i % 2 else 'png'}"
        (folder / name).write_bytes(buf.getvalue())
        originals[f"f/{name}"] = buf.getvalue()
    (folder / "im99.bmp").write_bytes(_bmp())
    pool = tmp_path / "pool"
    score(ScoreConfig(teacher=str(teacher), sources=[f"f=folder:{folder}"], pool=str(pool), show_progress=False))
    sel = tmp_path / "sel"
    select(SelectConfig(pool=str(pool), out=str(sel), strategy="threshold", threshold=-1e9))
    out = tmp_path / "shards"
    cfg = ExportConfig(out=str(out), pool=str(pool), selection=str(sel), shard_size=10, show_progress=False)
    first = export(cfg)
    assert first.shards == 5 and first.shards_skipped == 0
    for s in read_plain(out).values():
        sid = json.loads(s["json"])["sample_id"]
        if sid in originals:
            ext = "jpg" if sid.endswith(".jpg") else "png"
            assert s[ext] == originals[sid]  # byte for byte
        else:
            assert sid == "f/im99.bmp" and "png" in s  # BMP re-encoded as PNG
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    # a run killed mid-shard: one marker gone, a temporary left behind
    (out / "shard-000003.json").unlink()
    (out / "shard-000003.tar").rename(out / ".shard-000003.tar.export.tmp")
    second = export(cfg)
    assert second.shards_skipped == 4 and second.samples == first.samples
    assert not list(out.glob("*.tmp"))
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == before  # same plan, same bytes
    other = ExportConfig(out=str(out), pool=str(pool), selection=str(sel), shard_size=7, show_progress=False)
    with pytest.raises(Exception, match="another shard_size"):
        export(other)


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 12), 99, np.uint8)).save(buf, format="BMP")
    return buf.getvalue()


def test_topk_soft_labels(pool, selection, tmp_path):
    out = tmp_path / "topk"
    export(ExportConfig(out=str(out), pool=str(pool), selection=str(selection), soft_labels="topk:3",
                        show_progress=False))  # fmt: skip
    logits = dict(connect(str(pool)).execute("SELECT uid, logits FROM samples").fetchall())
    for s in list(read_plain(out).values())[:30]:
        meta = json.loads(s["json"])
        full = np.asarray(logits[meta["uid"]], np.float32)
        idx = np.load(io.BytesIO(s["topk.npy"]))
        assert list(idx) == list(np.argsort(-full, kind="stable")[:3])
        assert np.allclose(np.load(io.BytesIO(s["logits.npy"])), full[idx], atol=1e-2)
        assert meta["logsumexp"] == pytest.approx(float(np.logaddexp.reduce(full)), rel=1e-5)


def test_labelled_source_export_without_teacher(tmp_path):
    out = tmp_path / "digits"
    res = export(ExportConfig(out=str(out), sources=["d=builtin:digits?stop=300&unit=50"], shard_size=100,
                              show_progress=False))  # fmt: skip
    assert res.samples == 300 and res.shards == 3
    from curate.sources.builtin import digits as load_digits

    x, y = load_digits()
    samples = read_plain(out)
    for s in samples.values():
        i = int(json.loads(s["json"])["sample_id"].split("/")[1])
        assert int(s["cls"]) == y[i]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), x[i])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher"] is None and manifest["soft_labels"] == "none" and manifest["labels"] is True
    assert manifest["input"]["size"] == 8 and manifest["input"]["channels"] == 1


def test_missing_image_becomes_an_error_row(teacher, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    pool = tmp_path / "pool"
    score(ScoreConfig(teacher=str(teacher), sources=[f"f=folder:{folder}"], pool=str(pool), show_progress=False))
    select(SelectConfig(pool=str(pool), out=str(tmp_path / "sel"), strategy="threshold", threshold=-1e9))
    (folder / "2.png").unlink()
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(folder / "3.png")  # changed since scoring
    proc = run_cli("curate", "export", str(pool), "--selection", str(tmp_path / "sel"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 0 and "2 samples could not be exported" in proc.stderr
    errors = pq.read_table(tmp_path / "o" / "errors.parquet").to_pylist()
    reasons = {e["sample_id"]: e["reason"] for e in errors}
    assert reasons == {"f/2.png": "not found in its source", "f/3.png": "changed since it was scored"}
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["count"] == 4


def test_cli_export_errors(pool, selection, tmp_path):
    for args, msg in [
        ([str(pool), "--out", str(tmp_path / "a")], "--selection"),
        ([str(pool), "--selection", str(tmp_path / "nope"), "--out", str(tmp_path / "b")], "not a selection"),
        ([str(pool), "--selection", str(selection), "--out", str(pool / "x")], "inside the pool"),
        ([str(pool), "--selection", str(selection), "--out", str(tmp_path / "c"), "--soft-labels", "top3"], "topk:K"),
        (["--source", "x=builtin:nothing", "--out", str(tmp_path / "d")], "builtin"),
    ]:
        proc = run_cli("curate", "export", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert msg in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["npy", "idx"])
def test_labelled_arrays_export_with_their_classes_and_train_a_teacher(tmp_path, kind):
    """npy and idx sources with labels= become labelled shards (classes in the manifest, cls members) that
    `distill train --loss ce --labels true` trains on."""
    import gzip

    from curate.sources.builtin import digits as load_digits

    x, y = load_digits()
    if kind == "npy":
        np.save(tmp_path / "x.npy", x[:300])
        np.save(tmp_path / "y.npy", y[:300])
        spec = f"d=npy:{tmp_path / 'x.npy'}?labels={tmp_path / 'y.npy'}"
    else:
        for name, arr in (("x", x[:300]), ("y", y[:300].astype(np.uint8))):
            head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            (tmp_path / f"{name}.gz").write_bytes(gzip.compress(head + arr.astype(np.uint8).tobytes()))
        spec = f"d=idx:{tmp_path / 'x.gz'}?labels={tmp_path / 'y.gz'}"
    out = tmp_path / "shards"
    run_cli("curate", "export", "--source", spec, "--out", str(out), "--no-progress", check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == [str(i) for i in range(10)] and manifest["labels"] is True
    proc = run_cli("distill", "train", str(out), "--out", str(tmp_path / "run"), "--loss", "ce", "--labels", "true",
                   "--steps", "5", "--student", "cnn-tiny", "--workers", "0", "--no-progress", check=True)  # fmt: skip
    assert "5 steps" in proc.stdout


def _mixed_folder(folder: Path) -> int:
    """A crawl-like folder: PNG, JPEG, WebP, RGBA, LA, palette with transparency, 16-bit grey, CMYK, BMP, GIF,
    float TIFF (odd_images), plus plain grey PNGs and JPEGs. Returns the file count."""
    from tests.conftest import odd_images

    folder.mkdir()
    files = odd_images()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    rng = np.random.default_rng(3)
    for i in range(6):
        fmt = ("PNG", "JPEG", "WEBP")[i % 3]
        Image.fromarray(rng.integers(0, 255, (10, 14), dtype=np.uint8)).save(folder / f"g{i}.{fmt.lower()}", format=fmt)
    return len(files) + 6


def test_image_format_jpg_loads_in_hf_datasets_and_webdataset(tmp_path, monkeypatch):
    """--image-format jpg: every sample of a mixed crawl holds a `jpg` member, so Hugging Face's webdataset loader
    (one image column per extension) and webdataset both see every image."""
    from tests.conftest import rgb_teacher

    teacher = rgb_teacher(tmp_path / "teacher.pt", size=16)
    n = _mixed_folder(tmp_path / "crawl")
    pool, sel, out = tmp_path / "pool", tmp_path / "sel", tmp_path / "shards"
    score(ScoreConfig(teacher=str(teacher), sources=[f"c=folder:{tmp_path / 'crawl'}"], pool=str(pool),
                      show_progress=False))  # fmt: skip
    select(SelectConfig(pool=str(pool), out=str(sel), strategy="threshold", threshold=-1e9))
    res = export(ExportConfig(out=str(out), pool=str(pool), selection=str(sel), shard_size=7, image_format="jpg",
                              image_quality=80, show_progress=False))  # fmt: skip
    assert res.samples == n and res.errors == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image"] == {"format": "jpg", "quality": 80, "size": "original"}
    samples = read_plain(out)
    assert len(samples) == n
    for s in samples.values():
        assert not {"png", "webp"} & set(s) and s["jpg"][:3] == b"\xff\xd8\xff"
        with Image.open(io.BytesIO(s["jpg"])) as img:
            assert img.mode in ("L", "RGB")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local files only: nothing to fetch
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("webdataset", data_files={"train": sorted(str(p) for p in out.glob("shard-*.tar"))},
                               split="train", cache_dir=str(tmp_path / "hf"))  # fmt: skip
    assert len(ds) == n
    images = ds["jpg"]
    assert all(img is not None for img in images) and {img.size for img in images} >= {(64, 48), (14, 10)}


def test_image_size_view_holds_the_teachers_pixels(tmp_path):
    """--image-size view with png: each image is exactly the view the network sees (lossless); keep re-encodes in
    the original's own format; the choice is part of the export's plan."""
    from kdcore.view import InputSpec, to_pixels

    n = _mixed_folder(tmp_path / "crawl")
    out = tmp_path / "shards"
    spec = f"c=folder:{tmp_path / 'crawl'}"
    res = export(ExportConfig(out=str(out), sources=[spec], image_format="png", image_size="view",
                              show_progress=False))  # fmt: skip
    assert res.samples == n
    manifest = json.loads((out / "manifest.json").read_text())
    view = InputSpec.from_dict(manifest["input"])
    originals = {p.name: p.read_bytes() for p in (tmp_path / "crawl").iterdir()}
    for s in read_plain(out).values():
        name = json.loads(s["json"])["sample_id"].split("/", 1)[1]
        assert set(s) & {"jpg", "webp"} == set()
        with Image.open(io.BytesIO(s["png"])) as img:
            assert img.size == (view.size, view.size)
        assert np.array_equal(to_pixels(s["png"], view)[0], to_pixels(originals[name], view)[0]), name
    keep = tmp_path / "keep"
    export(ExportConfig(out=str(keep), sources=[spec], image_size="view", show_progress=False))
    exts = {
        json.loads(s["json"])["sample_id"]: ({"png", "jpg", "webp"} & set(s)).pop() for s in read_plain(keep).values()
    }
    assert exts["c/g1.jpeg"] == "jpg" and exts["c/g2.webp"] == "webp" and exts["c/bmp.bmp"] == "png"
    with pytest.raises(Exception, match="another image"):
        export(ExportConfig(out=str(out), sources=[spec], image_format="jpg", image_size="view", show_progress=False))
