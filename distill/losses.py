"""Distillation losses behind a small registry. Each returns one value per sample; `combine` applies
class-dropping, per-sample weights and the mean.

    kd      T² · KL(softmax(t/T) ‖ softmax(s/T))                  (Hinton et al. 2015)
    ce      cross-entropy on the teacher's argmax, or on true labels (--labels true)
    kd+ce   α · kd + (1 − α) · ce

Class-dropping (Wang et al. 2023): keep the teacher's top-K classes per sample, renormalise over them
(the other classes get probability 0), which suppresses the label noise of out-of-domain samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES: dict[str, Callable[..., torch.Tensor]] = {}


def register(name: str) -> Callable:
    def add(fn: Callable) -> Callable:
        LOSSES[name] = fn
        return fn

    return add


@dataclass
class LossConfig:
    name: str = "kd"
    temperature: float = 4.0
    alpha: float = 0.9  # weight of kd in kd+ce
    labels: str = "teacher"  # teacher | true: the target of ce
    topk_classes: int | None = None  # class-dropping on the teacher side


def drop_classes(teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Teacher logits with all but the top-k classes set to -inf (softmax renormalises over the k)."""
    if k >= teacher_logits.shape[1]:
        return teacher_logits
    top = teacher_logits.topk(k, dim=1).indices
    out = torch.full_like(teacher_logits, float("-inf"))
    return out.scatter(1, top, teacher_logits.gather(1, top))


@register("kd")
def kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0, **_: object) -> torch.Tensor:
    t = temperature
    p_teacher = F.softmax(teacher / t, dim=1)
    log_student = F.log_softmax(student / t, dim=1)
    # kl_div uses xlogy: classes the teacher gives probability 0 (class-dropping) contribute 0
    return F.kl_div(log_student, p_teacher, reduction="none").sum(1) * t * t


@register("ce")
def ce(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None = None, **_: object) -> torch.Tensor:
    if target is None:
        target = teacher.argmax(1)
    return F.cross_entropy(student, target, reduction="none")


@register("kd+ce")
def kd_ce(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0, alpha: float = 0.9,
          target: torch.Tensor | None = None, **_: object) -> torch.Tensor:  # fmt: skip
    return alpha * kd(student, teacher, temperature) + (1 - alpha) * ce(student, teacher, target)


def combine(
    cfg: LossConfig,
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch loss: per-sample loss of cfg.name, class-dropped teacher, weighted mean."""
    if cfg.name not in LOSSES:
        raise ValueError(f"unknown loss {cfg.name!r}; choose one of {', '.join(LOSSES)}")
    if teacher is None:
        if cfg.name != "ce" or cfg.labels != "true":
            raise ValueError("without teacher logits only --loss ce --labels true can train")
        teacher = F.one_hot(labels, student.shape[1]).float()
    if cfg.topk_classes:
        teacher = drop_classes(teacher, cfg.topk_classes)
    target = None
    if cfg.labels == "true":  # samples without a true label (-1) do not count
        known = (labels >= 0).float()
        weights = known if weights is None else weights * known
        target = labels.clamp_min(0)
    per_sample = LOSSES[cfg.name](student.float(), teacher.float(), temperature=cfg.temperature, alpha=cfg.alpha,
                                  target=target)  # fmt: skip
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights).sum() / weights.sum().clamp_min(1e-12)
