"""The one loader of every teacher spec: checkpoints, torchvision, torchscript, python factories."""

from __future__ import annotations

import pytest
import torch

from curate.config import ScoreConfig
from curate.score import score
from kdcore import models
from kdcore.errors import UserError


def test_checkpoint_round_trip_with_weights_only(teacher):
    ckpt = torch.load(teacher, weights_only=True)
    assert ckpt["factory"] == "kdcore.models:small_cnn" and ckpt["input"]["size"] == 8
    loaded = models.load(str(teacher))
    assert loaded.fingerprint == models.load(str(teacher)).fingerprint
    assert loaded.classes == [str(i) for i in range(10)] and not loaded.model.training
    x = torch.randn(3, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), models.load(str(teacher)).model(x))


def test_run_directory_spec(tmp_path, teacher):
    (tmp_path / "student.pt").write_bytes(teacher.read_bytes())
    assert models.load(str(tmp_path)).fingerprint == models.load(str(teacher)).fingerprint


def test_fingerprint_changes_with_weights():
    spec = models.InputSpec(8, 1, (0.5,), (0.5,))
    torch.manual_seed(0)
    a, _, _ = models.build("cnn-tiny", 10, spec)
    b, _, _ = models.build("cnn-tiny", 10, spec)
    assert models.state_fingerprint(a) != models.state_fingerprint(b)
    assert models.state_fingerprint(a) == models.state_fingerprint(a)


def test_mismatched_checkpoint_names_the_keys(tmp_path, teacher):
    with pytest.raises(UserError, match=r"does not fit the architecture \(missing keys \['conv1.weight'"):
        models.load(f"torchvision:resnet18?num_classes=10&weights={teacher}")
    wrong = tmp_path / "wrong.pt"
    spec = models.InputSpec(8, 1, (0.5,), (0.5,))
    m, f, kw = models.build("cnn-tiny", 10, spec)
    models.save_checkpoint(wrong, m, f, {**kw, "num_classes": 7}, [str(i) for i in range(10)], spec)
    with pytest.raises(UserError, match="shape mismatch at fc.weight"):
        models.load(str(wrong))


def test_weights_only_refuses_pickled_objects(tmp_path):
    bad = tmp_path / "obj.pt"
    torch.save({"state_dict": {}, "obj": object()}, bad)
    with pytest.raises(UserError, match=r"other than tensors and plain data \([\w.]*object\)") as err:
        models.load(str(bad))
    assert "`weights_only`" not in str(err.value)  # never an invitation to the unsafe load


def test_torchvision_spec_with_preprocessing(tmp_path):
    m = models.load(
        "torchvision:resnet18?num_classes=5&small_input=true&channels=1&size=32&mean=0.5&std=0.25&weights=random"
    )
    assert m.input.channels == 1 and m.input.size == 32 and m.input.mean == (0.5,)
    with torch.inference_mode():
        assert m.model(torch.zeros(2, 1, 32, 32)).shape == (2, 5)
    sd = tmp_path / "r.pt"
    torch.save(m.model.state_dict(), sd)
    m2 = models.load(f"torchvision:resnet18?num_classes=5&small_input=true&channels=1&size=32&weights={sd}")
    assert m2.fingerprint == m.fingerprint


def test_python_factory_spec_and_missing_preprocessing():
    m = models.load("python:kdcore.models:small_cnn?width=4&num_classes=3&in_channels=1&size=8&channels=1")
    assert m.classes == ["0", "1", "2"] and m.kwargs == {"width": 4, "num_classes": 3, "in_channels": 1}
    with pytest.raises(UserError, match="records no input preprocessing"):
        models.load("python:kdcore.models:small_cnn?width=4")


def test_torchscript_teacher_scores_without_hooks(tmp_path, teacher):
    loaded = models.load(str(teacher))
    path = tmp_path / "t.ts"
    torch.jit.script(loaded.model).save(str(path))
    ts = models.load(f"torchscript:{path}?size=8&channels=1&mean=0.25&std=0.35")
    assert ts.scripted and ts.fingerprint == loaded.fingerprint
    res = score(
        ScoreConfig(
            teacher=f"torchscript:{path}?size=8&channels=1&mean=0.25&std=0.35",
            sources=["d=builtin:digits?stop=30"],
            pool=str(tmp_path / "p"),
            show_progress=False,
        )
    )
    assert res.rows == 30
    import duckdb

    t = duckdb.sql(f"SELECT * FROM '{tmp_path}/p/samples/*/*.parquet'").to_arrow_table()
    assert t.column("bn_score").null_count == 30 and len(t.column("embedding")[0]) == 10  # logits as embedding
