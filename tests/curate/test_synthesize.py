"""curate synthesize: DeepInversion and boundary images from a real (tiny) teacher, read back as a folder source,
resumed after an interruption, refused with one line when the input is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from curate.config import ScoreConfig, SynthesizeConfig
from curate.query import connect
from curate.score import score
from curate.synthesize import synthesize
from kdcore import models
from tests.conftest import run_cli

DIGITS = "d=builtin:digits?start=1500&stop=1560"


def _predict(teacher: Path, folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The teacher's predictions on the written PNGs, their target classes (from the names), the names."""
    t = models.load(str(teacher))
    names = sorted(p.name for p in folder.glob("*.png"))
    x = np.stack([np.asarray(Image.open(folder / n)) for n in names]).astype(np.float32) / 255
    x = torch.from_numpy(x)[:, None]
    mean, std = torch.tensor(t.input.mean).view(1, -1, 1, 1), torch.tensor(t.input.std).view(1, -1, 1, 1)
    with torch.no_grad():
        pred = t.model((x - mean) / std).argmax(1).numpy()
    target = np.array([int(n.rsplit("-c", 1)[1].removesuffix(".png")) for n in names])
    return pred, target, names


def test_inversion_makes_images_the_teacher_takes_for_its_own_data(teacher, tmp_path):
    out = tmp_path / "inv"
    res = synthesize(SynthesizeConfig(teacher=str(teacher), out=str(out), n=60, batch_size=30, steps=120,
                                      show_progress=False))  # fmt: skip
    assert res.images == 60 and res.batches_run == 2
    pred, target, names = _predict(teacher, out)
    assert len(names) == 60 and sorted(set(target)) == list(range(10))  # every class has targets
    assert (pred == target).mean() >= 0.5 and abs((pred == target).mean() - res.target_hit) < 0.1
    # scored as a folder source beside uniform noise: the teacher's BatchNorm layers find them far more normal
    pool = tmp_path / "pool"
    score(ScoreConfig(teacher=str(teacher), sources=[f"inv=folder:{out}", "noise=synthetic:noise?n=60&size=8"],
                      pool=str(pool), show_progress=False))  # fmt: skip
    con = connect(str(pool))
    inv, noise = (np.array([r[0] for r in con.execute(f"SELECT bn_score FROM samples WHERE source = '{s}'").fetchall()])
                  for s in ("inv", "noise"))  # fmt: skip
    assert len(inv) == 60 and np.median(inv) > np.percentile(noise, 90)


def test_boundary_moves_images_toward_the_runner_up_within_eps(teacher, tmp_path):
    out = tmp_path / "edge"
    res = synthesize(SynthesizeConfig(teacher=str(teacher), out=str(out), method="boundary", source=[DIGITS], n=50,
                                      batch_size=20, eps=0.1, show_progress=False))  # fmt: skip
    assert res.images == 50 and 0 < res.moved <= 0.1 + 1e-6
    t = models.load(str(teacher))
    from curate.sources.builtin import digits

    x0 = digits()[0][1500:1550].astype(np.float32) / 255
    names = sorted(p.name for p in out.glob("*.png"))
    x1 = np.stack([np.asarray(Image.open(out / n)) for n in names]).astype(np.float32) / 255
    assert np.abs(x1 - x0).max() <= 0.1 + 1 / 255  # L-inf ball (PNG rounding)
    mean, std = t.input.mean[0], t.input.std[0]
    with torch.no_grad():
        p0 = torch.softmax(t.model(torch.from_numpy((x0[:, None] - mean) / std)), 1)
        p1 = torch.softmax(t.model(torch.from_numpy((x1[:, None] - mean) / std)), 1)
    runner_up = p0.topk(2, 1).indices[:, 1]
    target = torch.tensor([int(n.rsplit("-c", 1)[1].removesuffix(".png")) for n in names])
    assert torch.equal(runner_up, target)
    gain = p1.gather(1, target[:, None]) - p0.gather(1, target[:, None])
    assert gain.mean() > 0.1  # the runner-up gained probability
    top2 = p1.topk(2, 1).values
    assert (top2[:, 0] - top2[:, 1]).mean() < (lambda v: (v[:, 0] - v[:, 1]).mean())(p0.topk(2, 1).values)


def test_an_interrupted_run_resumes_and_redoes_only_what_is_missing(teacher, tmp_path):
    out = tmp_path / "edge"
    cfg = SynthesizeConfig(teacher=str(teacher), out=str(out), method="boundary", source=[DIGITS], n=50,
                           batch_size=20, show_progress=False)  # fmt: skip
    synthesize(cfg)
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    # as if killed after batch 0: batch 1's record and one of its files lost, batch 2 never run
    state = json.loads((out / "synthesize.json").read_text())
    state["done"] = {"0": state["done"]["0"]}
    (out / "synthesize.json").write_text(json.dumps(state))
    gone = sorted(out.glob("00001-*.png"))[3]
    gone.unlink()
    for p in out.glob("00002-*.png"):
        p.unlink()
    stamp = (out / sorted(before)[0]).stat().st_mtime_ns
    res = synthesize(cfg)
    assert (res.batches_run, res.batches_skipped, res.images) == (2, 1, 50)
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before  # the same images, seeded per batch
    assert (out / sorted(before)[0]).stat().st_mtime_ns == stamp  # batch 0 was not rewritten
    # other settings in the same folder: refused, unless --overwrite
    with pytest.raises(Exception, match="other settings"):
        synthesize(SynthesizeConfig(**{**cfg.__dict__, "eps": 0.02}))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "boundary"], "give --source"),
        (["--n", "0"], "--n must be > 0"),
        (["--method", "dream"], "unknown --method"),
        (["--eps", "2", "--method", "boundary", "--source", DIGITS], "--eps must be in"),
    ],
)
def test_bad_options_are_one_line_errors(teacher, tmp_path, args, message):
    proc = run_cli("curate", "synthesize", "--teacher", str(teacher), "--out", str(tmp_path / "o"), *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["file", "root", "empty", "busy"])
def test_out_paths_users_type(teacher, tmp_path, where):
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    out = {"file": str(tmp_path / "f.txt"), "root": "/", "empty": "", "busy": str(tmp_path / "busy")}[where]
    proc = run_cli("curate", "synthesize", "--teacher", str(teacher), "--out", out, "--n", "4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert {"file": "is a file", "root": "filesystem root", "empty": "is empty", "busy": "holds other files"}[
        where
    ] in proc.stderr
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"  # nothing lost


def test_cli_writes_images_a_folder_source_reads(teacher, tmp_path):
    out = tmp_path / "inv"
    proc = run_cli("curate", "synthesize", "--teacher", str(teacher), "--out", str(out), "--n", "12", "--steps", "20",
                   "--json", check=True)  # fmt: skip
    data = json.loads(proc.stdout)
    assert data["images"] == 12 and len(list(out.glob("*.png"))) == 12
    from curate.sources import parse_source

    src = parse_source(f"s=folder:{out}")
    assert sum(1 for u in src.units() for _ in src.read(u)) == 12  # synthesize.json is not an image


def test_synthesized_images_on_s3_are_a_folder_source_and_resume_there(teacher, tmp_path, s3):
    out = s3() + "/synth/inv"
    cfg = SynthesizeConfig(teacher=str(teacher), out=out, n=24, batch_size=12, steps=10, show_progress=False)
    assert synthesize(cfg).images == 24
    again = synthesize(cfg)
    assert (again.batches_run, again.batches_skipped, again.images) == (0, 2, 24)
    pool = tmp_path / "pool"
    res = score(ScoreConfig(teacher=str(teacher), sources=[f"inv=folder:{out}"], pool=str(pool), show_progress=False))
    assert res.rows == 24
