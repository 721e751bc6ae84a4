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
