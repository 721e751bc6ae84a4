"""Training students and teachers. `fit_arrays` trains a zoo model on labelled in-memory images: it is
how the demo and the tests make a teacher in seconds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.models import InputSpec


@dataclass
class FitConfig:
    steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


def to_input(images: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """uint8 N×S×S (grayscale at the model's size) -> normalised float N×1×S×S."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div_(255).unsqueeze(1)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (x - mean) / std


def fit_arrays(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: FitConfig) -> list[float]:
    """Cross-entropy on (x, y) with AdamW and a cosine schedule; returns the loss per step."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    model.train()
    losses = []
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    return correct / max(1, len(x))
