"""The online teacher: it labels the exact view the student trains on (augmented, mixed), and gives the
features that feature and relational distillation compare against.

The teacher is loaded from any teacher spec by `kdcore.models.load` (the same specs as `curate score`),
frozen, in eval mode on the training device, and run under `inference_mode` (bf16 autocast on CUDA).
Batches arrive in [0, 1] at the shards' size; the teacher's own preprocessing (size, channels, mean,
std) is applied here, so a teacher that expects 32×32 RGB can teach a 28×28 grey student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdcore.errors import UserError
from kdcore.models import load
from kdcore.tensors import Normalize
from kdcore.view import InputSpec


class Tap:
    """Captures a layer's activation on every forward: the input of the final linear layer ('auto',
    the penultimate embedding) or the output of a named module."""

    def __init__(self, model: nn.Module, layer: str = "auto", who: str = "model") -> None:
        self.value: torch.Tensor | None = None
        if layer == "auto":
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise UserError(f"the {who} has no linear layer; name a layer for the feature terms")
            self.handle = linears[-1].register_forward_pre_hook(self._take_input)
        else:
            try:
                module = model.get_submodule(layer)
            except AttributeError:
                names = ", ".join(n for n, _ in list(model.named_modules())[1:12])
                raise UserError(f"no layer {layer!r} in the {who}; some names: {names}") from None
            self.handle = module.register_forward_hook(self._take_output)

    def _take_input(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.value = inputs[0]

    def _take_output(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.value = output

    def close(self) -> None:
        self.handle.remove()


def to_view(x01: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """A [0, 1] batch in a model's own preprocessing: resized, channels matched, normalised."""
    if x01.shape[-1] != spec.size or x01.shape[-2] != spec.size:
        x01 = F.interpolate(x01, size=(spec.size, spec.size), mode="bilinear", align_corners=False, antialias=True)
    if x01.shape[1] != spec.channels:
        if spec.channels == 1:  # ITU-R 601-2 luma, as Pillow's convert("L") in the view
            x01 = (x01 * torch.tensor([0.299, 0.587, 0.114], device=x01.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            x01 = x01.expand(-1, spec.channels, -1, -1)
    return Normalize(spec, x01.device)(x01, scaled=True)


class OnlineTeacher:
    def __init__(self, spec: str, device: torch.device, num_classes: int, layers: list[str] | None = None) -> None:
        loaded = load(spec)
        if len(loaded.classes) != num_classes:
            raise UserError(
                f"--teacher {spec} has {len(loaded.classes)} classes, the shards {num_classes}; they must agree"
            )
        if layers and loaded.scripted:
            raise UserError("feature and relational terms need a teacher with named layers, not a torchscript file")
        self.spec = loaded
        self.net = loaded.model.to(device).to(memory_format=torch.channels_last).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.taps = {layer: Tap(self.net, layer, "teacher") for layer in set(layers or [])}
        self.bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def __call__(self, x01: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits, tapped features by layer) on this view; plain tensors, usable as targets of a backward."""
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.bf16):
            logits = self.net(to_view(x01, self.spec.input))
            feats = {layer: tap.value for layer, tap in self.taps.items()}
        return logits.float().clone(), {k: v.float().clone() for k, v in feats.items()}
