"""The teacher with its scoring hooks: one forward pass gives the logits, the embedding and every score of
curate/scores.py's registry (the logit scores from the logits, the others from forward hooks)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def logit_scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """pred and the 'logits' scores from float32 logits (N, C)."""
    logits = logits.float()
    c = logits.shape[1]
    logp = F.log_softmax(logits, dim=1)
    p = logp.exp()
    top2 = p.topk(min(2, c), dim=1).values
    margin = top2[:, 0] - top2[:, 1] if c > 1 else torch.ones_like(top2[:, 0])
    entropy = -(p * logp).sum(1) / math.log(c) if c > 1 else torch.zeros_like(margin)
    return {
        "pred": logits.argmax(1),
        "confidence": top2[:, 0],
        "margin": margin,
        "entropy": -entropy,
        "energy": torch.logsumexp(logits, 1),
        "max_logit": logits.max(1).values,
    }


def final_linear(model: nn.Module) -> nn.Linear | None:
    """The classifier head: the last nn.Linear registered in the model."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


@dataclass
class Forward:
    logits: torch.Tensor
    embedding: torch.Tensor
    hook_scores: dict[str, torch.Tensor]  # the 'hooks' scores the teacher allows (absent: null in the pool)
    bn_layers: torch.Tensor | None = None  # N×L: each BatchNorm layer's deviation (RMS z), shallow to deep


class ScoringModel:
    """Wraps a teacher: one call gives logits, embedding and the hook-based scores.

    embed_layer 'auto' is the input of the final linear layer; any other value names a module
    (dotted path) whose output, spatially averaged if 4-d, becomes the embedding. Opaque teachers
    (TorchScript, torch.export, ONNX) cannot carry hooks: their embedding is the logits (or an ONNX
    model's named embedding output) and the hook scores are null."""

    def __init__(self, model: nn.Module, embed_layer: str = "auto", scripted: bool = False) -> None:
        self.model = model
        self.opaque = scripted
        self.head = None if scripted else final_linear(model)
        self._feat: torch.Tensor | None = None
        self._embed: torch.Tensor | None = None
        self._bn: list[torch.Tensor] = []
        self.hooks = []
        self.has_bn = False
        self.bn_count = 0
        self._basis = None  # orthonormal basis of the classifier's weight rows, when they span less than the features
        if scripted:
            if embed_layer != "auto":
                raise ValueError(
                    "an opaque teacher (TorchScript, torch.export, ONNX) has no named layers; use --embed-layer auto"
                )
            return
        if self.head is not None:
            self.hooks.append(self.head.register_forward_pre_hook(self._capture_feat))
        if embed_layer != "auto":
            try:
                module = model.get_submodule(embed_layer)
            except AttributeError:
                names = [n for n, _ in model.named_modules() if n][:12]
                raise ValueError(f"no module {embed_layer!r} in the teacher; some names: {names}") from None
            self.hooks.append(module.register_forward_hook(self._capture_embed))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
                self.has_bn = True
                self.bn_count += 1
                self.hooks.append(m.register_forward_pre_hook(self._bn_hook))
        if self.head is not None and self.head.out_features < self.head.in_features:
            q, _ = torch.linalg.qr(self.head.weight.detach().float().T)
            self._basis = q

    def _capture_feat(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._feat = inputs[0]

    def _capture_embed(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._embed = output

    def _bn_hook(self, module: nn.modules.batchnorm._BatchNorm, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        m = x.mean(dim=tuple(range(2, x.dim())), dtype=torch.float32) if x.dim() > 2 else x.float()
        z = (m - module.running_mean.float()) * torch.rsqrt(module.running_var.float() + module.eps)
        self._bn.append(z.pow(2).mean(1).sqrt())

    def __call__(self, x: torch.Tensor) -> Forward:
        self._feat, self._embed, self._bn = None, None, []
        logits = self.model(x).float()
        feat = self._feat.float().flatten(1) if self._feat is not None else None
        emb = self._embed if not self.opaque else getattr(self.model, "last_embedding", None)
        if emb is not None:
            emb = emb.float()
            emb = emb.mean(dim=tuple(range(2, emb.dim()))) if emb.dim() > 2 else emb.flatten(1)
        elif feat is not None:
            emb = feat
        else:
            emb = logits
        scores: dict[str, torch.Tensor] = {}
        if feat is not None and self.head is not None:
            norm = feat.norm(dim=1)
            scores["feat_norm"] = norm
            w = self.head.weight.float()[logits.argmax(1)]
            scores["proj_score"] = (feat * w).sum(1) / w.norm(dim=1).clamp_min(1e-12)
            if self._basis is not None:
                q = self._basis.to(feat.device)
                inside = (feat @ q).norm(dim=1)  # the part of h the classifier can see
                scores["span_score"] = inside / norm.clamp_min(1e-12)
        layers = None
        if self._bn:
            layers = torch.stack(self._bn, 1)
            scores["bn_score"] = -layers.mean(1)
        return Forward(logits, emb, scores, layers)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def odin_score(model: nn.Module, x: torch.Tensor, temperature: float = 1000.0, eps: float = 0.0014) -> torch.Tensor:
    """ODIN (Liang et al. 2018): perturb the input to raise the tempered max softmax, then re-score."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        logits = model(x).float() / temperature
        loss = -F.log_softmax(logits, 1).max(1).values.sum()
        loss.backward()
        x_adv = x - eps * x.grad.sign()
        with torch.no_grad():
            return F.softmax(model(x_adv).float() / temperature, 1).max(1).values
