"""`distill eval`: one result per data set, top-5 and KL, a labelled set with some of the student's classes, and
agreement on unlabelled images labelled on the fly by --teacher; the bad input of eval, train and finetune."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curate.config import ExportConfig
from curate.export import export
from curate.sources.builtin import digits as load_digits
from distill.config import EvalConfig, FinetuneConfig, TrainConfig
from distill.evaluate import evaluate
from distill.finetune import finetune
from kdcore.errors import UserError
from tests.conftest import run_cli


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(teacher, tmp_path_factory) -> dict[str, Path]:
    """A run whose student is the digits teacher; labelled digits as shards; the 3s and 7s alone (a labelled
    folder with two of the ten classes) as shards; the same images as a plain folder without labels."""
    root = tmp_path_factory.mktemp("eval")
    (root / "run").mkdir()
    shutil.copy(teacher, root / "run" / "student.pt")
    export(ExportConfig(out=str(root / "digits"), sources=["d=builtin:digits?start=1500&stop=1620"], shard_size=60,
                        show_progress=False))  # fmt: skip
    x, y = load_digits()
    for i in range(1500, 1700):
        if y[i] in (3, 7):
            for folder in (root / "pairs" / str(y[i]), root / "plain"):
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{i}.png").write_bytes(png(x[i]))
    (root / "plain" / "broken.png").write_bytes(b"not an image")
    export(ExportConfig(out=str(root / "pairs-shards"), sources=[f"p=folder:{root / 'pairs'}?labels=dirs"],
                        show_progress=False))  # fmt: skip
    return {"root": root, "run": root / "run", "teacher": teacher}


def test_one_result_per_data_set_with_top5_and_a_subset_of_classes(data):
    run = data["run"]
    full = evaluate(EvalConfig(str(run), str(data["root"] / "digits"), workers=0))
    assert full["samples"] == 120 and 0.5 < full["accuracy"] <= full["top5_accuracy"] <= 1
    assert "note" not in full and full["file"] == "eval/digits.json"
    pairs = evaluate(EvalConfig(str(run), str(data["root"] / "pairs-shards"), workers=0))
    n = len(list((data["root"] / "plain").glob("*.png"))) - 1
    assert pairs["samples"] == n and pairs["classes_evaluated"] == ["3", "7"]
    assert "2 of the student's 10 classes" in pairs["note"]
    assert pairs["accuracy"] >= pairs["accuracy_all_classes"]  # restricted to 3 and 7, it can only gain
    assert np.array(pairs["confusion"]).shape == (2, 2) and "top5_accuracy" not in pairs  # two classes: no top-5
    index = json.loads((run / "eval.json").read_text())
    assert set(index["results"]) == {"digits", "pairs-shards"} and index["latest"] == "pairs-shards"
    assert index["results"]["digits"]["accuracy"] == full["accuracy"]  # the first result is kept
    assert json.loads((run / "eval" / "digits.json").read_text())["accuracy"] == full["accuracy"]
    assert (run / "eval" / "pairs-shards-confusion.png").is_file()


def test_the_teacher_labels_unlabelled_images_on_the_fly(data):
    """The student is the teacher itself: on the same view it agrees everywhere, and the KL is zero."""
    run, plain = data["run"], data["root"] / "plain"
    with pytest.raises(UserError, match="give --teacher SPEC"):
        evaluate(EvalConfig(str(run), str(plain), workers=0))
    proc = run_cli("distill", "eval", str(run), "--data", str(plain), "--teacher", str(data["teacher"]), "--name",
                   "photos", "--workers", "0", check=True)  # fmt: skip
    res = json.loads((run / "eval" / "photos.json").read_text())
    n = len(list(plain.glob("*.png"))) - 1
    assert res["agreement"] == 1.0 and res["teacher_samples"] == n and res["skipped_files"] == 1
    assert "agreement with the teacher 1.0000" in proc.stdout and "broken.png" in proc.stderr
    assert "samples" in res and res["samples"] == 0  # no true labels: no accuracy
    # shards with labels: the teacher on the fly gives agreement and KL beside the accuracy
    res = evaluate(EvalConfig(str(run), str(data["root"] / "digits"), teacher=str(data["teacher"]), workers=0,
                              name="digits-online"))  # fmt: skip
    assert res["agreement"] == 1.0 and res["top5_agreement"] == 1.0
    assert res["kl_to_teacher"] == pytest.approx(0, abs=1e-5)


def test_a_name_used_by_other_data_is_not_overwritten(data, tmp_path):
    run = data["run"]
    other = tmp_path / "digits"
    shutil.copytree(data["root"] / "digits", other)
    res = evaluate(EvalConfig(str(run), str(other), workers=0))
    assert res["name"].startswith("digits-") and res["name"] != "digits"
    assert json.loads((run / "eval" / "digits.json").read_text())["data"] == str(data["root"] / "digits")


def test_bad_input_of_the_distill_commands(data, tmp_path):
    run, shards = data["run"], str(data["root"] / "digits")
    proc = run_cli("distill", "train", shards, "--out", str(tmp_path / "new"), "--steps", "2", "--loss", "ce",
                   "--labels", "true", "--resume", "--workers", "0")  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "no run to resume in" in proc.stderr and not (tmp_path / "new").exists()
    cases = [
        (lambda: FinetuneConfig(str(run), shards, lr=0), "--lr must be > 0, got 0"),
        (lambda: FinetuneConfig(str(run), shards, lr=-1), "--lr must be > 0, got -1"),
        (lambda: TrainConfig(shards, str(tmp_path / "r"), steps=2, temperature=0), "--temperature must be > 0"),
        (lambda: TrainConfig(shards, str(tmp_path / "r"), steps=2, alpha=1.5), "--alpha must be in"),
        (lambda: finetune(FinetuneConfig(str(tmp_path / "nothing"), shards)), "run not found"),
        (lambda: evaluate(EvalConfig(str(tmp_path / "nothing"), shards)), "run not found"),
        (lambda: evaluate(EvalConfig(str(run), shards, manifest=str(tmp_path / "MISSING"))), "manifest file not found"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            call()
