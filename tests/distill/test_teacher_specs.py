"""Teacher specs that would silently be wrong, and files that are not checkpoints: each one line naming the fix."""

from __future__ import annotations

import io

import pytest

from kdcore import models
from kdcore.errors import UserError
from tests.conftest import run_cli

TINY = "python:kdcore.models:small_cnn?in_channels=1&width=2&size=8&channels=1&mean=0.5&std=0.5"


def tiny_checkpoint(path, classes: int = 3) -> bytes:
    spec = models.InputSpec(8, 1, (0.5,), (0.5,))
    net, factory, kwargs = models.build("mlp", classes, spec)
    models.save_checkpoint(path, net, factory, kwargs, [f"c{i}" for i in range(classes)], spec)
    return path.read_bytes()


def test_an_architecture_without_weights_is_refused_unless_random_is_asked_for(tmp_path):
    with pytest.raises(UserError, match="without weights: give weights=PATH .* or weights=random"):
        models.load("torchvision:resnet18?num_classes=10&size=32")
    net = models.load("torchvision:resnet18?num_classes=10&weights=random&size=32&small_input=true")
    assert len(net.classes) == 10 and net.files == []
    assert models.spec_files("torchvision:resnet18?num_classes=10&weights=random") == []


def test_num_classes_must_be_an_integer():
    for bad in ("ten", "0", "2.5"):
        with pytest.raises(UserError, match=f"num_classes must be an integer of at least 1, got num_classes={bad}"):
            models.load(f"torchvision:resnet18?num_classes={bad}&weights=random")


def test_files_that_are_not_checkpoints(tmp_path):
    good = tiny_checkpoint(tmp_path / "good.pt")
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(png, "PNG")
    cases = {"empty.pt": (b"", "is empty"), "image.pt": (png.getvalue(), "is a PNG image, not a checkpoint"),
             "cut.pt": (good[: len(good) // 2], "is truncated or corrupted")}  # fmt: skip
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=message) as err:
            models.load(str(tmp_path / name))
        assert "`weights_only`" not in str(err.value)
        with pytest.raises(UserError, match=message):
            models.load(f"torchvision:resnet18?num_classes=3&weights={tmp_path / name}")
    proc = run_cli("distill", "eval", str(tmp_path / "image.pt"), "--data", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "`weights_only`" not in proc.stderr, proc.stderr
    assert "is a PNG image" in proc.stderr


def test_well_known_class_lists_by_name(capsys):
    net = models.load(f"{TINY}&num_classes=1000&classes=imagenet")
    assert len(net.classes) == 1000 and net.classes[:2] == ["tench", "goldfish"]
    assert models.load(f"{TINY}&num_classes=10&classes=cifar10").classes[0] == "airplane"
    assert len(models.load(f"{TINY}&num_classes=100&classes=cifar100").classes) == 100
    with pytest.raises(UserError, match="1000 class names for 10 outputs"):
        models.load(f"{TINY}&num_classes=10&classes=imagenet")
    assert "no class names" not in capsys.readouterr().err
    # a large teacher without names: noted once, with the fix
    for _ in range(2):
        assert models.load(f"{TINY}&num_classes=120").classes[119] == "119"
    err = capsys.readouterr().err
    assert err.count("has 120 outputs and no class names") == 1 and "classes=imagenet" in err
    models.load(f"{TINY}&num_classes=12")
    assert "no class names" not in capsys.readouterr().err  # a small one is not worth a line


def test_class_list_ships_inside_the_package():
    from importlib.resources import files

    assert files("kdcore.models").joinpath("classes", "imagenet.txt").is_file()
    assert models.known_classes("imagenet")[-1] == "toilet tissue"
