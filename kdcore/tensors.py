"""The torch side of the view: device choice and normalisation, the same in every stage."""

from __future__ import annotations

import torch

from kdcore.errors import UserError
from kdcore.view import InputSpec


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto (CUDA when present), cpu, cuda or cuda:N; a CUDA device torch cannot see is a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but torch sees no CUDA device; use --device cpu or auto")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise UserError(f"unknown --device {name!r}; use auto, cpu or cuda")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu or cuda") from None


class Normalize:
    """uint8 (or [0, 1] float with `scaled=True`) N×C×S×S -> (x/255 - mean)/std as float32, channels_last,
    on `device`. Built once per stage; the mean and std tensors live on the device."""

    def __init__(self, spec: InputSpec, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.mean = torch.tensor(spec.mean, device=self.device, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, device=self.device, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor, scaled: bool = False) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float()
        if not scaled:
            x = x.div(255)
        return x.sub(self.mean).div_(self.std).contiguous(memory_format=torch.channels_last)
