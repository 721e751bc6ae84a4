"""The model zoo and the one loader of every teacher spec and checkpoint.

`curate` imports this module (and only this one) from `distill`: a student written by `distill train`
is the next teacher of `curate score`, so building and loading networks lives in exactly one place.

Teacher specs (design §4):
    torchvision:ARCH?num_classes=N&weights=PATH
    torchscript:PATH
    python:MODULE:FACTORY?weights=PATH&KW=VALUE...
    PATH/TO/student.pt  or  a run directory holding student.pt
Every form also takes the input preprocessing: size, channels (1|3), mean, std (comma lists).
"""

from __future__ import annotations

import hashlib
import importlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS_KEYS = ("size", "channels", "mean", "std")


class SpecError(ValueError):
    """A model spec or checkpoint the user gave cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the network's input: resize the shorter side to `size`, centre-crop a
    size×size square, convert to `channels`, scale to [0, 1], then (x - mean) / std per channel."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "shorter-side+center-crop"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise SpecError(f"channels must be 1 or 3, got {self.channels}")
        if self.size < 4:
            raise SpecError(f"size must be at least 4, got {self.size}")
        for name in ("mean", "std"):
            vals = getattr(self, name)
            if len(vals) == 1 and self.channels == 3:
                object.__setattr__(self, name, tuple(vals) * 3)
            elif len(getattr(self, name)) != self.channels:
                raise SpecError(f"{name} needs 1 or {self.channels} values, got {len(vals)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(
            size=int(d["size"]),
            channels=int(d["channels"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            resize=d.get("resize", "shorter-side+center-crop"),
        )


# ----------------------------------------------------------------------------------------- the zoo


class SmallCNN(nn.Module):
    """Three Conv-BN-ReLU stages (two convs each) with max-pooling, global average pool, one linear
    head. Sized for 28×28 (works from 8×8 up); `width` sets the channels of the first stage."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = (width, 2 * width, 4 * width)

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            stage(in_channels, w[0]),
            nn.MaxPool2d(2),
            stage(w[0], w[1]),
            nn.MaxPool2d(2),
            stage(w[1], w[2]),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(w[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class MLP(nn.Module):
    """A two-layer perceptron without BatchNorm (its pools have a null bn_score)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, size: int = 28, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * size * size, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def small_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> nn.Module:
    return SmallCNN(in_channels, num_classes, width)


def mlp(in_channels: int = 1, num_classes: int = 10, size: int = 28, hidden: int = 128) -> nn.Module:
    return MLP(in_channels, num_classes, size, hidden)


def torchvision_model(arch: str, num_classes: int = 1000, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    """A torchvision architecture with `num_classes` outputs. `small_input` swaps a ResNet's 7×7/2 stem
    and max-pool for a 3×3/1 stem (CIFAR-style) so 28–64 px inputs keep their resolution;
    `in_channels` != 3 rebuilds the first convolution."""
    import torchvision

    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError as e:
        raise SpecError(f"unknown torchvision architecture {arch!r}: {e}") from None
    first = _first_conv(model)
    if first is not None and (in_channels != first[1].in_channels or (small_input and arch.startswith("resnet"))):
        name, conv = first
        small = small_input and arch.startswith("resnet")
        new = nn.Conv2d(
            in_channels,
            conv.out_channels,
            kernel_size=3 if small else conv.kernel_size,
            stride=1 if small else conv.stride,
            padding=1 if small else conv.padding,
            bias=conv.bias is not None,
        )
        _set_module(model, name, new)
    if small_input and arch.startswith("resnet"):
        model.maxpool = nn.Identity()
    return model


# name -> (factory, kwargs); `distill train --student NAME` and pipelines refer to these names.
ZOO: dict[str, tuple[str, dict[str, Any]]] = {
    "cnn-tiny": ("distill.models:small_cnn", {"width": 8}),
    "cnn-small": ("distill.models:small_cnn", {"width": 16}),
    "cnn": ("distill.models:small_cnn", {"width": 32}),
    "cnn-wide": ("distill.models:small_cnn", {"width": 64}),
    "mlp": ("distill.models:mlp", {}),
    "resnet18": ("distill.models:torchvision_model", {"arch": "resnet18", "small_input": True}),
    "mobilenet_v2": ("distill.models:torchvision_model", {"arch": "mobilenet_v2"}),
    "shufflenet_v2": ("distill.models:torchvision_model", {"arch": "shufflenet_v2_x1_0"}),
}


def build(name: str, num_classes: int, input_spec: InputSpec) -> tuple[nn.Module, str, dict[str, Any]]:
    """Build a zoo model by name for the given classes and input; returns (model, factory, kwargs)."""
    if name not in ZOO:
        raise SpecError(f"unknown model {name!r}; choose one of: {', '.join(ZOO)}")
    factory, kwargs = ZOO[name]
    kwargs = {**kwargs, "num_classes": num_classes, "in_channels": input_spec.channels}
    if factory.endswith(":mlp"):
        kwargs["size"] = input_spec.size
    return _call_factory(factory, kwargs), factory, kwargs


# ------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    factory: str,
    kwargs: dict[str, Any],
    classes: list[str],
    input_spec: InputSpec,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint loadable with torch.load(weights_only=True): the state_dict and plain data
    naming the factory that rebuilds the network. Written to a temporary name, then renamed."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {
        "state_dict": state,
        "factory": factory,
        "kwargs": kwargs,
        "classes": list(classes),
        "input": input_spec.to_dict(),
        **(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


@dataclass
class LoadedModel:
    """A network ready for inference, with what is known about it."""

    model: nn.Module
    spec: str
    classes: list[str]
    input: InputSpec
    fingerprint: str  # sha256 over the state_dict's names, shapes, dtypes and bytes
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    scripted: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "sha256": self.fingerprint,
            "classes": self.classes,
            "num_classes": len(self.classes),
            "input": self.input.to_dict(),
            "factory": self.factory,
            "kwargs": self.kwargs,
            "scripted": self.scripted,
        }


def state_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load(spec: str) -> LoadedModel:
    """Load any teacher spec (see module doc) in eval mode on the CPU."""
    spec = spec.strip()
    if not spec:
        raise SpecError("empty teacher spec")
    head, _, query = spec.partition("?")
    try:
        opts = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError:
        raise SpecError(f"cannot parse the options of teacher spec {spec!r}; use KEY=VALUE&KEY=VALUE") from None
    pre = {k: opts.pop(k) for k in PREPROCESS_KEYS if k in opts}
    weights = opts.pop("weights", None)
    classes = opts.pop("classes", None)

    if head.startswith("torchvision:"):
        arch = head.split(":", 1)[1]
        kwargs: dict[str, Any] = {"arch": arch}
        kwargs.update({k: _parse_value(v) for k, v in opts.items()})
        ckpt = _read_checkpoint(weights) if weights else None
        if "num_classes" not in kwargs and ckpt is not None and ckpt.get("classes"):
            kwargs["num_classes"] = len(ckpt["classes"])
        if "in_channels" not in kwargs and "channels" in pre:
            kwargs["in_channels"] = int(pre["channels"])
        factory = "distill.models:torchvision_model"
        model = _call_factory(factory, kwargs)
        channels = int(kwargs.get("in_channels", 3))
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.449,), (0.226,))
        default_input = InputSpec(32 if kwargs.get("small_input") else 224, channels, mean, std)
        if ckpt is not None:
            _load_state(model, ckpt, weights)
        return _finish(model, spec, factory, kwargs, ckpt, pre, classes, default_input)

    if head.startswith("torchscript:"):
        path = _existing(head.split(":", 1)[1], "torchscript file")
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any failure here is a bad file
            raise SpecError(f"cannot load torchscript file {path}: {str(e).splitlines()[0]}") from None
        loaded = _finish(model, spec, None, {}, None, pre, classes, None)
        loaded.scripted = True
        return loaded

    if head.startswith("python:"):
        parts = head.split(":")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise SpecError(f"python teacher spec must be python:MODULE:FACTORY, got {head!r}")
        factory = f"{parts[1]}:{parts[2]}"
        kwargs = {k: _parse_value(v) for k, v in opts.items()}
        model = _call_factory(factory, kwargs)
        ckpt = _read_checkpoint(weights) if weights else None
        if ckpt is not None:
            _load_state(model, ckpt, weights)
        return _finish(model, spec, factory, kwargs, ckpt, pre, classes, None)

    path = Path(head)
    if path.is_dir():
        path = path / "student.pt"
    if path.suffix in (".pt", ".pth") or path.exists():
        ckpt = _read_checkpoint(str(path))
        if "factory" not in ckpt:
            raise SpecError(
                f"{path} has no 'factory' entry; load a bare state_dict with "
                "torchvision:ARCH?weights=PATH or python:MODULE:FACTORY?weights=PATH"
            )
        kwargs = dict(ckpt.get("kwargs") or {})
        model = _call_factory(ckpt["factory"], kwargs)
        _load_state(model, ckpt, str(path))
        return _finish(model, spec, ckpt["factory"], kwargs, ckpt, pre, classes, None)

    raise SpecError(
        f"unknown teacher spec {spec!r}: use torchvision:ARCH?..., torchscript:PATH, "
        "python:MODULE:FACTORY?..., or the path of a student.pt / run directory"
    )


# -------------------------------------------------------------------------------------- internals


def _finish(
    model: nn.Module,
    spec: str,
    factory: str | None,
    kwargs: dict[str, Any],
    ckpt: dict[str, Any] | None,
    pre: dict[str, str],
    classes_opt: str | None,
    default_input: InputSpec | None,
) -> LoadedModel:
    model.eval()
    recorded = (ckpt or {}).get("input")
    base = InputSpec.from_dict(recorded) if recorded else default_input
    if base is None and not {"size", "channels"} <= set(pre):
        raise SpecError(f"teacher {spec!r} records no input preprocessing: add size=N&channels=1|3 (and mean=, std=)")
    size = int(pre.get("size", base.size if base else 0))
    channels = int(pre.get("channels", base.channels if base else 0))
    mean = _floats(pre["mean"]) if "mean" in pre else (base.mean if base else (0.5,) * channels)
    std = _floats(pre["std"]) if "std" in pre else (base.std if base else (0.5,) * channels)
    if base and channels != base.channels and "mean" not in pre:
        mean, std = (mean[0],) * channels, (std[0],) * channels
    input_spec = InputSpec(size, channels, tuple(mean), tuple(std))

    if classes_opt:
        classes = [c for c in classes_opt.split(",") if c]
    elif ckpt and ckpt.get("classes"):
        classes = [str(c) for c in ckpt["classes"]]
    else:
        with torch.inference_mode():
            out = model(torch.zeros(1, channels, size, size))
        classes = [str(i) for i in range(out.shape[-1])]
    return LoadedModel(model, spec, classes, input_spec, state_fingerprint(model), factory, kwargs)


def _call_factory(factory: str, kwargs: dict[str, Any]) -> nn.Module:
    mod_name, _, fn_name = factory.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise SpecError(f"cannot import factory {factory!r}: {e}") from None
    try:
        model = fn(**kwargs)
    except TypeError as e:
        raise SpecError(f"factory {factory!r} does not accept {kwargs}: {e}") from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{what} not found: {path}")
    return p


def _read_checkpoint(path: str) -> dict[str, Any]:
    p = _existing(path, "weights file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling failures come in many types
        raise SpecError(
            f"cannot load {p} with weights_only=True ({str(e).splitlines()[0][:200]}); "
            "save a state_dict or a checkpoint of plain data"
        ) from None
    if not isinstance(obj, dict):
        raise SpecError(f"{p} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    if "state_dict" not in obj:
        obj = {"state_dict": obj}
    return obj


def _load_state(model: nn.Module, ckpt: dict[str, Any], path: str | None) -> None:
    state = ckpt["state_dict"]
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}")
        if shape:
            k = shape[0]
            parts.append(f"shape mismatch at {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        raise SpecError(
            f"checkpoint {path} does not fit the architecture ({'; '.join(parts)}); "
            "check the architecture and num_classes options"
        )
    model.load_state_dict(state)


def _parse_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _floats(v: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in v.split(","))
    except ValueError:
        raise SpecError(f"expected comma-separated numbers, got {v!r}") from None
    if any(math.isnan(x) for x in vals):
        raise SpecError(f"NaN in {v!r}")
    return vals


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    return None


def _set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
