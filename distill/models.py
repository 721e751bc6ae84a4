"""The model zoo and the one loader of every teacher spec and checkpoint.

`curate` imports this module (and only this one) from `distill`: a student written by `distill train`
is the next teacher of `curate score`, so building and loading networks lives in exactly one place.

Teacher specs (design §4), one registered kind each (TEACHER_KINDS):
    torchvision:ARCH?num_classes=N&weights=PATH
    torchscript:PATH
    python:MODULE:FACTORY?weights=PATH&KW=VALUE...      user code, only ever from a spec the user typed
    PATH/TO/student.pt  or  a run directory holding student.pt
Every form also takes the input preprocessing (size, channels (1|3), mean, std: comma lists) and the
class names (classes=a,b,c or classes=@FILE with one name per line).

A checkpoint never names code to run: the factory it records must be on the allow-list (the zoo's
constructors, torchvision's registered models); anything else is refused before any import.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcore import storage
from kdcore.errors import UserError
from kdcore.specs import parse_value, split_options
from kdcore.view import InputSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS_KEYS = ("size", "channels", "mean", "std")

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

    if arch not in torchvision.models.list_models():
        raise UserError(f"unknown torchvision architecture {arch!r}; e.g. resnet18, mobilenet_v3_small")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    first = _first_conv(model)
    small = small_input and arch.startswith("resnet")
    if first is not None and (in_channels != first[1].in_channels or small):
        name, conv = first
        new = nn.Conv2d(
            in_channels,
            conv.out_channels,
            kernel_size=3 if small else conv.kernel_size,
            stride=1 if small else conv.stride,
            padding=1 if small else conv.padding,
            bias=conv.bias is not None,
        )
        _set_module(model, name, new)
    if small:
        model.maxpool = nn.Identity()
    return model


# the constructors a checkpoint may name (nothing else is ever imported on a checkpoint's word)
TRUSTED_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "distill.models:small_cnn": small_cnn,
    "distill.models:mlp": mlp,
    "distill.models:torchvision_model": torchvision_model,
}

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
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(ZOO)}")
    factory, kwargs = ZOO[name]
    kwargs = {**kwargs, "num_classes": num_classes, "in_channels": input_spec.channels}
    if factory.endswith(":mlp"):
        kwargs["size"] = input_spec.size
    return _call(factory, trusted_factory(factory, "the zoo"), kwargs), factory, kwargs


def trusted_factory(factory: str, origin: str) -> Callable[..., nn.Module]:
    """The constructor a checkpoint names, from the allow-list only: the zoo's, or `torchvision.models:ARCH`."""
    if factory in TRUSTED_FACTORIES:
        return TRUSTED_FACTORIES[factory]
    module, _, arch = factory.partition(":")
    if module == "torchvision.models":
        import torchvision

        if arch in torchvision.models.list_models():
            return lambda **kw: torchvision.models.get_model(arch, weights=None, **kw)
    raise UserError(
        f"{origin} names the factory {factory!r}, which is not an allowed model constructor (the zoo's, or "
        "torchvision.models:ARCH); a checkpoint never runs code it names: to use your own model code, give "
        "python:MODULE:FACTORY?weights=PATH"
    )


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
    naming the (allow-listed) factory that rebuilds the network. Atomic."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {"state_dict": state, "factory": factory, "kwargs": kwargs, "classes": list(classes),
            "input": input_spec.to_dict(), **(extra or {})}  # fmt: skip
    with storage.atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


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
    scripted: bool = False  # no named modules: hooks, embeddings and features are unavailable
    files: list[str] = field(default_factory=list)  # every file the spec reads (pipelines fingerprint them)
    notes: list[str] = field(default_factory=list)  # what was assumed (printed once by the caller)

    def describe(self) -> dict[str, Any]:
        return {
            "spec": storage.redact(self.spec),
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


# ------------------------------------------------------------------------------------ teacher kinds


@dataclass
class Built:
    """What a teacher kind produces before the common finishing (preprocessing, classes, fingerprint)."""

    model: nn.Module
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    default_input: InputSpec | None = None
    scripted: bool = False
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TeacherKind:
    name: str
    usage: str
    build: Callable[[str, dict[str, str], str | None, dict[str, str]], Built]  # (location, opts, weights, pre)
    files: Callable[[str], list[str]]  # the files the location names (without building anything)


TEACHER_KINDS: dict[str, TeacherKind] = {}


def register_kind(name: str, usage: str, files: Callable[[str], list[str]] = lambda location: []) -> Callable:
    def add(fn: Callable[[str, dict[str, str], str | None, dict[str, str]], Built]) -> Callable:
        TEACHER_KINDS[name] = TeacherKind(name, usage, fn, files)
        return fn

    return add


@register_kind("torchvision", "torchvision:ARCH?num_classes=N&weights=PATH")
def _torchvision(location: str, opts: dict[str, str], weights: str | None, pre: dict[str, str]) -> Built:
    kwargs: dict[str, Any] = {"arch": location, **{k: parse_value(v) for k, v in opts.items()}}
    if "in_channels" not in kwargs and "channels" in pre:
        kwargs["in_channels"] = int(_number(pre["channels"], "channels"))
    ckpt = _read_checkpoint(weights) if weights else None
    if "num_classes" not in kwargs and ckpt is not None and ckpt.get("classes"):
        kwargs["num_classes"] = len(ckpt["classes"])
    factory = "distill.models:torchvision_model"
    model = _call(factory, torchvision_model, kwargs)
    channels = int(kwargs.get("in_channels", 3))
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.449,), (0.226,))
    if ckpt is not None:
        _load_state(model, ckpt, weights)
    default = InputSpec(32 if kwargs.get("small_input") else 224, channels, mean, std)
    return Built(model, factory, kwargs, ckpt, default, files=[weights] if weights else [])


@register_kind("torchscript", "torchscript:PATH", files=lambda location: [location])
def _torchscript(location: str, opts: dict[str, str], weights: str | None, pre: dict[str, str]) -> Built:
    _no_options("torchscript", opts)
    path = _existing(location, "torchscript file")
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file
        raise UserError(f"cannot load torchscript file {path}: {str(e).splitlines()[0]}") from None
    return Built(model, scripted=True, files=[str(path)])


@register_kind(
    "python",
    "python:MODULE:FACTORY?weights=PATH&KW=VALUE",
    files=lambda location: [f for f in [_module_file(location.partition(":")[0])] if f],
)
def _python(location: str, opts: dict[str, str], weights: str | None, pre: dict[str, str]) -> Built:
    module, sep, fn = location.partition(":")
    if not sep or not module or not fn or ":" in fn:
        raise UserError(f"python teacher spec must be python:MODULE:FACTORY, got python:{location!r}")
    kwargs = {k: parse_value(v) for k, v in opts.items()}
    try:
        factory_fn = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import factory {location!r}: {e}") from None
    model = _call(location, factory_fn, kwargs)
    ckpt = _read_checkpoint(weights) if weights else None
    if ckpt is not None:
        _load_state(model, ckpt, weights)
    return Built(model, location, kwargs, ckpt, files=[p for p in (weights, _module_file(module)) if p])


def _checkpoint(location: str, opts: dict[str, str], weights: str | None, pre: dict[str, str]) -> Built:
    """A student.pt (or a run directory holding one) written by distill train / finetune."""
    _no_options("a checkpoint", opts)
    path = Path(location)
    if path.is_dir():
        path = path / "student.pt"
    ckpt = _read_checkpoint(str(path))
    if "factory" not in ckpt:
        raise UserError(f"{path} has no 'factory' entry; load a bare state_dict with "
                        "torchvision:ARCH?weights=PATH or python:MODULE:FACTORY?weights=PATH")  # fmt: skip
    factory = str(ckpt["factory"])
    kwargs = dict(ckpt.get("kwargs") or {})
    if not all(isinstance(k, str) and isinstance(v, (int, float, str, bool, type(None))) for k, v in kwargs.items()):
        raise UserError(f"{path}: the checkpoint's kwargs are not plain values")
    model = _call(factory, trusted_factory(factory, f"checkpoint {path}"), kwargs)
    _load_state(model, ckpt, str(path))
    return Built(model, factory, kwargs, ckpt, files=[str(path)])


def usage() -> str:
    return ", ".join(k.usage for k in TEACHER_KINDS.values()) + ", or the path of a student.pt / run directory"


def load(spec: str) -> LoadedModel:
    """Load any teacher spec (see module doc) in eval mode on the CPU."""
    spec = (spec or "").strip()
    if not spec:
        raise UserError("empty teacher spec; use " + usage())
    head, opts = split_options(spec, f"teacher spec {spec!r}")
    pre = {k: opts.pop(k) for k in PREPROCESS_KEYS if k in opts}
    weights = opts.pop("weights", None)
    classes = opts.pop("classes", None)
    kind_name, sep, location = head.partition(":")
    if sep and kind_name in TEACHER_KINDS:
        built = TEACHER_KINDS[kind_name].build(location, opts, weights, pre)
    elif Path(head).exists() or head.endswith((".pt", ".pth")):
        if weights:
            raise UserError(f"{head}: a checkpoint holds its weights; weights= is for the other spec kinds")
        built = _checkpoint(head, opts, None, pre)
    else:
        raise UserError(f"unknown teacher spec {storage.redact(spec)!r}: use {usage()}")
    return _finish(built, spec, pre, classes)


def spec_files(spec: str) -> list[str]:
    """Every file a teacher spec reads (weights, TorchScript file, factory module, checkpoint, classes file),
    for fingerprints that follow the teacher's content; read from the spec, nothing is built."""
    head, opts = split_options(spec.strip(), f"teacher spec {spec!r}")
    files = [opts["weights"]] if "weights" in opts else []
    if opts.get("classes", "").startswith("@"):
        files.append(opts["classes"][1:])
    kind_name, sep, location = head.partition(":")
    if sep and kind_name in TEACHER_KINDS:
        files += TEACHER_KINDS[kind_name].files(location)
    else:
        files.append(str(Path(head) / "student.pt") if Path(head).is_dir() else head)
    return [f for f in files if Path(f).is_file()]


# -------------------------------------------------------------------------------------- internals

_WARNED: set[str] = set()


def _finish(built: Built, spec: str, pre: dict[str, str], classes_opt: str | None) -> LoadedModel:
    model = built.model
    model.eval()
    recorded = (built.checkpoint or {}).get("input")
    base = InputSpec.from_dict(recorded) if recorded else built.default_input
    if base is None and not {"size", "channels"} <= set(pre):
        raise UserError(f"teacher {spec!r} records no input preprocessing: add size=N&channels=1|3 (and mean=, std=)")
    size = int(_number(pre.get("size", base.size if base else 0), "size"))
    channels = int(_number(pre.get("channels", base.channels if base else 0), "channels"))
    mean = _floats(pre["mean"]) if "mean" in pre else (base.mean if base else None)
    std = _floats(pre["std"]) if "std" in pre else (base.std if base else None)
    if base and channels != base.channels and "mean" not in pre:
        mean, std = (base.mean[0],), (base.std[0],)
    notes = []
    if mean is None or std is None:
        notes.append(
            f"teacher {storage.redact(spec)} states no {'mean' if mean is None else 'std'}: using "
            f"{'mean=0.5' if mean is None else ''}{'&' if mean is None and std is None else ''}"
            f"{'std=0.5' if std is None else ''}; add mean=&std= to the spec if it was trained otherwise"
        )
        mean, std = mean or (0.5,), std or (0.5,)
    input_spec = InputSpec(size, channels, tuple(mean), tuple(std))

    files = list(built.files)
    recorded_classes = (built.checkpoint or {}).get("classes")
    if recorded_classes and not classes_opt:
        classes = [str(c) for c in recorded_classes]
    else:  # the number of outputs decides: one forward of a blank image
        with torch.inference_mode():
            try:
                outputs = model(torch.zeros(1, channels, size, size)).shape[-1]
            except Exception as e:  # noqa: BLE001 - a model that cannot take its own input spec is a user error
                raise UserError(f"teacher {storage.redact(spec)} fails on a {channels}×{size}×{size} input: "
                                f"{str(e).splitlines()[0][:200]}; check size= and channels=") from None  # fmt: skip
        classes = _class_names(classes_opt, files) if classes_opt else [str(i) for i in range(outputs)]
    if classes_opt and len(classes) != outputs:
        raise UserError(f"teacher {storage.redact(spec)}: {len(classes)} class names for {outputs} outputs; "
                        "give one name per output (classes=a,b,c or classes=@FILE, one per line)")  # fmt: skip
    for note in notes:
        if note not in _WARNED:
            _WARNED.add(note)
            print(f"warning: {note}", file=sys.stderr)
    return LoadedModel(model, spec, classes, input_spec, state_fingerprint(model), built.factory, built.kwargs,
                       built.scripted, files, notes)  # fmt: skip


def _class_names(opt: str, files: list[str]) -> list[str]:
    if opt.startswith("@"):
        path = _existing(opt[1:], "classes file")
        files.append(str(path))
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [c for c in opt.split(",") if c]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"class name {dup!r} appears twice in classes=")
    return names


def _call(name: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> nn.Module:
    try:
        model = fn(**kwargs)
    except TypeError as e:
        raise UserError(f"factory {name!r} does not accept {kwargs}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _module_file(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec and spec.origin and spec.origin not in ("built-in", "frozen") else None


def _no_options(kind: str, opts: dict[str, str]) -> None:
    if opts:
        raise UserError(f"{kind} takes no option {next(iter(opts))!r} (only size, channels, mean, std, classes)")


def _existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {path}")
    return p


def _read_checkpoint(path: str) -> dict[str, Any]:
    p = _existing(path, "weights file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling failures come in many types
        raise UserError(f"cannot load {p} with weights_only=True ({str(e).splitlines()[0][:200]}); "
                        "save a state_dict or a checkpoint of plain data") from None  # fmt: skip
    if not isinstance(obj, dict):
        raise UserError(f"{p} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    if "state_dict" not in obj:
        obj = {"state_dict": obj}
    if not isinstance(obj["state_dict"], dict):
        raise UserError(f"{p}: its state_dict is a {type(obj['state_dict']).__name__}, not a dict of tensors")
    return obj


def _load_state(model: nn.Module, ckpt: dict[str, Any], path: str | None) -> None:
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in ckpt["state_dict"].items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(getattr(state[k], "shape", ()))]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}")
        if shape:
            k = shape[0]
            parts.append(f"shape mismatch at {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        raise UserError(f"checkpoint {path} does not fit the architecture ({'; '.join(parts)}); "
                        "check the architecture and num_classes options")  # fmt: skip
    model.load_state_dict(state)


def _number(v: Any, name: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise UserError(f"teacher spec: {name}= needs a number, got {v!r}") from None


def _floats(v: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in v.split(","))
    except ValueError:
        raise UserError(f"expected comma-separated numbers, got {v!r}") from None
    if any(math.isnan(x) for x in vals):
        raise UserError(f"NaN in {v!r}")
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
