"""Distillation losses behind a small registry. Each returns one value per sample; `combine` applies
class-dropping, per-sample weights and the mean.

    kd      T² · KL(softmax(t/T) ‖ softmax(s/T))                  (Hinton et al. 2015)
    ce      cross-entropy on the teacher's argmax, or on true labels (--labels true)
    kd+ce   α · kd + (1 − α) · ce

Class-dropping (Wang et al. 2023): keep the teacher's top-K classes per sample, renormalise over them
(the other classes get probability 0), which suppresses the label noise of out-of-domain samples.

Terms that need the teacher's features (online mode), added to the batch loss with their own weights; TERMS
is their registry (name, the TrainConfig field holding the weight, the function), so the training loop,
the metrics and the config checks all follow it:

    feature     FitNets (Romero et al. 2015): mean squared error between a learned projection of a student
                layer and a teacher layer (1×1 conv for maps, linear for vectors; the larger map is pooled)
    rkd-d       RKD distance (Park et al. 2019): smooth-L1 between the students' and the teacher's pairwise
                distances in the batch, each divided by its mean
    rkd-a       RKD angle: smooth-L1 between the cosines of the angles ∠(e_ij, e_kj) formed by triplets
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
    mix: Any = None,
) -> torch.Tensor:
    """The batch loss: per-sample loss of cfg.name, class-dropped teacher, weighted mean. `mix` (perm,
    lam) says how the batch was mixed: true-label targets are mixed the same way (the teacher's logits
    already belong to the mixed view)."""
    if cfg.name not in LOSSES:
        raise ValueError(f"unknown loss {cfg.name!r}; choose one of {', '.join(LOSSES)}")
    if teacher is None:
        if cfg.name != "ce" or cfg.labels != "true":
            raise ValueError("without teacher logits only --loss ce --labels true can train")
        teacher = F.one_hot(labels.clamp_min(0), student.shape[1]).float()
    if cfg.topk_classes:
        teacher = drop_classes(teacher, cfg.topk_classes)
    target = None
    if cfg.labels == "true":  # samples without a true label (-1) do not count
        known = (labels >= 0).float()
        target = labels.clamp_min(0)
        if mix is not None:
            known = known * known[mix.perm]
            n = student.shape[1]
            target = mix.lam * F.one_hot(target, n).float() + (1 - mix.lam) * F.one_hot(target[mix.perm], n).float()
        weights = known if weights is None else weights * known
    per_sample = LOSSES[cfg.name](student.float(), teacher.float(), temperature=cfg.temperature, alpha=cfg.alpha,
                                  target=target)  # fmt: skip
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights).sum() / weights.sum().clamp_min(1e-12)


# ------------------------------------------------------------------------------------------ feature terms


def projection(student_dim: int, teacher_dim: int, spatial: bool) -> nn.Module:
    """The learned map from a student layer to a teacher layer (FitNets' regressor)."""
    return (
        nn.Conv2d(student_dim, teacher_dim, 1, bias=False)
        if spatial
        else nn.Linear(student_dim, teacher_dim, bias=False)
    )


def feature_l2(student: torch.Tensor, teacher: torch.Tensor, proj: nn.Module) -> torch.Tensor:
    """Mean squared error between proj(student features) and the teacher's, per sample; feature maps of
    different sizes are average-pooled to the smaller one."""
    s = proj(student)
    if s.dim() == 4 and s.shape[-2:] != teacher.shape[-2:]:
        size = (min(s.shape[-2], teacher.shape[-2]), min(s.shape[-1], teacher.shape[-1]))
        s, teacher = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(teacher, size)
    return (s - teacher).pow(2).flatten(1).mean(1)


def _pairwise(e: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(e, e)
    return d / d[d > 0].mean().clamp_min(1e-12)


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-D: smooth-L1 between mean-normalised pairwise distances of the batch (Park et al. 2019)."""
    with torch.no_grad():
        t = _pairwise(teacher.flatten(1).float())
    return F.smooth_l1_loss(_pairwise(student.flatten(1).float()), t)


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # [j, i] = unit vector from e_j to e_i
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()  # [j, i, k] = cos ∠(e_i − e_j, e_k − e_j)


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-A: smooth-L1 between the cosines of all triplet angles of the batch (Park et al. 2019)."""
    with torch.no_grad():
        t = _angles(teacher.flatten(1).float())
    return F.smooth_l1_loss(_angles(student.flatten(1).float()), t)


@dataclass
class Features:
    """What a feature term compares, for one batch: the tapped student and teacher layers, the learned
    projection between them, and both penultimate embeddings."""

    student_layer: torch.Tensor | None
    teacher_layer: torch.Tensor | None
    projection: nn.Module | None
    student_embedding: torch.Tensor
    teacher_embedding: torch.Tensor


@dataclass(frozen=True)
class Term:
    name: str  # also its column in metrics.jsonl
    weight: str  # the TrainConfig field holding its weight (0: off)
    fn: Callable[[Features], torch.Tensor]
    needs_projection: bool = False


TERMS: dict[str, Term] = {
    t.name: t
    for t in (
        Term(
            "feature",
            "feature_weight",
            lambda f: feature_l2(f.student_layer.float(), f.teacher_layer, f.projection).mean(),
            needs_projection=True,
        ),
        Term("rkd_distance", "rkd_distance", lambda f: rkd_distance(f.student_embedding, f.teacher_embedding)),
        Term("rkd_angle", "rkd_angle", lambda f: rkd_angle(f.student_embedding, f.teacher_embedding)),
    )
}


def active_terms(cfg: Any) -> dict[str, float]:
    """name -> weight of the feature terms a config switches on."""
    return {t.name: float(getattr(cfg, t.weight)) for t in TERMS.values() if getattr(cfg, t.weight) > 0}
