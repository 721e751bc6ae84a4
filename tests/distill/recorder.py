"""A teacher that records every input it is given (for `python:tests.distill.recorder:make` specs)."""

from __future__ import annotations

import torch

from kdcore.models import SmallCNN

INPUTS: list[torch.Tensor] = []


class RecordingCNN(SmallCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        INPUTS.append(x.detach().float().clone())
        return super().forward(x)


def make(width: int = 8, num_classes: int = 10) -> RecordingCNN:
    return RecordingCNN(1, num_classes, width)
