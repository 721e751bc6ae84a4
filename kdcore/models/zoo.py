"""The model zoo: the students `distill train --student NAME` builds, and the only constructors a checkpoint
may name (TRUSTED_FACTORIES, the torchvision and timm registries): nothing else is imported on a checkpoint's
word."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kdcore.errors import UserError
from kdcore.view import InputSpec


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
    "kdcore.models:small_cnn": small_cnn,
    "kdcore.models:mlp": mlp,
    "kdcore.models:torchvision_model": torchvision_model,
}
# the names checkpoints written before the models moved into kdcore carry
TRUSTED_FACTORIES.update({name.replace("kdcore.", "distill.", 1): fn for name, fn in list(TRUSTED_FACTORIES.items())})

# name -> (factory, kwargs); `distill train --student NAME` and pipelines refer to these names.
ZOO: dict[str, tuple[str, dict[str, Any]]] = {
    "cnn-tiny": ("kdcore.models:small_cnn", {"width": 8}),
    "cnn-small": ("kdcore.models:small_cnn", {"width": 16}),
    "cnn": ("kdcore.models:small_cnn", {"width": 32}),
    "cnn-wide": ("kdcore.models:small_cnn", {"width": 64}),
    "mlp": ("kdcore.models:mlp", {}),
    "resnet18": ("kdcore.models:torchvision_model", {"arch": "resnet18", "small_input": True}),
    "mobilenet_v2": ("kdcore.models:torchvision_model", {"arch": "mobilenet_v2"}),
    "shufflenet_v2": ("kdcore.models:torchvision_model", {"arch": "shufflenet_v2_x1_0"}),
}


def build(name: str, num_classes: int, input_spec: InputSpec) -> tuple[nn.Module, str, dict[str, Any]]:
    """Build a zoo model by name for the given classes and input; returns (model, factory, kwargs)."""
    if name not in ZOO:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(ZOO)}")
    factory, kwargs = ZOO[name]
    kwargs = {**kwargs, "num_classes": num_classes, "in_channels": input_spec.channels}
    if factory.endswith(":mlp"):
        kwargs["size"] = input_spec.size
    return call(factory, trusted_factory(factory, "the zoo"), kwargs), factory, kwargs


def trusted_factory(factory: str, origin: str) -> Callable[..., nn.Module]:
    """The constructor a checkpoint names, from the allow-list only: the zoo's, or `torchvision.models:ARCH`."""
    if factory in TRUSTED_FACTORIES:
        return TRUSTED_FACTORIES[factory]
    module, _, arch = factory.partition(":")
    if module == "torchvision.models":
        import torchvision

        if arch in torchvision.models.list_models():
            return lambda **kw: torchvision.models.get_model(arch, weights=None, **kw)
    if module == "timm":
        try:
            import timm
        except ImportError:
            timm = None
        if timm is not None and arch in timm.list_models():
            return lambda **kw: timm.create_model(arch, pretrained=False, **kw)
    raise UserError(
        f"{origin} names the factory {factory!r}, which is not an allowed model constructor (the zoo's, "
        "torchvision.models:ARCH or timm:NAME); a checkpoint never runs code it names: to use your own model code, "
        "give python:MODULE:FACTORY?weights=PATH"
    )


def call(name: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> nn.Module:
    try:
        model = fn(**kwargs)
    except TypeError as e:
        raise UserError(f"factory {name!r} does not accept {kwargs}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    return None


def _set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
