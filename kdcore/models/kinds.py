"""Teacher kinds: one registered builder per spec prefix (TEACHER_KINDS). distill/models.py parses a spec,
calls its kind, and finishes every kind the same way (preprocessing, class names, fingerprint).

    torchvision:ARCH?num_classes=N&weights=PATH      torchvision's architectures (the zoo's adaptations)
    timm:NAME?num_classes=N&weights=PATH             timm's models (optional: pip install timm)
    hf:DIR                                           a transformers image classifier saved with save_pretrained,
                                                     loaded offline (optional: pip install transformers)
    torchscript:PATH                                 a TorchScript file
    export:PATH.pt2                                  a torch.export program (export with a dynamic batch)
    onnx:PATH?embedding=OUTPUT                       an ONNX model run by onnxruntime (optional)
    python:MODULE:FACTORY?weights=PATH&KW=VALUE      user code, only ever from a spec the user typed
    PATH/TO/student.pt | RUN_DIR                     a checkpoint: its factory must be on the zoo's allow-list

Opaque kinds (TorchScript, torch.export, ONNX) have no named modules to hook: their hook scores are null
and their embedding is the logits (or, for ONNX, the output named by `embedding=`).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import importlib.util
import json
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcore import storage
from kdcore.errors import UserError
from kdcore.models.zoo import call, torchvision_model, trusted_factory
from kdcore.specs import parse_value
from kdcore.view import InputSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM = "random"  # weights=random: an untrained network, on purpose


@dataclass
class Built:
    """What a teacher kind produces before the common finishing (preprocessing, classes, fingerprint)."""

    model: nn.Module
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    default_input: InputSpec | None = None
    opaque: bool = False  # no named modules: hooks, embeddings from layers and features are unavailable
    files: list[str] = field(default_factory=list)
    classes: list[str] | None = None  # names the model itself carries (hf's id2label)
    fingerprint: str | None = None  # for models without a state_dict (ONNX): the file's hash
    states_norm: bool = True  # False: default_input's mean/std are a guess (the model records none)


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


def usage() -> str:
    return ", ".join(k.usage for k in TEACHER_KINDS.values()) + ", or the path of a student.pt / run directory"


# ------------------------------------------------------------------------------------------ kinds


@register_kind("torchvision", "torchvision:ARCH?num_classes=N&weights=PATH")
def _torchvision(location: str, opts: dict[str, str], weights: str | None, pre: dict[str, str]) -> Built:
    kwargs: dict[str, Any] = {"arch": location, **{k: parse_value(v) for k, v in opts.items()}}
    if "in_channels" not in kwargs and "channels" in pre:
        kwargs["in_channels"] = int(number(pre["channels"], "channels"))
    integers(kwargs, "num_classes", "in_channels")
    weights = required_weights(f"torchvision:{location}", weights)
    ckpt = read_checkpoint(weights) if weights else None
    if "num_classes" not in kwargs and ckpt is not None and ckpt.get("classes"):
        kwargs["num_classes"] = len(ckpt["classes"])
    factory = "kdcore.models:torchvision_model"
    model = call(factory, torchvision_model, kwargs)
    channels = int(kwargs.get("in_channels", 3))
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.449,), (0.226,))
    if ckpt is not None:
        load_state(model, ckpt, weights)
    default = InputSpec(32 if kwargs.get("small_input") else 224, channels, mean, std)
    return Built(model, factory, kwargs, ckpt, default, files=[weights] if weights else [])


@register_kind("timm", "timm:NAME?num_classes=N&weights=PATH")
def _timm(location: str, opts: dict[str, str], weights: str | None, pre: dict[str, str]) -> Built:
    timm = _optional("timm", "timm")
    if location not in timm.list_models():
        raise UserError(f"unknown timm model {location!r}; see timm.list_models()")
    kwargs: dict[str, Any] = {k: parse_value(v) for k, v in opts.items()}
    if "in_chans" not in kwargs and "channels" in pre:
        kwargs["in_chans"] = int(number(pre["channels"], "channels"))
    integers(kwargs, "num_classes", "in_chans")
    weights = required_weights(f"timm:{location}", weights)
    ckpt = read_checkpoint(weights) if weights else None
    model = call(f"timm:{location}", lambda **kw: timm.create_model(location, pretrained=False, **kw), kwargs)
    if ckpt is not None:
        load_state(model, ckpt, weights)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    chans = int(kwargs.get("in_chans", 3))
    mean, std = tuple(cfg.get("mean") or IMAGENET_MEAN), tuple(cfg.get("std") or IMAGENET_STD)
    if chans != len(mean):
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return Built(model, f"timm:{location}", kwargs, ckpt, InputSpec(size, chans, mean, std),
                 files=[weights] if weights else [])  # fmt: skip


class HFClassifier(nn.Module):
    """A transformers image classifier as a module of pixel tensors -> logits (its layers stay hookable)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _hf_files(location: str) -> list[str]:
    p = Path(location)
    return sorted(str(f) for f in p.iterdir() if f.is_file()) if p.is_dir() else []


@register_kind("hf", "hf:DIR (save_pretrained, offline)", files=_hf_files)
def _hf(location: str, opts: dict[str, str], weights: str | None, pre: dict[str, str]) -> Built:
    transformers = _optional("transformers", "transformers")
    path = Path(location)
    if not (path / "config.json").is_file():
        raise UserError(f"hf:{location}: no config.json there; save the model with save_pretrained(DIR)")
    if opts or weights:
        raise UserError(f"hf:{location} takes no option but size, channels, mean, std, classes")
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load hf:{location}: {first_line(e)[:200]}") from None
    labels = getattr(model.config, "id2label", None) or {}
    classes = [str(labels[i]) for i in sorted(labels, key=int)] if labels else None
    default = None
    proc = path / "preprocessor_config.json"
    if proc.is_file():
        conf = json.loads(proc.read_text())
        size = conf.get("crop_size") or conf.get("size") or {}
        side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
        chans = int(getattr(model.config, "num_channels", 3))
        if side and conf.get("image_mean") and conf.get("image_std"):
            default = InputSpec(int(side), chans, tuple(conf["image_mean"]), tuple(conf["image_std"]))
    return Built(HFClassifier(model).eval(), None, {}, None, default, files=_hf_files(location), classes=classes)


@register_kind("torchscript", "torchscript:PATH", files=lambda location: [location])
def _torchscript(location: str, opts: dict[str, str], weights: str | None, pre: dict[str, str]) -> Built:
    no_options("torchscript", opts)
    path = existing(location, "torchscript file")
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file
        raise UserError(f"cannot load torchscript file {path}: {first_line(e)}") from None
    return Built(model, opaque=True, files=[str(path)])


class ExportedModule(nn.Module):
    """A torch.export program as a module. Its mode was fixed when it was exported: train()/eval() leave it."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> ExportedModule:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


@register_kind("export", "export:PATH.pt2 (torch.export, dynamic batch)", files=lambda location: [location])
def _export(location: str, opts: dict[str, str], weights: str | None, pre: dict[str, str]) -> Built:
    no_options("export", opts)
    path = existing(location, "torch.export file")
    try:
        model = ExportedModule(torch.export.load(str(path)).module())
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file
        raise UserError(f"cannot load torch.export file {path}: {first_line(e)[:200]}") from None
    return Built(model, opaque=True, files=[str(path)])


class OnnxModule(nn.Module):
    """An ONNX model run by onnxruntime, as a module of float tensors -> logits. With `embedding`, the output of
    that name is kept after each call (`last_embedding`), for the pool's embedding column."""

    def __init__(self, path: str, embedding: str | None = None) -> None:
        super().__init__()
        ort = _optional("onnxruntime", "onnxruntime")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(path, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise UserError(f"cannot load onnx:{path}: {first_line(e)[:200]}") from None
        self.input = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        if embedding is not None and embedding not in outputs:
            raise UserError(f"onnx:{path} has no output {embedding!r}; outputs: {', '.join(outputs)}")
        self.logits = next(o for o in outputs if o != embedding)
        self.embedding = embedding
        self.last_embedding: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = [self.logits] + ([self.embedding] if self.embedding else [])
        outs = self.session.run(names, {self.input: x.detach().float().contiguous().cpu().numpy()})
        if self.embedding:
            self.last_embedding = torch.from_numpy(outs[1]).to(x.device)
        return torch.from_numpy(outs[0]).to(x.device)


@register_kind("onnx", "onnx:PATH?embedding=OUTPUT", files=lambda location: [location])
def _onnx(location: str, opts: dict[str, str], weights: str | None, pre: dict[str, str]) -> Built:
    path = existing(location, "onnx file")
    embedding = opts.pop("embedding", None)
    no_options("onnx", opts)
    model = OnnxModule(str(path), embedding)
    shape = model.session.get_inputs()[0].shape  # N×C×H×W, H and W fixed in most exports
    default = None
    if len(shape) == 4 and all(isinstance(d, int) for d in shape[1:]) and shape[2] == shape[3]:
        default = InputSpec(int(shape[2]), int(shape[1]), (0.5,), (0.5,))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Built(model, default_input=default, opaque=True, files=[str(path)], fingerprint=digest, states_norm=False)


def _python_files(location: str) -> list[str]:
    return [f for f in [module_file(location.partition(":")[0])] if f]


@register_kind("python", "python:MODULE:FACTORY?weights=PATH&KW=VALUE", files=_python_files)
def _python(location: str, opts: dict[str, str], weights: str | None, pre: dict[str, str]) -> Built:
    module, sep, attr = location.partition(":")
    if not sep or not module or not attr or ":" in attr:
        raise UserError(f"python teacher spec must be python:MODULE:FACTORY, got python:{location!r}")
    kwargs = {k: parse_value(v) for k, v in opts.items()}
    try:
        factory_fn: Any = importlib.import_module(module)
        for part in attr.split("."):  # FACTORY may be a dotted path, e.g. Class.from_name
            factory_fn = getattr(factory_fn, part)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import factory {location!r}: {e}") from None
    model = call(location, factory_fn, kwargs)
    weights = None if weights == RANDOM else weights
    ckpt = read_checkpoint(weights) if weights else None
    if ckpt is not None:
        load_state(model, ckpt, weights)
    return Built(model, location, kwargs, ckpt, files=[p for p in (weights, *_python_files(location)) if p])


def checkpoint(location: str, opts: dict[str, str], weights: str | None, pre: dict[str, str]) -> Built:
    """A student.pt (or a run directory holding one) written by distill train / finetune."""
    no_options("a checkpoint", opts)
    if storage.is_local(location):
        if Path(location).is_dir():
            location = str(Path(location) / "student.pt")
    elif not location.endswith((".pt", ".pth")) and storage.isdir(location):
        location = storage.join(location, "student.pt")
    path = storage.redact(location)
    ckpt = read_checkpoint(location)
    if "factory" not in ckpt:
        raise UserError(f"{path} has no 'factory' entry; load a bare state_dict with "
                        "torchvision:ARCH?weights=PATH or python:MODULE:FACTORY?weights=PATH")  # fmt: skip
    factory = str(ckpt["factory"])
    kwargs = dict(ckpt.get("kwargs") or {})
    if not all(isinstance(k, str) and isinstance(v, (int, float, str, bool, type(None))) for k, v in kwargs.items()):
        raise UserError(f"{path}: the checkpoint's kwargs are not plain values")
    model = call(factory, trusted_factory(factory, f"checkpoint {path}"), kwargs)
    load_state(model, ckpt, path)
    return Built(model, factory, kwargs, ckpt, files=[location])


# ------------------------------------------------------------------------------------------ helpers


def _optional(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this teacher kind needs {package}: pip install {package} (or 'kdcurate[teachers]')") from None


def module_file(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec and spec.origin and spec.origin not in ("built-in", "frozen") else None


def no_options(kind: str, opts: dict[str, str]) -> None:
    if opts:
        raise UserError(f"{kind} takes no option {next(iter(opts))!r} (only size, channels, mean, std, classes)")


def existing(path: str, what: str) -> Path:
    """A local file: the path itself, or, for a URL (s3://, gs://, http(s)://), a copy fetched once into a
    temporary folder that is removed when the process ends."""
    if not storage.is_local(path):
        return _fetched(path, what)
    p = storage.local(path)
    if not p.is_file():
        raise UserError(f"{what} not found: {path}")
    return p


_FETCHED: dict[str, Path] = {}


def _fetched(url: str, what: str) -> Path:
    if url in _FETCHED and _FETCHED[url].is_file():
        return _FETCHED[url]
    if storage.scheme(url) == "pipe" or not storage.isfile(url):
        raise UserError(f"{what} not found: {storage.redact(url)}")
    folder = Path(tempfile.mkdtemp(prefix="kdcurate-teacher-"))
    atexit.register(shutil.rmtree, folder, True)
    dest = folder / (storage.name(url) or "file")
    try:
        with storage.open_read(url) as src, open(dest, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {storage.redact(url)}") from None
    _FETCHED[url] = dest
    return dest


def number(v: Any, name: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise UserError(f"teacher spec: {name}= needs a number, got {v!r}") from None


def integers(kwargs: dict[str, Any], *names: str) -> None:
    """Options that must be positive integers (num_classes=ten is refused here, not deep inside a constructor)."""
    for name in names:
        v = kwargs.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UserError(f"teacher spec: {name} must be an integer of at least 1, got {name}={v}")


def required_weights(kind: str, weights: str | None) -> str | None:
    """The weights= of an architecture spec: a file, or 'random' said explicitly (None is returned then)."""
    if weights is None:
        raise UserError(f"{kind} names an architecture without weights: give weights=PATH (a state_dict or "
                        f"checkpoint), or weights={RANDOM} to use an untrained network on purpose")  # fmt: skip
    return None if weights == RANDOM else weights


_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
          b"RIFF": "a RIFF file (WebP?)", b"BM": "a BMP image", b"%PDF": "a PDF document", b"\x1f\x8b": "a gzip file",
          b"{": "JSON or text"}  # fmt: skip


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def read_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint or state_dict, loaded with weights_only=True (safetensors files too). A file that is not
    one (empty, truncated, an image, a pickle of arbitrary objects) is one line naming what is wrong."""
    p = existing(path, "weights file")
    shown = storage.redact(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return {"state_dict": load_file(str(p))}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for bad files
            raise UserError(f"{shown} is not a valid safetensors file ({first_line(e)[:120]})") from None
    with open(p, "rb") as f:
        head = f.read(8)
    if not head:
        raise UserError(f"{shown} is empty (0 bytes): not a checkpoint; give the file torch.save wrote")
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or a legacy pickle
        kind = next((v for k, v in _MAGIC.items() if head.startswith(k)), "not a PyTorch checkpoint")
        raise UserError(f"{shown} is {kind}, not a checkpoint: give a file written by torch.save (a state_dict "
                        "or a checkpoint dict)")  # fmt: skip
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise UserError(f"{shown} holds objects other than tensors and plain data{what}, which are never "
                        "unpickled here; save the model's state_dict (torch.save(model.state_dict(), PATH))"
                        ) from None  # fmt: skip
    except Exception:  # noqa: BLE001 - a cut or corrupted archive fails in many ways
        raise UserError(f"{shown} is truncated or corrupted (not a complete torch.save archive); copy or save it "
                        "again") from None  # fmt: skip
    if not isinstance(obj, dict):
        raise UserError(f"{shown} holds a {type(obj).__name__}, not a state_dict or checkpoint dict")
    if "state_dict" not in obj:
        obj = {"state_dict": obj}
    if not isinstance(obj["state_dict"], dict):
        raise UserError(f"{shown}: its state_dict is a {type(obj['state_dict']).__name__}, not a dict of tensors")
    return obj


def load_state(model: nn.Module, ckpt: dict[str, Any], path: str | None) -> None:
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
