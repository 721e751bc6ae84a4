"""pipeline run: a tiny job end to end, caching, re-running what changed, resuming, bad specs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.run import run
from tests.conftest import ROOT, run_cli

JOB = """
[job]
name = "tiny"
work = "{work}"

[teacher]
source = "train=builtin:digits?stop=1200"
student = "cnn-tiny"
steps = 120

[score]
sources = ["digits=builtin:digits?start=1500", "noise=synthetic:noise?n=300&size=8", "glyphs=synthetic:glyphs?n=200"]
batch-size = 128

[index]

[select]
strategy = "top-per-class"
per-class = {per_class}
score = "energy"

[export]
shard-size = 100

[eval]
source = "test=builtin:digits?start=1200&stop=1500"

[distill]
student = "cnn-tiny"
steps = {steps}
batch-size = 64
workers = 0
checkpoint-every = 20
{distill_extra}

[report]
thumbs = 3
"""


ONLINE = "online = true\ncrop = 1\nmixup = 0.2"  # the job's teacher labels each augmented, mixed view


def write_job(path: Path, work: Path, per_class: int = 20, steps: int = 80, distill_extra: str = "") -> Path:
    path.write_text(JOB.format(work=work, per_class=per_class, steps=steps, distill_extra=distill_extra))
    return path


def actions(res) -> dict[str, str]:
    return {s.stage: s.action for s in res.stages}


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("job")
    spec = write_job(root / "job.toml", root / "work", distill_extra=ONLINE)
    proc = run_cli("pipelines", "run", str(spec), check=True)  # progress on, output piped as into a log file
    assert "teacher accuracy" in proc.stdout and "student accuracy" in proc.stdout
    # stage names reach the log as they are; bars and logs go to stderr, results to stdout
    for stage in ("teacher", "score", "index", "select", "export", "eval", "distill", "report"):
        assert f"[{stage}] not run yet" in proc.stderr
    assert "scoring" in proc.stderr and "distilling" in proc.stderr
    assert "scoring" not in proc.stdout and "distilling" not in proc.stdout and "[score]" not in proc.stdout
    return spec, root / "work"


def test_job_runs_end_to_end_and_summarises(job):
    spec, work = job
    summary = json.loads((work / "eval" / "eval.json").read_text())
    assert summary["teacher_accuracy"] > 0.8 and summary["student_accuracy"] > 0.6
    assert 0.6 < summary["agreement"] <= 1.0
    assert (work / "distill" / "run" / "student.pt").is_file()
    assert (work / "report" / "report" / "report.html").is_file()
    assert summary["selection"]["rows"] == 200 and set(summary["seconds"]) >= {"teacher", "score", "distill"}
    config = json.loads((work / "distill" / "run" / "config.json").read_text())
    assert config["teacher"] == str(work / "teacher" / "run") and config["mixup"] == 0.2 and config["crop"] == 1
    # the summary as JSON beside the stages: what the job did and what came of it
    written = json.loads((work / "summary.json").read_text())
    assert written["job"] == "tiny" and Path(written["work"]).resolve() == work.resolve() and not written["dry_run"]
    assert [s["stage"] for s in written["stages"]] == list(config_stages())
    assert {s["action"] for s in written["stages"]} == {"run"}
    assert written["summary"]["student_accuracy"] == summary["student_accuracy"]
    assert Path(written["summary"]["student"]).resolve() == (work / "distill" / "run" / "student.pt").resolve()


def config_stages() -> tuple[str, ...]:
    return ("teacher", "score", "index", "select", "export", "eval", "distill", "report")


def test_unchanged_stages_are_skipped_and_changed_ones_rerun(job, tmp_path):
    spec, work = job
    again = run(str(spec), show_progress=False)
    assert set(actions(again).values()) == {"skip"}
    write_job(
        spec, work, per_class=15, distill_extra=ONLINE
    )  # selection changed: it and everything reading it run again
    res = run(str(spec), show_progress=False, log=lambda _: None)
    acts = actions(res)
    assert acts["teacher"] == acts["score"] == acts["index"] == acts["eval"] == "skip"
    assert acts["select"] == acts["export"] == acts["distill"] == acts["report"] == "run"
    assert res.summary["selection"]["rows"] == 150
    dry = run(str(spec), start="distill", dry_run=True)
    assert actions(dry)["select"] == "skip" and actions(dry)["distill"] == "run"
    write_job(spec, work, distill_extra=ONLINE)  # back to the fixture's spec for the other tests


def test_killed_job_resumes_where_it_stopped(tmp_path):
    spec = write_job(tmp_path / "job.toml", tmp_path / "work", steps=600)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "run", str(spec), "--no-progress"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    ckpt = tmp_path / "work" / "distill" / "run" / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the job never reached distillation"
    res = run(str(spec), show_progress=False, log=lambda _: None)
    acts = {s.stage: (s.action, s.reason) for s in res.stages}
    assert acts["teacher"][0] == acts["score"][0] == acts["export"][0] == "skip"
    assert acts["distill"] == ("run", "resuming")
    rows = [json.loads(x) for x in (tmp_path / "work" / "distill" / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 600


@pytest.mark.parametrize(
    "text, message",
    [
        ('[teacher]\nspec = "t.pt"\n[score]\nsources = []\nbogus = 1\n', "line 5: unknown key 'bogus' in [score]"),
        ('[teacher]\nspec = "t.pt"\n[score]\nbatch-size = 3\n', "line 3: [score] needs 'sources'"),
        ('[teacher]\nspec = "t.pt"\n[scroe]\nsources = []\n', "line 3: unknown stage [scroe]"),
        ('[teacher]\nspec = "t.pt"\nsource = "x=builtin:digits"\n', "exactly one of 'spec' or 'source'"),
        ('[teacher]\nspec = "t.pt"\n[select]\nstrategy = "balanced"\n', "[select] needs a [score] stage"),
        (
            '[teacher]\nspec = "t.pt"\n[score]\nsources = []\nbatch-size = "big"\n',
            "line 5: 'batch-size' in [score] must be int",
        ),
        ('[teacher]\nspec = "t.pt"\n[score]\nsources = []\nworkers = true\n', "must be int, got True"),
        ("[teacher\n", "job.toml"),
    ],
)
def test_bad_specs_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "job.toml").write_text(text)
    proc = run_cli("pipelines", "run", str(tmp_path / "job.toml"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_a_jobs_mistakes_name_the_table_and_key(teacher, tmp_path):
    """The stages word their errors as CLI flags; in a job they name the TOML table and key instead, whether the
    config refuses the value or the stage does when it runs."""
    head = f'[job]\nwork = "{tmp_path / "work"}"\n[teacher]\nspec = "{teacher}"\n'
    cases = [
        ("[score]\nsources = []\n", "[score] sources", "line 6"),  # refused by the score stage as it runs
        ('[score]\nsources = ["n=synthetic:noise?n=8&size=8"]\n[select]\nstrategy = "balanced"\n', "[select] n", ""),
        ('[score]\nsources = ["n=synthetic:noise?n=8&size=8"]\nmax-error-rate = 2\n', "[score] max-error-rate",
         "line 7"),
    ]  # fmt: skip
    for body, key, line in cases:
        (tmp_path / "job.toml").write_text(head + body)
        proc = run_cli("pipelines", "run", str(tmp_path / "job.toml"), "--no-progress")
        assert proc.returncode == 2, proc.stderr
        error = proc.stderr.strip().splitlines()[-1]
        assert key in error and "--" not in error and line in error, error


def test_shipped_specs_are_valid():
    from pipelines.run import load_job

    for name in ("demo.toml", "demo-digits.toml", "example.toml", "imagenet.toml"):
        job = load_job(str(ROOT / "pipelines" / name))
        assert list(job.stages) == ["teacher", "score", "index", "select", "export", "eval", "distill", "report"]


def test_a_changed_weights_file_reruns_the_teacher_and_score_stages(teacher, tmp_path):
    """The teacher's fingerprint follows every file its spec reads: here the weights= of a python: spec."""
    import torch

    from kdcore import models

    weights = tmp_path / "weights.pt"
    state = models.load(str(teacher)).model.state_dict()
    torch.save(state, weights)
    spec = (f"python:kdcore.models:small_cnn?in_channels=1&num_classes=10&width=8&weights={weights}"
            "&size=8&channels=1&mean=0.25&std=0.35")  # fmt: skip
    job = tmp_path / "job.toml"
    job.write_text(f'[job]\nwork = "{tmp_path / "work"}"\n[teacher]\nspec = "{spec}"\n'
                   '[score]\nsources = ["n=synthetic:noise?n=64&size=8"]\n')  # fmt: skip
    assert actions(run(str(job), show_progress=False)) == {"teacher": "run", "score": "run"}
    assert actions(run(str(job), show_progress=False)) == {"teacher": "skip", "score": "skip"}
    sha = json.loads((tmp_path / "work" / "score" / "pool" / "pool.json").read_text())["teacher"]["sha256"]
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, weights)
    again = run(str(job), show_progress=False)
    assert actions(again) == {"teacher": "run", "score": "run"}
    assert {s.reason for s in again.stages} == {"parameters or inputs changed"}
    new = json.loads((tmp_path / "work" / "score" / "pool" / "pool.json").read_text())["teacher"]["sha256"]
    assert new != sha


def test_a_synthesize_stage_adds_its_images_to_the_pool(teacher, tmp_path):
    """[synthesize] writes teacher-guided images that [score] reads as the source `synth`; boundary without a
    `source` moves the pool's own images; a changed [synthesize] reruns it and the score stage."""
    job = tmp_path / "job.toml"
    text = (f'[job]\nwork = "{tmp_path / "work"}"\n[teacher]\nspec = "{teacher}"\n'
            '[synthesize]\nmethod = "boundary"\nn = {n}\nbatch-size = 16\n'
            '[score]\nsources = ["d=builtin:digits?start=1500&stop=1540", "n=synthetic:noise?n=30&size=8"]\n'
            )  # fmt: skip
    job.write_text(text.format(n=24))
    assert actions(run(str(job), show_progress=False)) == {"teacher": "run", "synthesize": "run", "score": "run"}
    from curate.query import connect

    con = connect(str(tmp_path / "work" / "score" / "pool"))
    rows = dict(con.execute("SELECT source, count(*) FROM samples GROUP BY 1").fetchall())
    assert rows == {"d": 40, "n": 30, "synth": 24}
    assert actions(run(str(job), show_progress=False)) == {"teacher": "skip", "synthesize": "skip", "score": "skip"}
    job.write_text(text.format(n=32))
    assert actions(run(str(job), show_progress=False)) == {"teacher": "skip", "synthesize": "run", "score": "run"}
    con = connect(str(tmp_path / "work" / "score" / "pool"))
    assert con.execute("SELECT count(*) FROM samples WHERE source = 'synth'").fetchall()[0][0] == 32


ROUNDS_JOB = """
[job]
work = "{work}"
[teacher]
spec = "{teacher}"
[score]
sources = ["digits=builtin:digits?start=1500", "noise=synthetic:noise?n=300&size=8", "glyphs=synthetic:glyphs?n=200"]
[select]
n = 60
[export]
shard-size = 100
[eval]
source = "test=builtin:digits?start=1200&stop=1500"
[distill]
student = "cnn-tiny"
steps = 30
batch-size = 32
workers = 0
rounds = 3
"""


def test_rounds_draw_where_the_student_disagrees_and_keep_the_best_student(teacher, tmp_path):
    import pyarrow.parquet as pq

    from curate.config import SelectConfig
    from pipelines.rounds import candidates, student_view

    job = tmp_path / "job.toml"
    job.write_text(ROUNDS_JOB.format(work=tmp_path / "work", teacher=teacher))
    res = run(str(job), show_progress=False)
    work = tmp_path / "work"
    state = json.loads((work / "distill" / "rounds" / "rounds.json").read_text())
    rounds = state["rounds"]
    assert 2 <= len(rounds) <= 3 and all(0 <= r["held_agreement"] <= 1 for r in rounds)
    assert res.summary["rounds"]["held_agreement"] == [r["held_agreement"] for r in rounds]
    if len(rounds) < 3:  # stopped early: the last round did not raise the held-back agreement enough
        assert rounds[-1]["held_agreement"] - rounds[-2]["held_agreement"] < 0.002
    # round 2's shards: the first selection plus the candidates the round-1 student disagrees with most
    pool = work / "score" / "pool"
    cfg = SelectConfig(pool=str(pool), out=str(work / "select" / "selection"), n=60)
    cand, held = candidates(cfg)
    _, dis = student_view(str(pool), str(work / "distill" / "rounds" / "1" / "student-pool"), cand, held)
    first = set(pq.read_table(work / "select" / "selection" / "selection.parquet").column("uid").to_pylist())
    second = set(pq.read_table(work / "distill" / "rounds" / "2" / "selection" / "selection.parquet")
                 .column("uid").to_pylist())  # fmt: skip
    drawn = second - first
    assert first < second and drawn and not drawn & set(held.tolist())
    free = {int(u): d for u, d in zip(cand, dis, strict=True) if int(u) not in set(held.tolist())}
    assert min(free[u] for u in drawn) >= max((d for u, d in free.items() if u not in drawn and u not in first),
                                              default=0) - 1e-9  # fmt: skip
    best = next(r for r in rounds if r["round"] == state["best"])
    assert best["held_agreement"] == max(r["held_agreement"] for r in rounds)
    assert (work / "distill" / "run" / "student.pt").read_bytes() == Path(best["student"]).read_bytes()
    assert set(actions(run(str(job), show_progress=False)).values()) == {"skip"}


def test_the_imagenet_teacher_of_the_shipped_job_sees_photos():
    """A fast check of pipelines/imagenet.toml's teacher: EfficientNet-Lite0's ImageNet weights, the spec of the
    job, on scikit-image's coffee photo: an espresso or a cup among its top 5."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("skimage")
    import tomllib
    import torch

    from kdcore import models
    from kdcore.tensors import Normalize
    from kdcore.view import to_pixels

    spec = tomllib.loads((ROOT / "pipelines" / "imagenet.toml").read_text())["teacher"]["spec"]
    teacher = models.load(spec.replace("@pipelines/", f"@{ROOT}/pipelines/"))
    assert len(teacher.classes) == 1000 and teacher.input.size == 224
    import skimage.data

    x = torch.from_numpy(to_pixels(skimage.data.coffee(), teacher.input)[0])[None]
    with torch.inference_mode():
        top = teacher.model(Normalize(teacher.input)(x)).topk(5).indices[0].tolist()
    assert {"espresso", "cup", "coffee mug"} & {teacher.classes[i] for i in top}
