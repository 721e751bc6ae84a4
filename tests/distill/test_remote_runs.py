"""Runs and teachers on object storage (moto's S3 server on loopback): train writes the run there, resumes from
the checkpoint there, eval and finetune read and write it there, and a teacher loads from a URL."""

from __future__ import annotations

import dataclasses
import json

import pytest
import s3fs

from curate.config import ExportConfig
from curate.export import export
from distill.config import EvalConfig, FinetuneConfig, TrainConfig
from distill.evaluate import evaluate
from distill.finetune import finetune
from distill.train import train as train_fn
from kdcore import models
from kdcore.errors import UserError
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.usefixtures("s3")


def fs() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)


def test_a_run_on_s3_trains_resumes_evaluates_and_teaches(s3, teacher, tmp_path):
    shards = tmp_path / "shards"
    export(ExportConfig(out=str(shards), sources=["d=builtin:digits?start=1500&stop=1580"], shard_size=40,
                        show_progress=False))  # fmt: skip
    bucket = s3()
    run = f"{bucket}/runs/r1"
    key = run.removeprefix("s3://")
    train = ["distill", "train", str(shards), "--out", run, "--student", "cnn-tiny", "--loss", "ce", "--labels", "true",
             "--batch-size", "16", "--workers", "0", "--checkpoint-every", "2", "--no-progress"]  # fmt: skip
    first = run_cli(*train, "--steps", "3", check=True)
    assert f"-> {run}/student.pt" in first.stdout
    assert not (ROOT / "s3:").exists()  # never a local folder named after the URL
    assert {"config.json", "checkpoint.pt", "metrics.jsonl", "student.pt", "curves.png"} <= {
        p.rsplit("/", 1)[-1] for p in fs().ls(key)
    }
    cfg = TrainConfig(str(shards), run, student="cnn-tiny", loss="ce", labels="true", batch_size=16, workers=0,
                      checkpoint_every=2, show_progress=False, steps=3)  # fmt: skip
    with pytest.raises(UserError, match="holds a run already"):
        train_fn(cfg)
    resumed = train_fn(dataclasses.replace(cfg, steps=6, resume=True))
    assert resumed.resumed_from == 3 and resumed.steps == 6
    steps = [json.loads(line)["step"] for line in fs().cat(f"{key}/metrics.jsonl").decode().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6

    res = evaluate(EvalConfig(run, str(shards), workers=0))
    assert res["samples"] == 80 and res["file"] == "eval/shards.json"
    assert json.loads(fs().cat(f"{key}/eval.json"))["results"]["shards"]["accuracy"] == res["accuracy"]
    assert fs().exists(f"{key}/eval/shards-confusion.png")

    tuned = finetune(FinetuneConfig(run, str(shards), per_class=2, steps=2, device="cpu"))
    assert tuned["out"] == f"{run}/finetune" and fs().exists(f"{key}/finetune/student.pt")

    # teachers from URLs: a run directory, a checkpoint, weights= of an architecture
    fs().put(str(teacher), f"{bucket.removeprefix('s3://')}/teacher.pt")
    local = models.load(str(teacher))
    assert models.load(f"{bucket}/teacher.pt").fingerprint == local.fingerprint
    assert models.load(run).classes == [str(i) for i in range(10)]
    arch = models.load(f"python:kdcore.models:small_cnn?width=8&weights={bucket}/teacher.pt&size=8&channels=1")
    assert arch.fingerprint == local.fingerprint
    with pytest.raises(UserError, match="run not found: s3://"):
        evaluate(EvalConfig(f"{bucket}/runs/nope", str(shards)))
