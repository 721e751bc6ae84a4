"""Across the stages: what one stage writes, the next reads as it was meant."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import torch

from curate.config import ExportConfig, ScoreConfig, SelectConfig
from curate.export import export
from curate.score import score
from curate.select import select
from distill import models
from distill.data import loader, open_shards
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
    result = json.loads((tmp_path / "eval.json").read_text())
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
