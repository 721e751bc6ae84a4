"""Across the stages: what one stage writes, the next reads as it was meant."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from curate.config import ExportConfig, ScoreConfig, SelectConfig
from curate.export import export
from curate.score import score
from curate.select import select
from distill.data import loader, open_shards
from kdcore import models
from kdcore.tensors import Normalize
from tests.conftest import CORRUPT, odd_images, rgb_teacher, run_cli, write_odd_folder


def test_the_student_sees_exactly_the_pixels_the_teacher_scored(tmp_path):
    """Odd files (transparency, 16-bit, CMYK, palettes, EXIF rotation, draft-mode JPEG, WebP, BMP, GIF, float
    TIFF) scored by `curate score`, exported, then decoded by `distill`'s loader: the teacher run again on
    what distill decodes gives the logits stored at scoring time, and `distill eval` with the teacher as the
    model agrees with the stored soft labels on every sample."""
    folder = tmp_path / "odd"
    write_odd_folder(folder)
    teacher = rgb_teacher(tmp_path / "teacher.pt")
    pool = tmp_path / "pool"
    res = score(ScoreConfig(str(teacher), [f"odd=folder:{folder}"], str(pool), max_error_rate=0.5,
                            show_progress=False))  # fmt: skip
    assert res.rows == len(odd_images()) and res.per_source["odd"].errors == len(CORRUPT)
    reasons = dict(duckdb.sql(f"SELECT key, reason FROM '{pool}/errors/*/*.parquet'").fetchall())
    assert all(want in reasons[k] for k, want in CORRUPT.items())
    select(SelectConfig(pool=str(pool), out=str(tmp_path / "sel"), strategy="threshold", threshold=-1e9))
    export(ExportConfig(out=str(tmp_path / "shards"), pool=str(pool), selection=str(tmp_path / "sel"),
                        show_progress=False))  # fmt: skip

    net = models.load(str(teacher))
    normalize = Normalize(net.input)
    shards = open_shards(str(tmp_path / "shards"))
    seen = 0
    with torch.inference_mode():
        for batch in loader(shards, 64, train=False, workers=0):
            again = net.model(normalize(batch["image"])).float()
            stored = batch["logits"].float()  # float16 in the shards
            assert torch.allclose(again, stored, atol=0.05, rtol=0.002), (again - stored).abs().max()
            assert torch.equal(again.argmax(1), batch["pred"])
            seen += len(again)
    assert seen == len(odd_images())

    proc = run_cli("distill", "eval", str(teacher), "--data", str(tmp_path / "shards"), "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "eval" / "shards.json").read_text())
    assert result["agreement"] == 1.0 and result["teacher_samples"] == len(odd_images())
    assert "accuracy" not in result  # no true labels here: agreement is not accuracy


def test_rgba_pixels_under_transparency_do_not_leak_into_the_view(tmp_path):
    """The bug this guards: one stage composited transparency on black, the other on white."""
    from kdcore.view import InputSpec, to_pixels

    data = odd_images()["rgba.png"]
    px = to_pixels(data, InputSpec(48, 3, (0.5,), (0.5,)))[0]
    assert px[:, :, :8].max() == 0  # the transparent left half (white underneath) is black in the view
    grey = to_pixels(odd_images()["gray16.png"], InputSpec(48, 1, (0.5,), (0.5,)))[0]
    assert 0 < grey.mean() < 255 and np.unique(grey).size > 20  # 16-bit scaled, not clipped to white


# ------------------------------------------------------------------------------ every source kind, every stage


def write_img2dataset_wds(folder: Path) -> int:
    """img2dataset's webdataset layout: KEY.jpg|png|webp + KEY.json (url, caption, ...) + KEY.txt, keys restarting
    in every tar, tar 00001 missing (a gap in the range), a corrupt image in 00002. Returns the readable count."""
    import webdataset as wds

    files = list(odd_images().items())
    folder.mkdir(parents=True)
    n = 0
    for shard, chunk in ((0, files[:5]), (2, files[5:9])):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as w:
            for i, (name, data) in enumerate(chunk):
                ext = name.rsplit(".", 1)[1].replace("tif", "tiff")
                meta = {"url": f"https://img.example/{shard}/{name}", "caption": f"a {name} picture", "key": f"{i:09d}"}
                w.write({"__key__": f"{i:09d}", ext: data, "json": json.dumps(meta).encode(),
                         "txt": meta["caption"].encode()})  # fmt: skip
                n += 1
            if shard == 2:
                w.write({"__key__": f"{len(chunk):09d}", "jpg": b"\xff\xd8 not really a jpeg", "txt": b"broken"})
    return n


def write_img2dataset_parquet(folder: Path) -> int:
    """img2dataset's parquet layout: a `jpg` column of image bytes beside url, caption and key columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = list(odd_images(seed=1).items())
    folder.mkdir(parents=True)
    table = pa.table({"key": [f"{i:09d}" for i in range(len(files))], "jpg": [d for _, d in files],
                      "url": [f"https://pq.example/{n}" for n, _ in files],
                      "caption": [f"caption of {n}" for n, _ in files]})  # fmt: skip
    pq.write_table(table, folder / "00000.parquet", row_group_size=5)
    return len(files)


@pytest.fixture(scope="module")
def crossing(tmp_path_factory):
    """One pool of every kind of encoded-file source: a labelled folder of odd files, img2dataset's webdataset
    and parquet layouts, plus synthetic noise; scored by a teacher whose classes are the folder's."""
    root = tmp_path_factory.mktemp("crossing")
    teacher = rgb_teacher(root / "teacher.pt", classes=["a", "b"])
    write_odd_folder(root / "folder", labelled=True)
    n_wds = write_img2dataset_wds(root / "wds")
    n_pq = write_img2dataset_parquet(root / "pq")
    specs = [f"folder=folder:{root / 'folder'}?labels=dirs", f"crawl=wds:{root / 'wds'}/{{00000..00002}}.tar",
             f"pq=parquet:{root / 'pq'}/*.parquet?column=jpg&key=key&meta=url,caption",
             "noise=synthetic:noise?n=40&size=32"]  # fmt: skip
    args = ["curate", "score", "--teacher", str(teacher), "--pool", str(root / "pool"), "--batch-size", "16",
            "--max-error-rate", "0.5", "--no-progress"]  # fmt: skip
    for s in specs:
        args += ["--source", s]
    proc = run_cli(*args)
    return root, teacher, proc, {"folder": len(odd_images()), "crawl": n_wds, "pq": n_pq, "noise": 40}


def test_every_source_kind_scores_with_its_errors_and_metadata(crossing):
    root, _, proc, counts = crossing
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 unit(s) failed" in proc.stderr and "crawl/00001" in proc.stderr  # the gap: reported, rest scored
    pool = root / "pool"
    got = dict(duckdb.sql(f"SELECT source, count(*) FROM '{pool}/samples/*/*.parquet' GROUP BY 1").fetchall())
    assert got == counts
    reasons = duckdb.sql(f"SELECT source, key, reason FROM '{pool}/errors/*/*.parquet' ORDER BY 1, 2").fetchall()
    assert {(s, k) for s, k, _ in reasons} >= {("folder", k) for k in CORRUPT} | {("crawl", "<unit 00001>")}
    assert any(s == "crawl" and "corrupt" in r or "not an image" in r for s, _, r in reasons)
    proc = run_cli("curate", "sql", str(pool), "SELECT key, json_extract_string(meta, '$.caption') AS c, "
                   "json_extract_string(meta, '$.url') AS u FROM samples WHERE source IN ('crawl', 'pq') "
                   "AND c LIKE '%rgba%' ORDER BY key", "--format", "json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["u"] for r in rows} == {"https://img.example/0/rgba.png", "https://pq.example/rgba.png"}
    labels = dict(duckdb.sql(f"SELECT key, label FROM '{pool}/samples/*/*.parquet' WHERE source = 'folder'").fetchall())
    assert labels["a/bmp.bmp"] == 0 and labels["b/cmyk.jpg"] == 1  # class folders a/ and b/


def test_every_stage_after_score_reads_that_pool(crossing):
    root, teacher, proc, counts = crossing
    pool = str(root / "pool")
    run_cli("curate", "index", pool, "--no-progress", check=True)
    sel = str(root / "sel")
    out = run_cli("curate", "select", pool, "--strategy", "top-per-class", "--per-class", "20", "--out", sel,
                  check=True)  # fmt: skip
    assert f"of {sum(counts.values())} candidates selected" in out.stdout
    rep = run_cli("curate", "report", pool, "--selection", sel, "--out", str(root / "rep"), "--thumbs", "3",
                  check=True)  # fmt: skip
    page = (root / "rep" / "report.html").read_text()
    for src in ("folder", "crawl", "pq"):
        assert f"thumbs-{src}.png" in page  # thumbnails re-read from each kind of source
    assert "report ->" in rep.stdout
    shards = root / "shards"
    run_cli("curate", "export", pool, "--selection", sel, "--out", str(shards), "--no-progress", check=True)
    import webdataset as wds

    metas = [
        json.loads(s["json"]) for s in wds.WebDataset(sorted(str(p) for p in shards.glob("*.tar")), shardshuffle=False)
    ]
    crawl = [m for m in metas if m["source"] == "crawl"]
    assert crawl and all(m["meta"]["url"].startswith("https://img.example/") and m["meta"]["txt"] for m in crawl)
    assert all(m["meta"]["caption"].startswith("caption of") for m in metas if m["source"] == "pq")
    run_cli("distill", "train", str(shards), "--out", str(root / "run"), "--student", "cnn-tiny", "--steps", "6",
            "--batch-size", "16", "--workers", "0", "--no-progress", check=True)  # fmt: skip
    # the labelled folder, in the teacher's classes, as evaluation shards without a teacher
    test = root / "test-shards"
    run_cli("curate", "export", "--source", f"test=folder:{root / 'folder'}?labels=dirs", "--out", str(test),
            "--no-progress", check=True)  # fmt: skip
    manifest = json.loads((test / "manifest.json").read_text())
    assert manifest["classes"] == ["a", "b"] and manifest["labels"] is True
    ev = run_cli("distill", "eval", str(root / "run"), "--data", str(test), "--workers", "0", check=True)
    assert "accuracy" in ev.stdout
    result = json.loads((root / "run" / "eval" / "test-shards.json").read_text())
    assert result["samples"] == len(odd_images()) and set(result["per_class_accuracy"]) <= {"a", "b"}


# ------------------------------------------------------------------------------ many classes, named


def test_a_1000_class_teacher_with_named_classes(tmp_path):
    """classes=@FILE names the outputs (a wrong count is one clear line); select's summary and the report stay
    readable with 1000 classes."""
    names = [f"n{i:05d} thing number {i}" for i in range(1000)]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "short.txt").write_text("\n".join(names[:999]) + "\n")
    base = "python:kdcore.models:mlp?in_channels=3&num_classes=1000&hidden=32&size=28&channels=3&mean=0.5&std=0.25"
    pool = tmp_path / "pool"
    proc = run_cli("curate", "score", "--teacher", f"{base}&classes=@{tmp_path / 'short.txt'}", "--pool", str(pool),
                   "--source", "n=synthetic:noise?n=30&size=28")  # fmt: skip
    assert proc.returncode == 2 and "999 class names for 1000 outputs" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    run_cli("curate", "score", "--teacher", f"{base}&classes=@{tmp_path / 'classes.txt'}", "--pool", str(pool),
            "--source", "n=synthetic:noise?n=200&size=28", "--source", "l=synthetic:dead-leaves?n=100&size=28",
            "--logits", "topk:20", "--no-progress", check=True)  # fmt: skip
    meta = json.loads((pool / "pool.json").read_text())
    assert meta["classes"][7] == names[7] and meta["logits"] == {"kind": "topk", "k": 20}
    out = run_cli("curate", "select", str(pool), "--strategy", "top-per-class", "--per-class", "2", "--out",
                  str(tmp_path / "sel"), check=True)  # fmt: skip
    assert len(out.stdout.splitlines()) < 20 and "1000 classes" in out.stdout and "thing number" in out.stdout
    run_cli("curate", "report", str(pool), "--selection", str(tmp_path / "sel"), "--out", str(tmp_path / "rep"),
            "--thumbs", "2", check=True)  # fmt: skip
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "classes.png" not in page and "most predicted classes" in page and "thing number" in page
    run_cli("curate", "export", str(pool), "--selection", str(tmp_path / "sel"), "--out", str(tmp_path / "sh"),
            "--soft-labels", "topk:5", "--no-progress", check=True)  # fmt: skip
    assert json.loads((tmp_path / "sh" / "manifest.json").read_text())["classes"][999] == names[999]


def test_preprocessing_is_stated_never_assumed(tmp_path):
    """A python: teacher without mean/std: one warning naming the values used."""
    spec = "python:kdcore.models:mlp?in_channels=1&num_classes=10&size=28&channels=1"
    proc = run_cli("curate", "score", "--teacher", spec, "--pool", str(tmp_path / "p"), "--source",
                   "n=synthetic:noise?n=20&size=28", "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "mean=0.5&std=0.5" in warnings[0]
