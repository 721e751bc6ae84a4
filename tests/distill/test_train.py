"""distill train / eval on shards exported from a pool scored by a teacher trained in the test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from curate.config import ExportConfig, SelectConfig
from curate.export import export
from curate.select import select
from curate.sources.builtin import digits as load_digits
from distill.config import EvalConfig, TrainConfig
from distill.data import loader, open_shards, rank_shards
from distill.evaluate import evaluate
from distill.train import train
from kdcore import models
from kdcore.errors import UserError
from tests.conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def shards(pool, tmp_path_factory) -> tuple[Path, Path]:
    """(the whole pool as distillation shards, held-out labelled digits as evaluation shards)"""
    root = tmp_path_factory.mktemp("shards")
    select(SelectConfig(pool=str(pool), out=str(root / "sel"), strategy="threshold", threshold=-1e9))
    export(ExportConfig(out=str(root / "train"), pool=str(pool), selection=str(root / "sel"), shard_size=100,
                        show_progress=False))  # fmt: skip
    export(ExportConfig(out=str(root / "eval"), sources=["d=builtin:digits?start=1000&stop=1500"], shard_size=250,
                        show_progress=False))  # fmt: skip
    return root / "train", root / "eval"


def cfg(train_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(shards=str(train_dir), out=str(out), student="cnn-tiny", steps=150, batch_size=64, lr=1e-2,
                workers=0, shuffle_buffer=500, show_progress=False, eval_every=50, checkpoint_every=50)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_student_distilled_from_the_pool_beats_chance(shards, tmp_path):
    train_dir, eval_dir = shards
    res = train(cfg(train_dir, tmp_path / "run", eval=str(eval_dir), workers=1))
    assert res.steps == 150 and res.final["accuracy"] > 0.6  # chance is 0.1
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "curves.png", "student.pt", "checkpoint.pt"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "accuracy" in r]
    assert [r["step"] for r in evals] == [50, 100, 150]
    # the checkpoint loads with weights_only=True and as the next teacher
    ckpt = torch.load(run / "student.pt", weights_only=True)
    assert ckpt["factory"] == "kdcore.models:small_cnn" and ckpt["classes"] == [str(i) for i in range(10)]
    student = models.load(str(run))
    x, y = load_digits()
    xt = ((torch.from_numpy(x[1000:1500]).float() / 255 - student.input.mean[0]) / student.input.std[0])[:, None]
    with torch.inference_mode():
        acc = float((student.model(xt).argmax(1).numpy() == y[1000:1500]).mean())
    # distill eval agrees with a forward pass done here
    trained = json.loads((run / "eval" / "eval.json").read_text())  # train's last evaluation, named after --eval
    assert trained["accuracy"] == res.final["accuracy"] and trained["data"] == str(eval_dir)
    proc = run_cli("distill", "eval", str(run), "--data", str(eval_dir), "--workers", "0", check=True)
    index = json.loads((run / "eval.json").read_text())
    assert index["latest"] == "eval" and index["results"]["eval"]["file"] == "eval/eval.json"
    info = json.loads((run / "eval" / "eval.json").read_text())
    assert info["accuracy"] == pytest.approx(acc, abs=1e-9) and f"accuracy {acc:.4f}" in proc.stdout
    assert index["results"]["eval"]["accuracy"] == info["accuracy"]
    assert (run / "eval" / "eval-confusion.png").is_file() and np.array(info["confusion"]).sum() == 500
    assert 0 <= info["top5_accuracy"] <= 1 and info["top5_accuracy"] >= info["accuracy"]


def test_agreement_with_the_teacher_on_shards_with_logits(shards, tmp_path):
    train_dir, _ = shards
    train(cfg(train_dir, tmp_path / "run", steps=60))
    res = evaluate(EvalConfig(str(tmp_path / "run"), str(train_dir), workers=0))
    assert 0.3 < res["agreement"] <= 1.0  # the pool mixes digits with noise; digits carry labels too
    assert res["samples"] == 297  # only the digits have true labels in the teacher's class space


def test_agreement_is_against_the_teacher_and_accuracy_against_true_labels(shards, teacher, pool):
    """The teacher evaluated on its own soft labels agrees on every sample, while its accuracy on the labelled
    digits is whatever it is: two different measures."""
    import duckdb

    train_dir, _ = shards
    res = evaluate(EvalConfig(str(teacher), str(train_dir), workers=0))
    assert res["agreement"] == 1.0 and res["teacher_samples"] == 997
    acc = duckdb.sql(f"SELECT avg((pred = label)::DOUBLE) FROM '{pool}/samples/*/*.parquet' WHERE label IS NOT NULL")
    assert res["accuracy"] == pytest.approx(acc.fetchall()[0][0]) and res["accuracy"] < 1.0


def test_supervised_training_on_true_labels(shards, tmp_path):
    _, eval_dir = shards
    res = train(cfg(eval_dir, tmp_path / "sup", loss="ce", labels="true", steps=80, eval=str(eval_dir)))
    assert res.final["accuracy"] > 0.8
    with pytest.raises(UserError, match="no teacher soft labels"):
        train(cfg(eval_dir, tmp_path / "kd", loss="kd"))


def test_resume_after_sigkill_continues_from_the_checkpoint(shards, tmp_path):
    train_dir, _ = shards
    out = tmp_path / "run"
    args = [sys.executable, "-m", "distill", "train", str(train_dir), "--out", str(out), "--student", "cnn-tiny",
            "--steps", "400", "--batch-size", "32", "--workers", "0", "--checkpoint-every", "25",
            "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "checkpoint.pt").exists() and (out / "metrics.jsonl").exists():
            steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
            if steps and steps[-1] >= 100:
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 25 <= saved < 400 and not (out / "student.pt").exists()
    again = run_cli("distill", "train", str(train_dir), "--out", str(out), "--student", "cnn-tiny", "--steps", "400",
                    "--batch-size", "32", "--workers", "0", "--checkpoint-every", "25", "--resume", "--no-progress",
                    check=True)  # fmt: skip
    assert f"resumed at step {saved}" in again.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # no step logged twice, none from zero again
    assert steps[0] == 50  # the log up to the checkpoint was kept
    fresh = run_cli("distill", "train", str(train_dir), "--out", str(out), "--steps", "10")
    assert fresh.returncode == 2 and "--resume" in fresh.stderr


def test_shards_split_by_rank_cover_every_sample_once(shards):
    train_dir, _ = shards
    s = open_shards(str(train_dir))
    assert len(s.urls) == 10
    for epoch in range(3):
        parts = [rank_shards(s.urls, r, 3, epoch, seed=5, shuffle=True) for r in range(3)]
        flat = [u for p in parts for u in p]
        assert sorted(flat) == sorted(s.urls) and len(set(flat)) == len(flat)
    keys = []
    for rank in range(2):
        for batch in loader(s, 50, train=False, rank=rank, world=2, workers=0):
            keys += batch["label"].tolist()
    assert len(keys) == s.count == 997


RANK_PROBE = """
import json, sys, tarfile
import torch.distributed as dist
from distill.data import epoch_urls, open_shards, rank_shards

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
shards = open_shards(sys.argv[1])
per_epoch = len(rank_shards(shards.urls, rank, world, 0, 5, True))
stream = epoch_urls(shards.urls, rank, world, seed=5, epochs=None)  # the endless stream training reads
seen = []
for epoch in range(3):
    keys = []
    for _ in range(per_epoch):
        with tarfile.open(next(stream)["url"]) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar.getmembers()})
    seen.append(keys)
gathered = [None] * world
dist.all_gather_object(gathered, seen)
if rank == 0:
    open(sys.argv[2], "w").write(json.dumps(gathered))
dist.destroy_process_group()
"""


def test_two_torchrun_ranks_see_every_sample_once_per_epoch(shards, tmp_path):
    train_dir, _ = shards
    probe, out = tmp_path / "probe.py", tmp_path / "seen.json"
    probe.write_text(RANK_PROBE)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
         str(probe), str(train_dir), str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, cwd=ROOT, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    orders = []
    for epoch in range(3):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert a and b and not set(a) & set(b)  # no sample on both ranks
        assert len(a) + len(b) == len(set(a) | set(b)) == 997  # every sample, once
        orders.append(a)
    assert orders[0] != orders[1] or orders[1] != orders[2]  # shard order reshuffled between epochs


DDP_PROBE = """
import os, sys, torch
import distill.train as t
from distill.config import TrainConfig

models = []
real_build = t.build


def build(*args, **kwargs):  # keep each rank's own model object: DDP trains it in place
    model, factory, kw = real_build(*args, **kwargs)
    models.append(model)
    return model, factory, kw


t.build = build
shards, out, weights = sys.argv[1:4]
t.train(TrainConfig(shards=shards, out=out, student="cnn-tiny", steps=12, batch_size=32, workers=0,
                    shuffle_buffer=0, show_progress=False, eval=sys.argv[4] if len(sys.argv) > 4 else None,
                    eval_every=12))
torch.save(models[0].state_dict(), f"{weights}/rank{os.environ.get('RANK', '0')}.pt")
"""


def test_ddp_ranks_fed_different_shards_end_with_identical_weights(shards, tmp_path):
    """Two torchrun ranks read disjoint shards, yet all-reduced gradients keep their weights identical; a
    single process trained on one half of the shards ends elsewhere."""
    train_dir, eval_dir = shards
    probe = tmp_path / "ddp_probe.py"
    probe.write_text(DDP_PROBE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(probe), str(train_dir), str(tmp_path / "ddp"), str(tmp_path), str(eval_dir)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["world_size"] == 2 and (tmp_path / "ddp" / "student.pt").is_file()
    assert models.load(str(tmp_path / "ddp")).classes == [str(i) for i in range(10)]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    half = str(train_dir / "shard-{000000..000004}.tar")
    solo = tmp_path / "solo"
    solo.mkdir()
    proc = subprocess.run([sys.executable, str(probe), half, str(tmp_path / "one"), str(solo)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    alone = torch.load(solo / "rank0.pt", weights_only=True)
    assert max(float((alone[k].float() - r0[k].float()).abs().max()) for k in r0) > 1e-3


def test_cli_errors(shards, tmp_path):
    train_dir, eval_dir = shards
    for args, msg in [
        ([str(tmp_path), "--out", str(tmp_path / "r"), "--steps", "5"], "manifest.json"),
        ([str(train_dir), "--out", str(tmp_path / "r"), "--steps", "5", "--student", "vit"], "unknown model"),
        ([str(eval_dir), "--out", str(tmp_path / "r"), "--steps", "5", "--loss", "kd"], "soft labels"),
        ([str(train_dir), "--out", str(tmp_path / "r")], "--steps"),
        ([str(train_dir), "--out", str(tmp_path / "r"), "--steps", "5", "--loss", "mse"], "unknown --loss"),
    ]:
        proc = run_cli("distill", "train", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert msg in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("distill", "eval", str(tmp_path / "nothing"), "--data", str(eval_dir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
