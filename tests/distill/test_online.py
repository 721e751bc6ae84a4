"""Online distillation: the teacher labels the view the student trains on; feature and relational terms;
the mixed offline mode; fine-tuning on a few labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import distill.train
from curate.config import ExportConfig, SelectConfig
from curate.export import export
from curate.select import select
from distill.config import TrainConfig
from distill.train import train
from kdcore.errors import UserError
from tests.conftest import run_cli
from tests.distill import recorder


@pytest.fixture(scope="module")
def shards(pool, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the pool as shards with soft labels, held-out labelled digits, labelled digits the teacher saw)"""
    root = tmp_path_factory.mktemp("online")
    select(SelectConfig(pool=str(pool), out=str(root / "sel"), strategy="threshold", threshold=-1e9))
    export(ExportConfig(out=str(root / "train"), pool=str(pool), selection=str(root / "sel"), shard_size=200,
                        show_progress=False))  # fmt: skip
    for name, rng in (("eval", "start=1000&stop=1500"), ("few", "stop=1000")):
        export(ExportConfig(out=str(root / name), sources=[f"d=builtin:digits?{rng}"], shard_size=500,
                            show_progress=False))  # fmt: skip
    return root / "train", root / "eval", root / "few"


def recording_spec(teacher: Path) -> str:
    return f"python:tests.distill.recorder:make?width=8&weights={teacher}"


def cfg(train_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(shards=str(train_dir), out=str(out), student="cnn-tiny", steps=6, batch_size=32, lr=1e-2,
                workers=0, shuffle_buffer=200, show_progress=False, checkpoint_every=1000)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def on_uint8_grid(x: torch.Tensor, mean: float = 0.25, std: float = 0.35) -> float:
    """Share of pixels that are k/255 once de-normalised: 1.0 for decoded images, far less once mixed."""
    v = (x * std + mean) * 255
    return float(((v - v.round()).abs() < 1e-3).float().mean())


def record_student(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real = distill.train.build

    def build(*args, **kwargs):
        model, factory, kw = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()) if m.training else None)
        return model, factory, kw

    monkeypatch.setattr(distill.train, "build", build)
    return seen


def test_teacher_is_called_on_the_mixed_view_the_student_sees(shards, teacher, tmp_path, monkeypatch):
    train_dir, _, _ = shards
    student_inputs = record_student(monkeypatch)
    recorder.INPUTS.clear()
    train(cfg(train_dir, tmp_path / "mix", teacher=recording_spec(teacher), mixup=1.0, crop=1))
    # one teacher call per step on the student's view, plus one on the first step: the view check, which labels
    # the cropped but unmixed view
    assert len(recorder.INPUTS) == 7 and len(student_inputs) == 6
    assert on_uint8_grid(recorder.INPUTS[1]) > 0.999
    for t_in, s_in in zip(recorder.INPUTS[:1] + recorder.INPUTS[2:], student_inputs, strict=True):
        assert torch.allclose(t_in, s_in, atol=1e-5)
        assert on_uint8_grid(t_in) < 0.5  # mixed: not the decoded originals
    recorder.INPUTS.clear()
    train(cfg(train_dir, tmp_path / "plain", teacher=recording_spec(teacher)))
    assert len(recorder.INPUTS) == 6 and min(on_uint8_grid(x) for x in recorder.INPUTS) > 0.999


def test_online_fraction_asks_the_teacher_on_a_share_of_steps_only(shards, teacher, tmp_path):
    train_dir, _, _ = shards
    counts = []
    for run in ("a", "b"):
        recorder.INPUTS.clear()
        train(cfg(train_dir, tmp_path / run, steps=40, teacher=recording_spec(teacher), online_fraction=0.25,
                  mixup=1.0))  # fmt: skip
        counts.append(len(recorder.INPUTS))
        assert all(on_uint8_grid(x) < 0.999 for x in recorder.INPUTS)  # the teacher only sees mixed batches
    assert counts[0] == counts[1] and 3 <= counts[0] <= 20  # deterministic for a seed, about a quarter of 40


def test_feature_and_relational_terms_train_and_resume(shards, teacher, tmp_path):
    train_dir, _, _ = shards
    run = tmp_path / "feat"
    opts = dict(teacher=str(teacher), feature_weight=1.0, feature_layers="features.3:features.3", rkd_distance=1.0,
                rkd_angle=2.0, checkpoint_every=10, log_every=5)  # fmt: skip
    train(cfg(train_dir, run, steps=20, **opts))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["proj"]["weight"].shape == (16, 16, 1, 1)  # a 1×1 conv between the two 16-channel maps
    res = train(cfg(train_dir, run, steps=40, resume=True, **opts))
    assert res.resumed_from == 20 and res.steps == 40
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 45, 5))  # nothing logged twice across the resume
    assert all(r["rkd_distance"] > 0 and r["rkd_angle"] > 0 for r in rows)  # each term logged beside the loss
    assert rows[-1]["feature"] < 0.5 * rows[0]["feature"]  # the projected student features approach the teacher's
    with pytest.raises(UserError, match="no layer 'nope'"):
        train(cfg(train_dir, tmp_path / "bad", **{**opts, "feature_layers": "nope:features.3"}))


def test_offline_augmentation_and_feature_terms_need_a_teacher(shards, tmp_path):
    train_dir, _, _ = shards
    with pytest.raises(UserError, match="online --teacher"):
        train(cfg(train_dir, tmp_path / "a", mixup=0.2))
    with pytest.raises(UserError, match="online --teacher"):
        train(cfg(train_dir, tmp_path / "b", rkd_angle=1.0))
    proc = run_cli("distill", "train", str(train_dir), "--out", str(tmp_path / "c"), "--steps", "5", "--crop", "2")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "online --teacher" in proc.stderr


def test_finetune_on_ten_labels_per_class(shards, tmp_path):
    train_dir, eval_dir, few = shards
    train(cfg(train_dir, tmp_path / "weak", steps=8, lr=3e-3))  # a student that has barely started
    proc = run_cli("distill", "finetune", str(tmp_path / "weak"), "--data", str(few), "--per-class", "10",
                   "--steps", "150", "--lr", "3e-3", "--eval", str(eval_dir), check=True)  # fmt: skip
    info = json.loads((tmp_path / "weak" / "finetune" / "finetune.json").read_text())
    assert info["samples"] == 100 and "accuracy" in proc.stdout
    assert info["accuracy"] > info["accuracy_before"] + 0.1 and info["loss_last"] < info["loss_first"]
    assert (tmp_path / "weak" / "finetune" / "student.pt").is_file()


def test_online_teacher_that_changes_its_mind_on_augmented_views_is_reported(shards, teacher, tmp_path, capsys,
                                                                              monkeypatch):  # fmt: skip
    """The digits teacher never saw mirrored digits: on flipped views it often leaves its stored label, which the
    run measures on its first online batch, logs, and warns about. The check draws no random numbers of the
    run's own: with it replaced by a constant, the student's weights are the same."""
    train_dir, _, _ = shards
    res = train(cfg(train_dir, tmp_path / "flip", teacher=str(teacher), flip=True, crop=1))
    value = res.final["online_view_agreement"]
    rows = [json.loads(x) for x in (tmp_path / "flip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["online_view_agreement"] for r in rows if "online_view_agreement" in r] == [value]
    assert 0.0 < value < 0.9
    err = capsys.readouterr().err
    assert f"keeps its stored label for {value:.0%}" in err and "warning: the online teacher changes" in err

    plain = train(cfg(train_dir, tmp_path / "plain", teacher=str(teacher)))  # nothing augmented: nothing to check
    assert "online_view_agreement" not in plain.final

    monkeypatch.setattr(distill.train, "_view_agreement", lambda *a: 1.0)
    train(cfg(train_dir, tmp_path / "flip-unchecked", teacher=str(teacher), flip=True, crop=1))
    a = torch.load(tmp_path / "flip" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "flip-unchecked" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
