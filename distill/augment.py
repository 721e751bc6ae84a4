"""Batch augmentation on the training device, for the online teacher to see the view the student sees.

Images arrive as float N×C×H×W in [0, 1] (before normalisation). Every sample draws its own crop offset
and flip; RandAugment (torchvision) draws one op sequence per group of samples. Mixup and CutMix mix a
batch with a permutation of itself; when both are on, each step picks one at random.

    crop        pad by `pad` pixels (zeros), crop back to H×W at a random offset per sample
    flip        horizontal flip with probability 1/2 per sample (only where the data allows it)
    randaugment torchvision's RandAugment (2 ops, magnitude 9) per group of `groups` samples
    mixup       x = λ·x + (1−λ)·x[perm], λ ~ Beta(α, α)                      (Zhang et al. 2018)
    cutmix      a box of area share 1−λ taken from x[perm], λ from the box     (Yun et al. 2019)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class AugmentConfig:
    crop: int = 0  # padding in pixels for the random crop; 0 = off
    flip: bool = False
    randaugment: bool = False
    mixup: float = 0.0  # Beta(α, α); 0 = off
    cutmix: float = 0.0
    groups: int = 8  # RandAugment: samples in a group share one op sequence

    @property
    def geometric(self) -> bool:
        return bool(self.crop or self.flip or self.randaugment)

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


@dataclass
class Mix:
    """How a batch was mixed: sample i is lam·(its own) + (1 − lam)·(sample perm[i])."""

    perm: torch.Tensor
    lam: float


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by `pad`, then crop H×W at an independent random offset for each sample."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device="cpu").to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device="cpu").to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # N×1×H×1
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # N×1×1×W
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    mask = torch.rand(len(x), generator=gen, device="cpu").to(x.device) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


@functools.cache
def _randaugment() -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import v2  # imported on first use: torchvision's import costs seconds

    return v2.RandAugment(num_ops=2, magnitude=9)


def randaugment(x: torch.Tensor, groups: int = 8) -> torch.Tensor:
    """torchvision's RandAugment, one op sequence per group of samples (uint8 in, so ops behave as on images)."""
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8)
    op = _randaugment()
    out = torch.cat([op(chunk) for chunk in u8.chunk(max(1, groups))])
    return out.to(x.dtype) / 255


def mixup(x: torch.Tensor, alpha: float, gen: torch.Generator | None = None) -> tuple[torch.Tensor, Mix]:
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(x), generator=gen, device="cpu").to(x.device)
    return lam * x + (1 - lam) * x[perm], Mix(perm, lam)


def cutmix(x: torch.Tensor, alpha: float, gen: torch.Generator | None = None) -> tuple[torch.Tensor, Mix]:
    n, _, h, w = x.shape
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(n, generator=gen, device="cpu").to(x.device)
    bh, bw = round(h * (1 - lam) ** 0.5), round(w * (1 - lam) ** 0.5)
    cy, cx = int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
    y0, y1 = max(0, cy - bh // 2), min(h, cy - bh // 2 + bh)
    x0, x1 = max(0, cx - bw // 2), min(w, cx - bw // 2 + bw)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return out, Mix(perm, 1 - (y1 - y0) * (x1 - x0) / (h * w))  # λ = the share of the own image left


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator | None = None) -> tuple[torch.Tensor, Mix | None]:
    """The augmented (and maybe mixed) view of a [0, 1] batch, and how it was mixed (None: not mixed)."""
    if cfg.crop:
        x = random_crop(x, cfg.crop, gen)
    if cfg.flip:
        x = random_flip(x, gen)
    if cfg.randaugment:
        x = randaugment(x, cfg.groups)
    if not cfg.mixing:
        return x, None
    use_cutmix = cfg.cutmix > 0 and (cfg.mixup <= 0 or float(torch.rand(1, generator=gen)) < 0.5)
    return cutmix(x, cfg.cutmix, gen) if use_cutmix else mixup(x, cfg.mixup, gen)
