"""Every network kdcurate builds or loads, through one door: `load(spec)` for any teacher spec (the kinds in
kinds.py), `build(name, ...)` for the zoo's students (zoo.py), `save_checkpoint` for what `distill train` writes.
Both stages import it from here, so a student written by `distill train` is the next teacher of `curate score`
and `curate` never imports `distill`. It imports torch: the light commands (`curate sql`, `--help`) never import it.

Every spec also takes the input preprocessing (size, channels (1|3), mean, std: comma lists) and the class
names (classes=a,b,c or classes=@FILE with one name per line). A checkpoint never names code to run: its
factory must be on the zoo's allow-list.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcore import storage
from kdcore.errors import UserError
from kdcore.models.kinds import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM,
    TEACHER_KINDS,
    Built,
    checkpoint,
    existing,
    first_line,
    number,
    register_kind,
    usage,
)
from kdcore.models.zoo import (
    MLP,
    TRUSTED_FACTORIES,
    ZOO,
    SmallCNN,
    build,
    mlp,
    small_cnn,
    torchvision_model,
    trusted_factory,
)
from kdcore.specs import split_options
from kdcore.view import InputSpec

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "MLP", "TEACHER_KINDS", "TRUSTED_FACTORIES", "ZOO", "InputSpec", "LoadedModel",
    "SmallCNN", "build", "load", "mlp", "register_kind", "save_checkpoint", "small_cnn", "spec_files",
    "state_fingerprint", "torchvision_model", "trusted_factory",
]  # fmt: skip
PREPROCESS_KEYS = ("size", "channels", "mean", "std")
MANY_CLASSES = 100  # a teacher with this many outputs and no names is noted once
KNOWN_CLASSES = {"imagenet": "imagenet.txt", "cifar10": "cifar10.txt", "cifar100": "cifar100.txt"}


@dataclass
class LoadedModel:
    """A network ready for inference, with what is known about it."""

    model: nn.Module
    spec: str
    classes: list[str]
    input: InputSpec
    fingerprint: str  # sha256 over the state_dict's names, shapes, dtypes and bytes (or the file, when opaque)
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    scripted: bool = False  # opaque: no named modules, so no hooks, layer embeddings or features
    files: list[str] = field(default_factory=list)  # every file the spec reads (pipelines fingerprint them)
    notes: list[str] = field(default_factory=list)  # what was assumed (printed once)

    def describe(self) -> dict[str, Any]:
        return {"spec": storage.redact(self.spec), "sha256": self.fingerprint, "classes": self.classes,
                "num_classes": len(self.classes), "input": self.input.to_dict(), "factory": self.factory,
                "kwargs": self.kwargs, "opaque": self.scripted}  # fmt: skip


def state_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, factory: str, kwargs: dict[str, Any], classes: list[str],
                    input_spec: InputSpec, extra: dict[str, Any] | None = None) -> None:  # fmt: skip
    """Write a checkpoint loadable with torch.load(weights_only=True): the state_dict and plain data
    naming the (allow-listed) factory that rebuilds the network. Atomic."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {"state_dict": state, "factory": factory, "kwargs": kwargs, "classes": list(classes),
            "input": input_spec.to_dict(), **(extra or {})}  # fmt: skip
    with storage.atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load(spec: str) -> LoadedModel:
    """Load any teacher spec (see distill/kinds.py) in eval mode on the CPU."""
    spec = (spec or "").strip()
    if not spec:
        raise UserError("empty teacher spec; use " + usage())
    head, opts = split_options(spec, f"teacher spec {storage.redact(spec)!r}")
    pre = {k: opts.pop(k) for k in PREPROCESS_KEYS if k in opts}
    weights = opts.pop("weights", None)
    classes = opts.pop("classes", None)
    kind_name, sep, location = head.partition(":")
    if sep and kind_name in TEACHER_KINDS:
        built = TEACHER_KINDS[kind_name].build(location, opts, weights, pre)
    elif Path(head).exists() or head.endswith((".pt", ".pth")) or storage.scheme(head) not in ("", "pipe"):
        if weights:
            raise UserError(f"{head}: a checkpoint holds its weights; weights= is for the other spec kinds")
        built = checkpoint(head, opts, None, pre)
    else:
        raise UserError(f"unknown teacher spec {storage.redact(spec)!r}: use {usage()}")
    return _finish(built, spec, pre, classes)


def spec_files(spec: str) -> list[str]:
    """Every file a teacher spec reads (weights, TorchScript, ONNX or export file, factory module, hf directory,
    checkpoint, classes file), for fingerprints that follow the teacher's content; nothing is built."""
    head, opts = split_options(spec.strip(), f"teacher spec {storage.redact(spec)!r}")
    files = [opts["weights"]] if opts.get("weights", RANDOM) != RANDOM else []
    if opts.get("classes", "").startswith("@"):
        files.append(opts["classes"][1:])
    kind_name, sep, location = head.partition(":")
    if sep and kind_name in TEACHER_KINDS:
        files += TEACHER_KINDS[kind_name].files(location)
    else:
        files.append(str(Path(head) / "student.pt") if Path(head).is_dir() else head)
    return [f for f in files if Path(f).is_file()]


_WARNED: set[str] = set()


def _finish(built: Built, spec: str, pre: dict[str, str], classes_opt: str | None) -> LoadedModel:
    model = built.model
    model.eval()
    recorded = (built.checkpoint or {}).get("input")
    base = InputSpec.from_dict(recorded) if recorded else built.default_input
    guessed = base is not None and not built.states_norm  # its mean/std are not known: say what is assumed
    if base is None and not {"size", "channels"} <= set(pre):
        raise UserError(f"teacher {storage.redact(spec)!r} records no input preprocessing: add size=N&channels=1|3 "
                        "(and mean=, std=)")  # fmt: skip
    size = int(number(pre.get("size", base.size if base else 0), "size"))
    channels = int(number(pre.get("channels", base.channels if base else 0), "channels"))
    mean = _floats(pre["mean"]) if "mean" in pre else (base.mean if base and not guessed else None)
    std = _floats(pre["std"]) if "std" in pre else (base.std if base and not guessed else None)
    if base and not guessed and channels != base.channels and "mean" not in pre:
        mean, std = (base.mean[0],), (base.std[0],)
    notes = []
    if mean is None or std is None:
        used = "&".join(f"{k}=0.5" for k, v in (("mean", mean), ("std", std)) if v is None)
        notes.append(f"teacher {storage.redact(spec)} states no {used.replace('=0.5', '')}: using {used}; add "
                     "mean=&std= to the spec if it was trained otherwise")  # fmt: skip
        mean, std = mean or (0.5,), std or (0.5,)
    input_spec = InputSpec(size, channels, tuple(mean), tuple(std))

    files = list(built.files)
    recorded_classes = (built.checkpoint or {}).get("classes") or built.classes
    if recorded_classes and not classes_opt:
        classes = [str(c) for c in recorded_classes]
    else:  # the number of outputs decides: one forward of a blank image
        with torch.inference_mode():
            try:
                outputs = model(torch.zeros(1, channels, size, size)).shape[-1]
            except Exception as e:  # noqa: BLE001 - a model that cannot take its own input spec is a user error
                raise UserError(f"teacher {storage.redact(spec)} fails on a {channels}×{size}×{size} input: "
                                f"{first_line(e)[:200]}; check size= and channels=") from None  # fmt: skip
        classes = _class_names(classes_opt, files) if classes_opt else [str(i) for i in range(outputs)]
        if not classes_opt and outputs >= MANY_CLASSES:
            notes.append(f"teacher {storage.redact(spec)} has {outputs} outputs and no class names: they are labelled "
                         f"0..{outputs - 1}; name them with classes=@FILE (one per line) or a known list "
                         f"({', '.join(KNOWN_CLASSES)}), e.g. classes=imagenet")  # fmt: skip
        if classes_opt and len(classes) != outputs:
            raise UserError(f"teacher {storage.redact(spec)}: {len(classes)} class names for {outputs} outputs; "
                            "give one name per output (classes=a,b,c or classes=@FILE, one per line)")  # fmt: skip
    for note in notes:
        if note not in _WARNED:
            _WARNED.add(note)
            print(f"warning: {note}", file=sys.stderr)
    fingerprint = built.fingerprint or state_fingerprint(model)
    return LoadedModel(model, spec, classes, input_spec, fingerprint, built.factory, built.kwargs, built.opaque,
                       files, notes)  # fmt: skip


def known_classes(name: str) -> list[str]:
    """A class list shipped with the package (kdcore/models/classes/NAME.txt), in the order its models output them."""
    from importlib.resources import files

    text = files("kdcore.models").joinpath("classes", KNOWN_CLASSES[name]).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _class_names(opt: str, files: list[str]) -> list[str]:
    if opt in KNOWN_CLASSES:
        names = known_classes(opt)
    elif opt.startswith("@"):
        path = existing(opt[1:], "classes file")
        files.append(str(path))
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [c for c in opt.split(",") if c]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"class name {dup!r} appears twice in classes=")
    return names


def _floats(v: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in v.split(","))
    except ValueError:
        raise UserError(f"expected comma-separated numbers, got {v!r}") from None
    if any(math.isnan(x) for x in vals):
        raise UserError(f"NaN in {v!r}")
    return vals
