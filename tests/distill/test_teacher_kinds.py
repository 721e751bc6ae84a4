"""Teacher kinds users have (timm, transformers, ONNX, torch.export), each built here from a tiny model: the
loader gives the same logits as the model itself, and `curate score` runs it with the hooks the kind allows."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from curate.config import ScoreConfig
from curate.score import score
from kdcore import models
from kdcore.errors import UserError

X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def pool_rows(pool) -> list[dict]:
    import duckdb

    return duckdb.sql(f"SELECT * FROM '{pool}/samples/*/*.parquet'").to_arrow_table().to_pylist()


def scored(spec: str, tmp_path) -> tuple[list[dict], dict]:
    score(ScoreConfig(spec, ["n=synthetic:shaders?n=12&size=32"], str(tmp_path / "pool"), show_progress=False))
    return pool_rows(tmp_path / "pool"), json.loads((tmp_path / "pool" / "pool.json").read_text())


def test_timm_teacher_with_weights_and_its_own_preprocessing(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    loaded = models.load(f"timm:test_resnet?num_classes=5&weights={tmp_path / 'w.pt'}&size=32")
    with torch.inference_mode():
        assert torch.allclose(loaded.model(X), net(X), atol=1e-5)
    assert loaded.input.mean == tuple(net.pretrained_cfg["mean"]) and loaded.files == [str(tmp_path / "w.pt")]
    rows, meta = scored(f"timm:test_resnet?num_classes=5&weights={tmp_path / 'w.pt'}&size=32", tmp_path)
    assert len(rows) == 12 and rows[0]["bn_score"] is not None and len(rows[0]["embedding"]) == net.num_features
    with pytest.raises(UserError, match="unknown timm model"):
        models.load("timm:no_such_net_at_all")


def test_hf_image_classifier_saved_with_save_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       num_labels=3, id2label={0: "cat", 1: "dog", 2: "owl"},
                                       label2id={"cat": 0, "dog": 1, "owl": 2})  # fmt: skip
    net = transformers.ResNetForImageClassification(config).eval()
    net.save_pretrained(tmp_path / "hf")
    processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0,
                                                    image_mean=[0.4, 0.4, 0.4], image_std=[0.2, 0.2, 0.2])  # fmt: skip
    processor.save_pretrained(tmp_path / "hf")
    loaded = models.load(f"hf:{tmp_path / 'hf'}")
    with torch.inference_mode():
        assert torch.allclose(loaded.model(X), net(pixel_values=X).logits, atol=1e-5)
    assert loaded.classes == ["cat", "dog", "owl"] and loaded.input.size == 32 and loaded.input.mean == (0.4,) * 3
    assert any(f.endswith("config.json") for f in loaded.files)
    rows, meta = scored(f"hf:{tmp_path / 'hf'}", tmp_path)
    assert meta["classes"] == ["cat", "dog", "owl"] and rows[0]["bn_score"] is not None
    assert len(rows[0]["embedding"]) == 16  # the input of the classifier's linear layer, through the hooks


def test_onnx_teacher_gives_the_same_logits_and_an_embedding_output(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net, _, _ = models.build("cnn-tiny", 4, models.InputSpec(32, 3, (0.5,), (0.25,)))
    net.eval()

    class Both(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            feat = self.m.features(x)
            return self.m.fc(feat), feat

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Both(net).eval(), X, str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"],
                          output_names=["logits", "feat"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"},
                                                                         "feat": {0: "n"}})  # fmt: skip
    spec = f"onnx:{tmp_path / 'm.onnx'}?embedding=feat&mean=0.5&std=0.25"
    loaded = models.load(spec)
    with torch.inference_mode():
        assert torch.allclose(loaded.model(X), net(X), atol=1e-4)
    assert loaded.input.size == 32 and loaded.input.channels == 3 and loaded.scripted  # read from the file
    rows, _ = scored(spec, tmp_path)
    assert rows[0]["bn_score"] is None and len(rows[0]["embedding"]) == 32  # no hooks; the named output
    with torch.inference_mode():
        x = torch.from_numpy(np.stack([np.asarray(r["logits"]) for r in rows]))
    assert x.shape == (12, 4)
    with pytest.raises(UserError, match="no output 'nope'"):
        models.load(f"onnx:{tmp_path / 'm.onnx'}?embedding=nope")


def test_onnx_teacher_without_mean_and_std_says_what_it_assumes(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    net, _, _ = models.build("cnn-tiny", 3, models.InputSpec(16, 3, (0.5,), (0.25,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), X[:, :, :16, :16], str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})  # fmt: skip
    loaded = models.load(f"onnx:{tmp_path / 'm.onnx'}")
    assert loaded.input.mean == (0.5, 0.5, 0.5) and loaded.input.size == 16
    err = capsys.readouterr().err
    assert "states no mean&std: using mean=0.5&std=0.5" in err and "add mean=&std=" in err
    models.load(f"onnx:{tmp_path / 'm.onnx'}?mean=0.4&std=0.2")
    assert "states no" not in capsys.readouterr().err


def test_torch_export_teacher(tmp_path):
    torch.manual_seed(0)
    net, _, _ = models.build("cnn-tiny", 4, models.InputSpec(32, 3, (0.5,), (0.25,)))
    net.eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(net, (X,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(tmp_path / "m.pt2"))
    spec = f"export:{tmp_path / 'm.pt2'}?size=32&channels=3&mean=0.5&std=0.25"
    loaded = models.load(spec)
    with torch.inference_mode():
        assert torch.allclose(loaded.model(X), net(X), atol=1e-5)
    rows, meta = scored(spec, tmp_path)
    assert len(rows) == 12 and rows[0]["bn_score"] is None and meta["teacher"]["opaque"]


def test_a_checkpoint_may_name_a_timm_constructor_but_nothing_else(tmp_path):
    timm = pytest.importorskip("timm")
    net = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    spec = models.InputSpec(32, 3, (0.5,), (0.25,))
    models.save_checkpoint(tmp_path / "ok.pt", net, "timm:test_resnet", {"num_classes": 3}, ["a", "b", "c"], spec)
    assert models.load(str(tmp_path / "ok.pt")).classes == ["a", "b", "c"]
    models.save_checkpoint(tmp_path / "bad.pt", net, "os:system", {"command": "true"}, ["a", "b", "c"], spec)
    with pytest.raises(UserError, match="never runs code it names"):
        models.load(str(tmp_path / "bad.pt"))
