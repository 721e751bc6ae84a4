"""curate report: files, images the page references, and the numbers on it against hand computations."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from curate.config import ReportConfig, SelectConfig
from curate.query import connect
from curate.report import report
from curate.select import select
from tests.conftest import auroc, run_cli


@pytest.fixture(scope="module")
def made(pool, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    select(SelectConfig(pool=str(pool), out=str(root / "sel"), strategy="top-per-class", per_class=12))
    res = report(ReportConfig(str(pool), str(root / "rep"), selection=str(root / "sel"), thumbs=6))
    return root, res


def test_report_page_references_images_that_exist(made):
    root, res = made
    page = (root / "rep" / "report.html").read_text()
    srcs = re.findall(r"<img[^>]*src='([^']+)'", page)
    assert {
        "scores.png",
        "classes.png",
        "selection.png",
        "thumbs-digits.png",
        "thumbs-noise.png",
        "roc.png",
        "thumbs-selection.png",
    } <= set(srcs)
    for s in srcs:
        with Image.open(root / "rep" / s) as im:
            if s.startswith("g-"):  # a gallery thumbnail, captioned in HTML
                assert im.size == (96, 96)
            else:
                assert im.size[0] > 300 and im.size[1] > 100
    for source in ("digits", "glyphs", "leaves", "noise"):
        assert f"<td>{source}</td>" in page


def test_report_numbers_match_hand_computations(made, pool):
    root, res = made
    con = connect(str(pool))
    rows = con.execute("SELECT source, energy, bn_score, pred FROM samples").fetchnumpy()
    is_task = rows["source"] == "digits"  # the builtin digits carry the teacher's classes
    for s in ("energy", "bn_score"):
        assert res.auroc[s] == pytest.approx(auroc(rows[s][is_task], rows[s][~is_task]), abs=1e-4)
    by_source = {s["source"]: s for s in res.sources}
    assert by_source["digits"]["task"] and not by_source["noise"]["task"]
    assert by_source["noise"]["rows"] == 300
    h = np.bincount(rows["pred"][rows["source"] == "glyphs"], minlength=10)
    p = h[h > 0] / h.sum()
    assert by_source["glyphs"]["rel_entropy"] == pytest.approx(-(p * np.log(p)).sum() / np.log(10), abs=1e-5)
    sel = json.loads((root / "rep" / "report.json").read_text())["selection"]
    picked = con.execute(
        f"SELECT source FROM samples WHERE uid IN (SELECT uid FROM read_parquet('{root}/sel/selection.parquet'))"
    ).fetchnumpy()["source"]
    assert sel["precision"] == pytest.approx(float(np.mean(picked == "digits")))
    assert sel["rows"] == len(picked)


def test_cli_report_and_errors(pool, tmp_path):
    proc = run_cli("curate", "report", str(pool), "--out", str(tmp_path / "r"), "--thumbs", "3", check=True)
    assert "report ->" in proc.stdout and (tmp_path / "r" / "report.html").is_file()
    proc = run_cli("curate", "report", str(pool), "--out", str(tmp_path / "x"), "--score", "nope")
    assert proc.returncode == 2 and "--score" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("curate", "report", str(pool), "--out", str(pool / "report"))
    assert proc.returncode == 2 and "inside the pool" in proc.stderr


def test_report_warns_when_the_score_ranks_synthetic_data_above_the_task(pool, tmp_path):
    """Noise, dead leaves and glyphs are unrelated by construction: a score that puts them above the task's
    digits (here bn_score turned upside down) gets a warning; bn_score itself does not."""
    bad = report(ReportConfig(str(pool), str(tmp_path / "bad"), score="-bn_score", thumbs=0))
    assert any("synthetic source noise" in w for w in bad.warnings)
    assert "warning:" in (tmp_path / "bad" / "report.html").read_text()
    good = report(ReportConfig(str(pool), str(tmp_path / "good"), score="bn_score", thumbs=0))
    assert good.warnings == []
    proc = run_cli("curate", "report", str(pool), "--out", str(tmp_path / "cli"), "--score", "-bn_score",
                   "--thumbs", "0")  # fmt: skip
    assert proc.returncode == 0 and "warning: -bn_score ranks the synthetic source" in proc.stderr


def test_report_warns_when_the_score_hardly_separates_the_task(pool, tmp_path):
    """With the task known, a ranking score whose AUROC is below 0.8 (here an arbitrary hash of the uid) gets a
    warning that names the best score and the remedy (reference images); bn_score, which separates, gets none."""
    weak = report(ReportConfig(str(pool), str(tmp_path / "weak"), score="hash(uid) % 1000", thumbs=0))
    line = next(w for w in weak.warnings if "separates the task sources" in w)
    value = float(re.search(r"AUROC (\d\.\d+) only", line).group(1))
    con = connect(str(pool))
    rows = con.execute("SELECT (hash(uid) % 1000)::DOUBLE, source = 'digits' FROM samples").fetchall()
    s, pos = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    assert value == pytest.approx(auroc(s[pos], s[~pos]), abs=0.006) and value < 0.8
    assert "--reference" in line and "best score here: " in line
    strong = report(ReportConfig(str(pool), str(tmp_path / "strong"), score="bn_score", thumbs=0))
    assert not any("separates the task sources" in w for w in strong.warnings)


def test_report_galleries_trust_and_pointer_without_task_sources(teacher, pool, tmp_path):
    """Without a task source: per-score galleries (top, middle, bottom of each score over the pool) whose captions
    are HTML text under each thumbnail, the two-component split of the ranking score, and a pointer to
    --task-source and --reference. With one (the digits), the pointer is gone but galleries and split stay."""
    from curate.config import ScoreConfig
    from curate.score import score
    from curate.scores import two_component_split

    blind = tmp_path / "blind"
    score(ScoreConfig(teacher=str(teacher), sources=["a=synthetic:noise?n=40&size=8",
                                                     "b=synthetic:glyphs?n=40"], pool=str(blind),
                      batch_size=64, show_progress=False))  # fmt: skip
    res = report(ReportConfig(str(blind), str(tmp_path / "r"), thumbs=4))
    page = (tmp_path / "r" / "report.html").read_text()
    assert res.auroc == {}
    assert "--task-source" in page and "--reference" in page
    figs = re.findall(r"<figure><img class=g src='([^']+)'[^>]*><figcaption>([^<]+)<br>([^<]+)<br>([^<]+)</figcaption>",
                      page)  # fmt: skip
    by_score = {}
    for src, sid, _cls, cap in figs:
        assert (tmp_path / "r" / src).is_file() and sid.split("/")[0] in ("a", "b")
        by_score.setdefault(cap.split(" ")[0], []).append(float(cap.split(" ")[1]))
    assert {"auto", "bn_score", "energy"} <= set(by_score) and all(len(v) == 12 for v in by_score.values())
    con = connect(str(blind))
    energy = np.sort(con.execute("SELECT energy FROM samples").fetchnumpy()["energy"])
    assert by_score["energy"][:4] == pytest.approx(energy[::-1][:4], rel=6e-3)  # top first
    assert by_score["energy"][-4:] == pytest.approx(energy[:4], rel=6e-3)  # then middle, then bottom
    trust = json.loads((tmp_path / "r" / "report.json").read_text())["trust"]
    split = two_component_split(con.execute("SELECT auto::DOUBLE AS a FROM samples").fetchnumpy()["a"])
    assert trust["auto"]["separation"] == pytest.approx(split.separation, abs=1e-3)
    assert "How far to trust the ranking" in page and f"D = {split.separation:.2f}" in page
    known = report(ReportConfig(str(pool), str(tmp_path / "k"), thumbs=2))
    page = (tmp_path / "k" / "report.html").read_text()
    assert known.auroc and "--task-source NAME" not in page and "<figcaption>" in page


def test_report_of_an_empty_pool_is_one_line(teacher, tmp_path):
    """A pool whose every image failed holds no samples: one line, exit 2, no traceback."""
    from curate.config import ScoreConfig
    from curate.score import score

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"x{i}.png").write_bytes(b"not an image")
    score(ScoreConfig(teacher=str(teacher), sources=[f"bad=folder:{bad}"], pool=str(tmp_path / "pool"),
                      max_error_rate=1.0, show_progress=False))  # fmt: skip
    proc = run_cli("curate", "report", str(tmp_path / "pool"), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "no samples" in proc.stderr
